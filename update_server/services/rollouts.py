"""Rollouts: creation, manual transitions, automatic evaluation, status.

Every transition runs in one transaction holding the rollout's row lock (``SELECT ... FOR UPDATE``; the
gate loop uses ``SKIP LOCKED`` so a replica never waits on another one's evaluation). The decision is
made on the freshly locked row, so two replicas can never both advance or halt the same phase. Each
transition writes an audit entry (who, why, from, to) and changes the devices' desired bundle in bulk;
the devices whose assignment changed get a check-in-now notice after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from update_server.context import ServerContext
from update_server.db import is_postgres
from update_server.errors import BadRequest, Conflict, NotFound
from update_server.models import AuditEntry, Bundle, Device, Rollout, RolloutDevice
from update_server.rollout_policy import (
    Action,
    BreachPolicy,
    Decision,
    GateSpec,
    IllegalTransition,
    PhaseSpec,
    RolloutSpec,
    RolloutState,
    Verdict,
    decide,
    devices_to_halt,
    next_state,
    required_devices,
)
from update_server.security import new_id
from update_server.services.bundles import get_bundle
from update_server.services.common import audit, lock
from update_server.services.installable import (
    check_action,
    halt_reason,
    refuse_unassignable,
    rollback_blockers,
    rollback_refusal,
)
from update_server.services.membership import (
    SELECTOR_KEYS,
    bundle_fits,
    busy_devices,
    last_committed,
    member_row,
    previous_bundle_ids,
    previous_of,
    refused_assignment,
    selector_matches,
)
from update_server.services.stats import gather_stats

log = logging.getLogger(__name__)
EVALUATED = [RolloutState.RUNNING.value, RolloutState.PAUSED.value]
FINAL = {RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK}


def build_spec(ctx: ServerContext, req: Mapping[str, Any]) -> RolloutSpec:
    """The rollout's spec from the request, with the server's defaults for what it leaves out."""
    s = ctx.settings
    soak_in, devices_in = req.get("min_soak_s"), req.get("min_devices")
    soak = float(soak_in) if soak_in is not None else s.default_min_soak_s
    min_dev = int(devices_in) if devices_in is not None else s.default_min_devices
    try:
        if req.get("phases"):
            phases = tuple(PhaseSpec(float(p["percent"]), float(p.get("min_soak_s", soak)),
                                     int(p.get("min_devices", min_dev))) if isinstance(p, Mapping)
                           else PhaseSpec(float(p), soak, min_dev) for p in req["phases"])
        else:
            phases = tuple(PhaseSpec(p, soak, min_dev) for p in s.default_phases)
        gates = GateSpec(**{**asdict(GateSpec()), **_checked_gates(dict(req.get("gates") or {}))})
        return RolloutSpec(phases=phases, gates=gates, on_breach=BreachPolicy(req.get("on_breach", "rollback")),
                           canary_devices=int(req.get("canary_devices") or 1))
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequest(f"invalid rollout spec: {exc}") from exc


def _checked_gates(given: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown gate names and values of the wrong type, naming the known gates."""
    defaults = asdict(GateSpec())
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise BadRequest(f"unknown gate(s) {unknown}; known gates: {', '.join(defaults)}")
    for name, value in given.items():
        default = defaults[name]
        if isinstance(default, (tuple, list)):
            if isinstance(value, str):  # the CLI's --gate allow_unproven=accuracy_drop,crash_rate
                value = given[name] = [v.strip() for v in value.split(",") if v.strip()]
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            want = "a list of gate names"
        elif isinstance(default, int) and not isinstance(default, bool):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            want = "a whole number >= 0"
        elif isinstance(default, float) and not name.startswith(("max_", "min_")):  # false_halt_rate, margin_*
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
        elif default is None or isinstance(default, float):
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            want = "a number, or null (off)"
        else:
            ok, want = True, ""
        if not ok:
            raise BadRequest(f"gate {name} must be {want}, got {value!r}")
    return given


def create_rollout(ctx: ServerContext, req: Mapping[str, Any], *, actor: str) -> tuple[Rollout, list[str]]:
    now = ctx.clock()
    selector = dict(req.get("selector") or {})
    unknown = set(selector) - set(SELECTOR_KEYS)
    if unknown:
        raise BadRequest(f"unknown selector fields {sorted(unknown)}; use {', '.join(SELECTOR_KEYS)}")
    spec = build_spec(ctx, req)
    with ctx.sessions() as session, session.begin():
        lock(session, "rollouts")
        bundle = get_bundle(session, str(req["bundle"]["name"]), str(req["bundle"]["version"]))
        refuse_unassignable(ctx, session, bundle, doing=f"roll out {bundle.name} {bundle.version}")
        rollout = Rollout(id=new_id("r-"), bundle_id=bundle.id, model_name=bundle.name,
                          target_version=bundle.version, selector=selector, spec=spec.to_dict(),
                          state=RolloutState.CREATED.value, current_phase=0, created_at=now, created_by=actor)
        by_name = previous_bundle_ids(session)
        committed = last_committed(session)
        refused = refused_assignment(session)
        busy = busy_devices(session, bundle.name)
        rows, clash = [], {}
        for d in session.execute(select(Device.id, Device.group_name, Device.tags, Device.hardware_id,
                                        Device.desired_bundle_id, Device.active_name, Device.active_version)):
            if not bundle_fits(bundle, d.hardware_id) or not selector_matches(
                    selector, device_id=d.id, group=d.group_name, tags=d.tags or {}, hardware_id=d.hardware_id):
                continue
            if d.id in busy:
                clash[d.id] = busy[d.id]
                continue
            rows.append(member_row(rollout, spec, device_id=d.id, now=now, previous=previous_of(
                (d.active_name, d.active_version), by_name, committed.get(d.id), desired=d.desired_bundle_id,
                desired_failed=d.id in refused)))
        if clash:
            other = sorted(set(clash.values()))
            raise Conflict(f"{len(clash)} of these devices are already in active rollout(s) {', '.join(other)} "
                           f"of {bundle.name}; finish, abort or roll that back first",
                           code="rollout_conflict", detail={"rollouts": other, "devices": sorted(clash)[:20]})
        # A first phase that rounds to fewer devices than the canary needs (1 % of 40 is none) would skip the
        # canary: the members with the lowest buckets join it (at least one; canary_devices asks for more).
        # Stored with the membership, so it holds across pause and resume.
        for r in sorted(rows, key=lambda r: r["bucket"])[:spec.canary_devices]:
            r["phase_index"] = 0
        session.add(rollout)
        session.flush()
        if rows:
            session.execute(insert(RolloutDevice), rows)
        audit(session, now=now, actor=actor, action="rollout.create", subject=rollout.id, rollout_id=rollout.id,
              reason=str(req.get("reason") or ""), detail={"bundle": f"{bundle.name}/{bundle.version}",
                                                          "selector": selector, "members": len(rows),
                                                          "spec": spec.to_dict()})
        if spec.gates.allow_unproven:
            # the opt-out from "no data blocks": its own entry, so the trail shows who waived which gate
            audit(session, now=now, actor=actor, action="rollout.allow_unproven", subject=rollout.id,
                  rollout_id=rollout.id, reason=str(req.get("reason") or ""),
                  detail={"gates": list(spec.gates.allow_unproven)})
        notify: list[str] = []
        if req.get("start"):
            notify = _transition(session, rollout, Action.START, actor=actor, reason=str(req.get("reason") or ""),
                                 now=now)
    ctx.notify(notify)
    return rollout, notify


def _lock_rollout(session: Session, rollout_id: str, *, skip_locked: bool = False) -> Rollout | None:
    stmt = select(Rollout).where(Rollout.id == rollout_id)
    if is_postgres(session):
        stmt = stmt.with_for_update(skip_locked=skip_locked)
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def _assign_phase(session: Session, rollout: Rollout, upto: int) -> list[str]:
    members = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id,
                                                    RolloutDevice.phase_index <= upto)
    stmt = (update(Device).where(Device.id.in_(members), or_(
        Device.desired_rollout_id.is_(None), Device.desired_rollout_id != rollout.id,
        Device.desired_reason != "rollout", Device.desired_bundle_id.is_(None),
        Device.desired_bundle_id != rollout.bundle_id))
        .values(desired_bundle_id=rollout.bundle_id, desired_reason="rollout", desired_rollout_id=rollout.id,
                desired_seq=Device.desired_seq + 1)
        .returning(Device.id).execution_options(synchronize_session=False))
    return list(session.scalars(stmt))


def _roll_back(session: Session, rollout: Rollout) -> list[str]:
    previous = (select(RolloutDevice.previous_bundle_id)
                .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.device_id == Device.id)
                .scalar_subquery())
    stmt = (update(Device).where(Device.desired_rollout_id == rollout.id, Device.desired_reason == "rollout")
            .values(desired_bundle_id=previous, desired_reason="rollback", desired_seq=Device.desired_seq + 1)
            .returning(Device.id).execution_options(synchronize_session=False))
    return list(session.scalars(stmt))


def _transition(session: Session, rollout: Rollout, action: Action, *, actor: str, reason: str, now: datetime,
                detail: dict[str, Any] | None = None) -> list[str]:
    """Apply one action to a locked rollout; returns the devices whose assignment changed."""
    before = RolloutState(rollout.state)
    try:
        after = next_state(before, action)
    except IllegalTransition as exc:
        raise Conflict(str(exc), code="illegal_transition",
                       detail={"state": before.value, "action": action.value, "allowed": exc.allowed}) from exc
    spec = RolloutSpec.from_dict(rollout.spec)
    phase_before = rollout.current_phase
    changed: list[str] = []
    if action is Action.START:
        rollout.current_phase, rollout.phase_started_at, rollout.started_at = 0, now, now
        changed = _assign_phase(session, rollout, 0)
    elif action is Action.ADVANCE:
        if rollout.current_phase + 1 >= len(spec.phases):
            after = RolloutState.COMPLETED
            rollout.finished_at = now
        else:
            rollout.current_phase += 1
            rollout.phase_started_at = now
            changed = _assign_phase(session, rollout, rollout.current_phase)
    elif action is Action.HALT:
        rollout.halt = {"at": now.isoformat(), "reason": reason, **(detail or {})}
    elif action is Action.ROLLBACK:
        changed = _roll_back(session, rollout)
    elif action is Action.RESUME and before is RolloutState.HALTED:
        rollout.halt = None
    if after in FINAL and rollout.finished_at is None:
        rollout.finished_at = now
    rollout.state = after.value
    audit(session, now=now, actor=actor, action=f"rollout.{action.value}", subject=rollout.id,
          rollout_id=rollout.id, reason=reason,
          detail={"from": before.value, "to": after.value, "phase_from": phase_before,
                  "phase_to": rollout.current_phase, "devices_changed": len(changed), **(detail or {})})
    return changed


def act(ctx: ServerContext, rollout_id: str, action: Action, *, actor: str, reason: str) -> Rollout:
    """A manual action (start, pause, resume, advance, abort, rollback) by an operator."""
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        rollout = _lock_rollout(session, rollout_id)
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        check_action(ctx, session, rollout, action)  # 409 if devices would refuse what it assigns
        changed = _transition(session, rollout, action, actor=actor, reason=reason, now=now)
    ctx.notify(changed)
    return rollout


def decision_view(decision: Decision) -> dict[str, Any]:
    return {"verdict": decision.verdict.value, "reason": decision.reason, "rollback": decision.rollback,
            "gates": [{"name": g.name, "status": g.status.value, "value": g.value, "threshold": g.threshold,
                       "comparison": g.comparison, "detail": g.detail, "lower": g.lower, "upper": g.upper,
                       "alpha": g.alpha, "devices": g.devices, "max_share": g.max_share}
                      for g in decision.gates],
            "unproven": list(decision.unproven)}


def evaluate(ctx: ServerContext, rollout_id: str) -> Decision | None:
    """Evaluate one rollout's gates and progress; apply the decision. None if another replica holds it."""
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        rollout = _lock_rollout(session, rollout_id, skip_locked=True)
        if rollout is None or rollout.state not in EVALUATED:
            return None
        spec = RolloutSpec.from_dict(rollout.spec)
        decision = decide(spec, gather_stats(session, rollout), now)
        withdrawn = halt_reason(ctx, session, rollout)
        if withdrawn is not None:  # a floor raised (or targets re-signed) under a running rollout
            decision = Decision(Verdict.HALT, withdrawn, decision.gates,
                                rollback=decision.verdict is Verdict.HALT and decision.rollback)
        view = decision_view(decision)
        if rollout.last_decision != view:
            rollout.last_decision = view
        changed: list[str] = []
        waived = {"unproven": list(decision.unproven), "allowed_by": rollout.created_by} if decision.unproven else {}
        if decision.verdict is Verdict.ADVANCE:
            changed = _transition(session, rollout, Action.ADVANCE, actor="system", reason=decision.reason,
                                  now=now, detail={"gates": view["gates"], **waived})
        elif decision.verdict is Verdict.COMPLETE:
            changed = _transition(session, rollout, Action.COMPLETE, actor="system", reason=decision.reason, now=now,
                                  detail={"gates": view["gates"], **waived})
        elif decision.verdict is Verdict.HALT:
            breached = [g for g in view["gates"] if g["status"] == "breached"]
            blockers = rollback_blockers(ctx, session, rollout) if decision.rollback else []
            refused = {"rollback_refused": rollback_refusal(rollout, blockers), "blocked": blockers} if blockers else {}
            changed = _transition(session, rollout, Action.HALT, actor="system", reason=decision.reason, now=now,
                                  detail={"breached": breached, **refused})
            if decision.rollback and not blockers:
                changed += _transition(session, rollout, Action.ROLLBACK, actor="system",
                                       reason="policy on_breach=rollback: " + decision.reason, now=now)
    ctx.notify(changed)
    return decision


def active_rollout_ids(ctx: ServerContext) -> list[str]:
    with ctx.sessions() as session, session.begin():
        return list(session.scalars(select(Rollout.id).where(Rollout.state.in_(EVALUATED))))


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return rollout


def list_rollouts(session: Session, state: str | None = None) -> list[Rollout]:
    stmt = select(Rollout).order_by(Rollout.created_at.desc())
    if state:
        stmt = stmt.where(Rollout.state == state)
    return list(session.scalars(stmt))


def rollout_summary(rollout: Rollout, bundle: Bundle | None = None) -> dict[str, Any]:
    return {"id": rollout.id, "bundle": {"name": rollout.model_name, "version": rollout.target_version},
            "state": rollout.state, "current_phase": rollout.current_phase, "selector": rollout.selector,
            "created_at": rollout.created_at.isoformat(), "created_by": rollout.created_by,
            "started_at": rollout.started_at.isoformat() if rollout.started_at else None,
            "finished_at": rollout.finished_at.isoformat() if rollout.finished_at else None,
            "phase_started_at": rollout.phase_started_at.isoformat() if rollout.phase_started_at else None,
            "halt": rollout.halt}


def rollout_status(ctx: ServerContext, rollout_id: str) -> dict[str, Any]:
    """Each phase's progress and every gate's value against its threshold, computed now."""
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        rollout = get_rollout(session, rollout_id)
        spec = RolloutSpec.from_dict(rollout.spec)
        stats = gather_stats(session, rollout)
        decision = decide(spec, stats, now)
        state = RolloutState(rollout.state)
        phases = []
        for i, phase in enumerate(spec.phases):
            reporting, required = required_devices(spec, stats, i)
            started = state is not RolloutState.CREATED and i <= rollout.current_phase
            status = ("current" if i == rollout.current_phase and state in (RolloutState.RUNNING,
                                                                          RolloutState.PAUSED, RolloutState.HALTED)
                      else "done" if started or state is RolloutState.COMPLETED else "pending")
            phases.append({"index": i, "percent": phase.percent, "min_soak_s": phase.min_soak_s,
                           "min_devices": phase.min_devices, "devices": stats.members_by_phase.get(i, 0),
                           "reporting": stats.reporting_by_phase.get(i, 0), "cumulative_reporting": reporting,
                           "cumulative_required": required, "status": status})
        soaked = (now - rollout.phase_started_at).total_seconds() if rollout.phase_started_at else None
        return {**rollout_summary(rollout), "spec": rollout.spec, "phases": phases, "phase_soaked_s": soaked,
                "devices_to_halt": devices_to_halt(spec.gates),
                "decision": decision_view(decision),
                "target": stats.target.sums(), "control": stats.control.sums()}


def audit_entries(session: Session, rollout_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if rollout_id:
        stmt = stmt.where(AuditEntry.rollout_id == rollout_id)
    return [{"id": e.id, "at": e.at.isoformat(), "actor": e.actor, "action": e.action, "subject": e.subject,
             "rollout_id": e.rollout_id, "reason": e.reason, "detail": e.detail} for e in session.scalars(stmt)]


def rollout_devices(session: Session, rollout_id: str) -> list[dict[str, Any]]:
    """Each member's cohort bucket and phase, what it is told to run now, and where a rollback sends it (the
    version it last committed before the rollout; None: it stays on what it runs)."""
    get_rollout(session, rollout_id)
    previous = aliased(Bundle)
    rows = session.execute(select(RolloutDevice.device_id, RolloutDevice.bucket, RolloutDevice.phase_index,
                                  RolloutDevice.joined_at, Device.desired_reason, Device.desired_rollout_id,
                                  Bundle.version, previous.version)
                           .join(Device, Device.id == RolloutDevice.device_id)
                           .outerjoin(Bundle, Bundle.id == Device.desired_bundle_id)
                           .outerjoin(previous, previous.id == RolloutDevice.previous_bundle_id)
                           .where(RolloutDevice.rollout_id == rollout_id).order_by(RolloutDevice.device_id))
    return [{"device_id": d, "bucket": round(b, 6), "phase": p, "joined_at": j.isoformat(),
             "assigned_version": v, "reason": reason if rid == rollout_id else None, "rollback_version": back}
            for d, b, p, j, reason, rid, v, back in rows]
