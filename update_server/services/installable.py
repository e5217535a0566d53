"""Whether devices can still install a bundle, checked before a rollout assigns it or rolls devices back to it.

A device installs a bundle only when the newest signed targets metadata lists its files with the hashes it
downloads and its release counter is at or above the model's signed floor (``edgepack keys raise-floor``).
The server knows both, so it refuses, at the API and before anything is written, a transition that would
assign a bundle no device accepts: otherwise the rollout answers ``running`` or ``rolled_back`` while no
device moves (the check-in signs an empty assignment, see ``services.devices.sign_for``).

* create, start, advance, resume: the rollout's own bundle (409 ``bundle_withdrawn``);
* rollback: every bundle the rollout's devices would go back to (409 ``rollback_refused``);
* the gate loop: a running rollout whose bundle was withdrawn is halted (``halt_reason``), and an automatic
  rollback that devices would refuse is not applied (the rollout stays halted, the reason in ``halt``).

:func:`why_not_installable` is the decision, pure: same metadata and bundle, same answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tuf.api.metadata import Targets

from bundles.trust import floors_of
from bundles.verify import bundle_targets
from update_server.context import ServerContext
from update_server.errors import Conflict
from update_server.models import Bundle, Device, Rollout, RolloutDevice
from update_server.rollout_policy import TRANSITIONS, Action, RolloutState


def why_not_installable(targets: Targets | None, *, name: str, version: str, release_counter: int,
                        files: Sequence[Mapping[str, Any]]) -> str | None:
    """Why no device would install bundle ``name`` ``version``, or None when devices can install it.

    ``files`` are the server's stored ``[{"path", "length", "sha256"}]`` of the bundle (``Bundle.files``)."""
    if targets is None:
        return "the server has no signed targets metadata yet"
    floor = floors_of(targets).get(name, 0)
    if release_counter < floor:
        return (f"{name} {version} (release counter {release_counter}) is below the signed floor {floor} of "
                f"{name}: it was withdrawn with `edgepack keys raise-floor`, and every device refuses it")
    listed = bundle_targets(targets, name, version)
    if not listed:
        return (f"{name} {version} is no longer listed in the signed targets metadata (v{targets.version}) the "
                "server publishes, so devices cannot download it")
    stored = {str(f["path"]): (int(f["length"]), str(f["sha256"])) for f in files}
    signed = {rel: (t.length, t.hashes.get("sha256", "")) for rel, t in listed.items()}
    if stored != signed:
        differ = sorted(p for p in set(stored) | set(signed) if stored.get(p) != signed.get(p))
        return (f"the signed targets metadata (v{targets.version}) lists other content for {name} {version} than "
                f"the server stores ({', '.join(differ[:5])}); devices would refuse the download as corrupt")
    return None


def bundle_problem(ctx: ServerContext, session: Session, bundle: Bundle) -> str | None:
    """:func:`why_not_installable` for a stored bundle against the newest targets the server publishes."""
    md = ctx.repo.targets(session)
    return why_not_installable(md.signed if md is not None else None, name=bundle.name, version=bundle.version,
                               release_counter=bundle.release_counter, files=bundle.files)


def refuse_unassignable(ctx: ServerContext, session: Session, bundle: Bundle, *, doing: str) -> None:
    """Raise 409 ``bundle_withdrawn`` when no device would install ``bundle`` (``doing``: what was asked)."""
    why = bundle_problem(ctx, session, bundle)
    if why is None:
        return
    floor = floors_of(md.signed).get(bundle.name, 0) if (md := ctx.repo.targets(session)) is not None else 0
    fix = (f"roll out a version of {bundle.name} with release counter >= {floor} instead" if floor
           > bundle.release_counter else "push the bundle again signed with the current keys, or roll out "
           "another version")
    raise Conflict(f"cannot {doing}: {why}. Nothing was changed; {fix}", code="bundle_withdrawn",
                   detail={"name": bundle.name, "version": bundle.version,
                           "release_counter": bundle.release_counter, "floor": floor})


def rollback_blockers(ctx: ServerContext, session: Session, rollout: Rollout) -> list[dict[str, Any]]:
    """The bundles a rollback of ``rollout`` would send devices back to that no device installs, with how many
    devices each (the devices ``rollouts._roll_back`` would change). Empty: the rollback can go ahead."""
    rows = session.execute(
        select(RolloutDevice.previous_bundle_id, func.count())
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(RolloutDevice.rollout_id == rollout.id, Device.desired_rollout_id == rollout.id,
               Device.desired_reason == "rollout", RolloutDevice.previous_bundle_id.is_not(None))
        .group_by(RolloutDevice.previous_bundle_id)).all()
    out = []
    for bundle_id, count in rows:
        bundle = session.get(Bundle, bundle_id)
        if bundle is None:
            continue
        why = bundle_problem(ctx, session, bundle)
        if why is not None:
            out.append({"name": bundle.name, "version": bundle.version, "devices": int(count), "reason": why})
    return out


def rollback_refusal(rollout: Rollout, blockers: list[dict[str, Any]]) -> str:
    """What an operator reads when a rollback is refused: which versions, how many devices, what to do."""
    parts = "; ".join(f"{b['devices']} device(s) would go back to {b['name']} {b['version']}, but {b['reason']}"
                      for b in blockers)
    return (f"rollback of {rollout.id} refused, nothing was changed: {parts}. Those devices would stay on "
            f"{rollout.model_name} {rollout.target_version}. Roll forward instead: create a rollout of a version "
            "devices accept (at or above the floor) for them; `edgepack rollout abort` stops this rollout if it "
            "is still active (devices keep what they run)")


def refuse_rollback(ctx: ServerContext, session: Session, rollout: Rollout) -> None:
    """Raise 409 ``rollback_refused`` when some device's previous bundle would be refused by it."""
    blockers = rollback_blockers(ctx, session, rollout)
    if blockers:
        raise Conflict(rollback_refusal(rollout, blockers), code="rollback_refused",
                       detail={"rollout_id": rollout.id, "blocked": blockers})


def halt_reason(ctx: ServerContext, session: Session, rollout: Rollout) -> str | None:
    """Why the gate loop must halt ``rollout`` regardless of its gates: its bundle was withdrawn. None: fine."""
    bundle = session.get(Bundle, rollout.bundle_id)
    why = bundle_problem(ctx, session, bundle) if bundle is not None else "its bundle was deleted"
    return None if why is None else f"target withdrawn: {why}; devices refuse it, so the rollout is halted"


def check_action(ctx: ServerContext, session: Session, rollout: Rollout, action: Action) -> None:
    """Refuse (409) a legal manual action that would assign a bundle devices refuse. Illegal actions are left
    to the transition table, so its message (what is allowed now) comes first."""
    if (RolloutState(rollout.state), action) not in TRANSITIONS:
        return
    if action in (Action.START, Action.ADVANCE, Action.RESUME):
        bundle = session.get(Bundle, rollout.bundle_id)
        if bundle is not None:
            refuse_unassignable(ctx, session, bundle, doing=f"{action.value} rollout {rollout.id} of "
                                f"{bundle.name} {bundle.version}")
    elif action is Action.ROLLBACK:
        refuse_rollback(ctx, session, rollout)
