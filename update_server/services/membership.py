"""Which devices a rollout includes, and in which phase: fixed when the rollout is created, extended
when a matching device enrolls later (it lands in the phase its cohort bucket gives it)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from update_server.models import Bundle, Device, Rollout, RolloutDevice, TelemetryEvent
from update_server.rollout_policy import ACTIVE_STATES, RolloutSpec, RolloutState, cohort_bucket, phase_of

ACTIVE = [s.value for s in ACTIVE_STATES]
SELECTOR_KEYS = ("group", "tags", "hardware_ids", "device_ids")


def selector_matches(selector: Mapping[str, Any], *, device_id: str, group: str | None,
                     tags: Mapping[str, Any], hardware_id: str) -> bool:
    """A device matches when it satisfies every field the selector sets (an empty selector: all)."""
    ids = selector.get("device_ids")
    if ids and device_id not in ids:
        return False
    if selector.get("group") and group != selector["group"]:
        return False
    for key, value in (selector.get("tags") or {}).items():
        if key not in tags or str(tags[key]) != str(value):
            return False
    hw = selector.get("hardware_ids")
    return not (hw and hardware_id not in hw)


def bundle_fits(bundle: Bundle, hardware_id: str) -> bool:
    return not bundle.hardware_ids or hardware_id in bundle.hardware_ids


def previous_bundle_ids(session: Session) -> dict[tuple[str, str], int]:
    return {(n, v): i for i, n, v in session.execute(select(Bundle.id, Bundle.name, Bundle.version))}


def member_row(rollout: Rollout, spec: RolloutSpec, *, device_id: str, previous: int | None,
               now: datetime) -> dict[str, Any]:
    bucket = cohort_bucket(rollout.id, device_id)
    return {"rollout_id": rollout.id, "device_id": device_id, "bucket": bucket,
            "phase_index": phase_of(bucket, spec.phases), "previous_bundle_id": previous, "joined_at": now}


FAILED_EVENTS = ("install_failed", "update_refused", "verification_failed", "selftest_failed", "rolled_back")
"""Events by which a device says it could not, or would not, run the bundle it names."""


def previous_of(active: tuple[str | None, str | None], by_name: dict[tuple[str, str], int],
                committed: tuple[str, str] | None = None, *, desired: int | None = None,
                desired_failed: bool = False) -> int | None:
    """The rollback target of a device joining a rollout: the bundle it runs, or is installing, for good.

    In order: its assignment (``desired``, a bundle id) when its newest ``committed`` event names it, or when
    it never reported failing or refusing it (``desired_failed``): a device that committed an update a moment
    ago, or is still installing it, has neither checked in about it nor had its event ingested yet, and the
    assignment is where it ends. Otherwise the bundle it last committed: the target of its newest
    ``committed`` event (:func:`last_committed`), else the one it reports as installed and running at
    check-in. An assignment it refused (an aborted rollout's version it failed to install) is never the
    target: it cannot go back to it. None when it has reported none the server knows: a rollback then leaves
    the device on what it runs."""
    committed_id = by_name.get(committed) if committed is not None else None
    if desired is not None and (committed_id == desired or not desired_failed):
        return desired
    if committed_id is not None:
        return committed_id
    if active[0] and active[1]:
        return by_name.get((active[0], active[1]))
    return None


def last_committed(session: Session, device_ids: list[str] | None = None) -> dict[str, tuple[str, str]]:
    """Device id -> (name, version) of the newest ``committed`` event it sent (for :func:`previous_of`)."""
    newest = (select(func.max(TelemetryEvent.id)).where(TelemetryEvent.event == "committed")
              .group_by(TelemetryEvent.device_id))
    if device_ids is not None:
        newest = newest.where(TelemetryEvent.device_id.in_(device_ids))
    rows = session.execute(select(TelemetryEvent.device_id, TelemetryEvent.target_name, TelemetryEvent.target_version)
                           .where(TelemetryEvent.id.in_(newest.scalar_subquery())))
    return {d: (n, v) for d, n, v in rows if n and v}


def refused_assignment(session: Session, device_ids: list[str] | None = None) -> set[str]:
    """Devices that reported failing or refusing the bundle they are assigned now (:data:`FAILED_EVENTS`)."""
    stmt = (select(TelemetryEvent.device_id).distinct()
            .join(Device, Device.id == TelemetryEvent.device_id)
            .join(Bundle, Bundle.id == Device.desired_bundle_id)
            .where(TelemetryEvent.event.in_(FAILED_EVENTS), TelemetryEvent.target_name == Bundle.name,
                   TelemetryEvent.target_version == Bundle.version))
    if device_ids is not None:
        stmt = stmt.where(TelemetryEvent.device_id.in_(device_ids))
    return set(session.scalars(stmt))


def busy_devices(session: Session, model_name: str, exclude: str | None = None) -> dict[str, str]:
    """Device id -> id of the active rollout of ``model_name`` that owns it."""
    stmt = (select(RolloutDevice.device_id, RolloutDevice.rollout_id).join(Rollout)
            .where(Rollout.model_name == model_name, Rollout.state.in_(ACTIVE)))
    if exclude:
        stmt = stmt.where(Rollout.id != exclude)
    return {d: r for d, r in session.execute(stmt)}


def join_rollouts(session: Session, device: Device, now: datetime) -> bool:
    """Add a newly enrolled device to every active rollout it matches (oldest first, one per model).

    Returns True when its assignment changed (it landed in a phase that is already active)."""
    changed = False
    seen_models: set[str] = set()
    rollouts = session.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE)).order_by(Rollout.created_at))
    by_name = previous_bundle_ids(session)
    committed = last_committed(session, [device.id]).get(device.id)
    refused = device.id in refused_assignment(session, [device.id])
    for rollout in rollouts:
        if rollout.model_name in seen_models:
            continue
        bundle = session.get(Bundle, rollout.bundle_id)
        if bundle is None or not bundle_fits(bundle, device.hardware_id) or not selector_matches(
                rollout.selector, device_id=device.id, group=device.group_name, tags=device.tags,
                hardware_id=device.hardware_id):
            continue
        seen_models.add(rollout.model_name)
        spec = RolloutSpec.from_dict(rollout.spec)
        row = member_row(rollout, spec, device_id=device.id, now=now, previous=previous_of(
            (device.active_name, device.active_version), by_name, committed, desired=device.desired_bundle_id,
            desired_failed=refused))
        session.add(RolloutDevice(**row))
        if rollout.state in (RolloutState.RUNNING.value, RolloutState.PAUSED.value) \
                and row["phase_index"] <= rollout.current_phase:
            session.execute(update(Device).where(Device.id == device.id).values(
                desired_bundle_id=rollout.bundle_id, desired_reason="rollout", desired_rollout_id=rollout.id,
                desired_seq=Device.desired_seq + 1).execution_options(synchronize_session=False))
            changed = True
    return changed
