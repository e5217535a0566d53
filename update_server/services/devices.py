"""Devices: enrollment, check-in (inventory + assignment), the director's signed assignments, admin views.

Check-in is the hot path (a fleet of 60,000 polling every minute is 1,000 per second): one
``UPDATE ... RETURNING`` authenticates the device (credential digest and id must both match), records its
inventory and says whether the stored assignment is still current. Only when the desired bundle changed or
the signature is past half its life is a new assignment signed (director key) and stored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, cast

from sqlalchemy import JSON, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from bundles.director import sign_assignment
from update_server.broker import BrokerAdminError, DeviceAccount
from update_server.broker.passwords import PasswordHash
from update_server.context import ServerContext
from update_server.errors import Conflict, Forbidden, NotFound, Unauthorized, Unavailable
from update_server.models import Bundle, Device, EnrollmentToken, TelemetryProgress, UTCDateTime
from update_server.security import DEVICE_PREFIX, MQTT_PREFIX, digest, new_secret
from update_server.services.common import audit, lock
from update_server.services.membership import join_rollouts
from update_server.services.telemetry import close_gaps

log = logging.getLogger(__name__)


def enroll(ctx: ServerContext, req: Mapping[str, Any]) -> tuple[Device, str, DeviceAccount | None]:
    """Trade an enrollment token for a device credential (shown once, stored as a digest) and, when the server
    manages broker accounts, a broker account (password shown once, its PBKDF2 hash stored).

    All or nothing: the broker account is created inside the database transaction, so a broker error refuses
    the enrollment and rolls everything back (the token keeps its use); if the commit fails after the broker
    created the account, the account is removed again. A retry re-creates it from scratch."""
    now = ctx.clock()
    device_id = str(req["device_id"])
    account: DeviceAccount | None = None
    try:
        with ctx.sessions() as session, session.begin():
            lock(session, "rollouts")  # a concurrent rollout creation must see this device, or it must see that
            token = session.scalars(select(EnrollmentToken).where(
                EnrollmentToken.token_hash == digest(str(req["enrollment_token"]))).with_for_update()).first()
            if token is None or token.uses_left < 1 or token.expires_at <= now:
                raise Unauthorized("unknown, used or expired enrollment token; ask an operator for a new one "
                                   "(`edgepack enroll-token create`)", code="bad_enrollment_token")
            existing = session.get(Device, device_id)
            if existing is not None:
                if existing.revoked_at is not None:
                    raise Conflict(f"device id {device_id!r} was revoked; enroll the replacement under a new id",
                                   code="device_revoked")
                raise Conflict(f"device id {device_id!r} is taken; choose another id", code="device_exists")
            token.uses_left -= 1
            credential = new_secret(DEVICE_PREFIX)
            device = Device(id=device_id, hardware_id=str(req["hardware_id"]), credential_hash=digest(credential),
                            group_name=token.group_name, tags={**dict(req.get("tags") or {}), **token.tags},
                            platform=req.get("platform"), agent_version=req.get("agent_version"),
                            runtimes=dict(req.get("runtimes") or {}), enrolled_at=now, last_seen_at=now,
                            desired_reason="none", desired_seq=0, signed_seq=-1, assignment_version=0)
            session.add(device)
            session.flush()
            join_rollouts(session, device, now)
            audit(session, now=now, actor=f"enrollment:{token.id}", action="device.enroll", subject=device_id,
                  detail={"hardware_id": device.hardware_id, "group": device.group_name, "tags": device.tags})
            if ctx.broker is not None:  # last: everything above may still refuse the enrollment
                password = new_secret(MQTT_PREFIX)
                try:
                    account = ctx.broker.add_device(device_id, password)
                except BrokerAdminError as exc:
                    raise Unavailable(f"the broker did not create the device's account, so nothing was enrolled "
                                      f"(the token was not used); retry: {exc}", code="broker_unavailable") from exc
                if account is not None:
                    device.mqtt_password_hash = PasswordHash.of(password).password_file_entry()
    except BaseException:
        if account is not None and ctx.broker is not None:  # the commit failed after the broker said yes
            try:
                ctx.broker.remove_device(device_id)
            except BrokerAdminError:
                log.warning("enrollment of %s failed and its broker account could not be removed; a retry "
                            "replaces it", device_id)
        raise
    return device, credential, account


def revoke_device(ctx: ServerContext, device_id: str, *, actor: str, reason: str = "") -> Device:
    """Revoke a device: its HTTP credential stops working, its broker account is deleted (which disconnects
    it), it leaves no way back in under this id. Idempotent: revoking again re-applies the broker side, which
    is how a revocation whose broker step failed (503, the database part done) is completed."""
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        device = session.scalars(select(Device).where(Device.id == device_id).with_for_update()).first()
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        if device.revoked_at is None:
            device.revoked_at = now
            device.credential_hash = digest(new_secret("revoked_"))  # the old credential matches nothing now
            device.mqtt_password_hash = None
            audit(session, now=now, actor=actor, action="device.revoke", subject=device_id, reason=reason)
    if ctx.broker is not None:
        try:
            ctx.broker.remove_device(device_id)
        except BrokerAdminError as exc:
            raise Unavailable(f"device {device_id!r} is revoked on the server (its credential no longer works), "
                              f"but the broker did not remove its account: {exc}. Revoke it again once the broker "
                              "answers (revoking is idempotent)", code="broker_unavailable") from exc
    return device


def _auth_failure(session: Session, credential_hash: str, device_id: str) -> Exception:
    other = session.scalar(select(Device.id).where(Device.credential_hash == credential_hash))
    if other is not None and other != device_id:
        return Forbidden("this credential belongs to another device; a device reads only its own assignment")
    if session.scalar(select(Device.revoked_at).where(Device.id == device_id)) is not None:
        return Unauthorized(f"device {device_id!r} was revoked by an operator", code="device_revoked")
    return Unauthorized("invalid device credential; re-enroll the device")


def _needs_signing(ctx: ServerContext, desired_seq: int, signed_seq: int, reason: str,
                   expires_at: datetime | None, now: datetime) -> bool:
    if desired_seq == 0 and reason == "none":
        return False  # never assigned anything: the assignment is null
    if desired_seq != signed_seq or expires_at is None:
        return True
    return expires_at - now < timedelta(seconds=ctx.settings.assignment_expiry_s / 2)


def sign_for(ctx: ServerContext, session: Session, device_id: str, now: datetime) -> str:
    """Sign and store a new assignment for a device (its row is locked by the caller's UPDATE)."""
    device = session.scalars(select(Device).where(Device.id == device_id)
                             .execution_options(populate_existing=True)).one()
    bundle = session.get(Bundle, device.desired_bundle_id) if device.desired_bundle_id is not None else None
    files: dict[str, Any] = {}
    reason = device.desired_reason
    if bundle is not None:
        targets = ctx.repo.targets(session)
        prefix = f"{bundle.name}/{bundle.version}/"
        if targets is not None:
            files = {p: t for p, t in targets.signed.targets.items() if p.startswith(prefix)}
        if not files or (bundle.hardware_ids and device.hardware_id not in bundle.hardware_ids):
            log.warning("bundle %s/%s cannot be assigned to %s (not in the image targets, or other hardware)",
                        bundle.name, bundle.version, device_id)
            bundle, files, reason = None, {}, "none"
    version = device.assignment_version + 1
    expiry = timedelta(seconds=ctx.settings.assignment_expiry_s)
    data = sign_assignment(
        ctx.keys.director, device_id=device.id, hardware_id=device.hardware_id, version=version, files=files,
        bundle=None if bundle is None else {"name": bundle.name, "version": bundle.version,
                                            "release_counter": bundle.release_counter},
        now=now, expires=expiry, extra={"rollout_id": device.desired_rollout_id, "reason": reason})
    text = data.decode()
    device.assignment, device.assignment_version = text, version
    device.signed_seq, device.assignment_expires_at = device.desired_seq, now + expiry
    return text


def _checkin_statement() -> Any:
    """Built once: authenticate + record inventory + read the director state, in one statement."""
    t = Device.__table__.c
    keep = {name: func.coalesce(bindparam(f"p_{name}", type_=t[name].type), t[name])
            for name in ("agent_version", "platform")}
    keep["runtimes"] = func.coalesce(bindparam("p_runtimes", type_=JSON(none_as_null=True)), t.runtimes)
    plain = {name: bindparam(f"p_{name}", type_=t[name].type)
             for name in ("state", "last_error", "active_name", "active_version", "active_release_counter",
                          "active_variant")}
    return (update(cast(Table, Device.__table__))
            .where(t.id == bindparam("p_id"), t.credential_hash == bindparam("p_hash"))
            .values(last_seen_at=bindparam("p_now", type_=UTCDateTime()), **plain, **keep)
            .returning(t.desired_seq, t.signed_seq, t.desired_reason, t.assignment, t.assignment_expires_at,
                       select(TelemetryProgress.committed_seq).where(TelemetryProgress.device_id == t.id)
                       .scalar_subquery().label("committed_seq")))


CHECKIN = _checkin_statement()


def _sign_locked(ctx: ServerContext, device_id: str, now: datetime) -> str | None:
    """Re-check and sign under the device's row lock, so two concurrent check-ins sign only once."""
    with ctx.sessions() as session, session.begin():
        device = session.scalars(select(Device).where(Device.id == device_id).with_for_update()
                                 .execution_options(populate_existing=True)).one()
        if not _needs_signing(ctx, device.desired_seq, device.signed_seq, device.desired_reason,
                              device.assignment_expires_at, now):
            return device.assignment
        return sign_for(ctx, session, device_id, now)


def checkin_params(device_id: str, credential: str, req: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    active = req.get("active") or {}
    return {"p_id": device_id, "p_hash": digest(credential), "p_now": now, "p_state": req.get("state"),
            "p_last_error": req.get("last_error"), "p_active_name": active.get("name"),
            "p_active_version": active.get("version"), "p_active_release_counter": active.get("release_counter"),
            "p_active_variant": active.get("variant"), "p_agent_version": req.get("agent_version"),
            "p_platform": req.get("platform"), "p_runtimes": req.get("runtimes")}


def checkin_response(ctx: ServerContext, assignment: str | None, now: datetime,
                     committed_seq: int | None = None) -> dict[str, Any]:
    return {"assignment": assignment, "poll_interval_s": ctx.settings.poll_interval_s, "server_time": now.isoformat(),
            "telemetry": {"committed_seq": int(committed_seq or 0)}}


def gaps_to_close(req: Mapping[str, Any], committed_seq: int | None) -> bool:
    """True when the check-in's outbox figures change the device's telemetry mark (rare: the device dropped
    messages from a full outbox, or its state was reset). Otherwise the check-in stays one statement: the
    oldest seq in a healthy outbox is at most one above the server's mark."""
    mark = int(committed_seq or 0)
    oldest, last = req.get("outbox_oldest_seq"), req.get("outbox_seq")
    return (oldest is not None and oldest > mark + 1) or (last is not None and last < mark)


def telemetry_checkin(ctx: ServerContext, device_id: str, req: Mapping[str, Any]) -> int:
    """:func:`~update_server.services.telemetry.close_gaps` in its own transaction; returns the new mark and
    counts what was found lost (``telemetry_lost``, ``telemetry_seq_resets``)."""
    with ctx.sessions() as session, session.begin():
        before = session.scalar(select(TelemetryProgress.resets).where(TelemetryProgress.device_id == device_id))
        mark, lost = close_gaps(session, device_id, req.get("outbox_oldest_seq"), req.get("outbox_seq"))
        after = session.scalar(select(TelemetryProgress.resets).where(TelemetryProgress.device_id == device_id))
    ctx.counters.add("telemetry_lost", lost)
    ctx.counters.add("telemetry_seq_resets", int(after or 0) - int(before or 0))
    return mark


def after_update(ctx: ServerContext, device_id: str, credential_hash: str, row: Any, now: datetime) -> str | None:
    """What follows the check-in UPDATE done outside a session: auth errors, or (rarely) signing."""
    if row is None:
        with ctx.sessions() as session, session.begin():
            raise _auth_failure(session, credential_hash, device_id)
    if _needs_signing(ctx, row.desired_seq, row.signed_seq, row.desired_reason, row.assignment_expires_at, now):
        return _sign_locked(ctx, device_id, now)
    return cast("str | None", row.assignment)


def checkin(ctx: ServerContext, device_id: str, credential: str, req: Mapping[str, Any]) -> dict[str, Any]:
    """The hot path: one prebuilt Core statement (no ORM unit of work) unless re-signing is due.

    On PostgreSQL the HTTP layer calls :func:`checkin_async` instead (same statement, no thread hand-off)."""
    now = ctx.clock()
    params = checkin_params(device_id, credential, req, now)
    with ctx.sessions() as session, session.begin():
        row = session.connection().execute(CHECKIN, params).first()
        if row is None:
            raise _auth_failure(session, params["p_hash"], device_id)
        assignment = row.assignment
        if _needs_signing(ctx, row.desired_seq, row.signed_seq, row.desired_reason, row.assignment_expires_at, now):
            assignment = sign_for(ctx, session, device_id, now)
    mark = row.committed_seq
    if gaps_to_close(req, mark):
        mark = telemetry_checkin(ctx, device_id, req)
    return checkin_response(ctx, assignment, now, mark)


async def checkin_async(ctx: ServerContext, device_id: str, credential: str, req: Mapping[str, Any]) -> dict[str, Any]:
    """PostgreSQL: the UPDATE alone on the async engine (autocommit, asynchronous commit: one round trip, no
    WAL flush wait; losing the last instants of "last seen" in a database crash is harmless). Auth failures
    and signing, both rare, run in a worker thread."""
    import anyio.to_thread

    now = ctx.clock()
    params = checkin_params(device_id, credential, req, now)
    values = await ctx.checkin_pool.fetchone(params)
    row = None if values is None else _Row(*values)
    if row is None or _needs_signing(ctx, row.desired_seq, row.signed_seq, row.desired_reason,
                                     row.assignment_expires_at, now):
        assignment = await anyio.to_thread.run_sync(after_update, ctx, device_id, params["p_hash"], row, now)
    else:
        assignment = row.assignment
    mark = None if row is None else row.committed_seq
    if gaps_to_close(req, mark):
        mark = await anyio.to_thread.run_sync(telemetry_checkin, ctx, device_id, req)
    return checkin_response(ctx, assignment, now, mark)


class _Row(NamedTuple):
    """The columns CHECKIN returns (as the async pool gives them: naive UTC timestamps made aware)."""

    desired_seq: int
    signed_seq: int
    desired_reason: str
    assignment: str | None
    naive_expires_at: datetime | None
    committed_seq: int | None

    @property
    def assignment_expires_at(self) -> datetime | None:
        e = self.naive_expires_at
        return None if e is None else e.replace(tzinfo=timezone.utc)


def assignment(ctx: ServerContext, device_id: str, credential: str) -> str | None:
    now = ctx.clock()
    h = digest(credential)
    with ctx.sessions() as session, session.begin():
        row = session.execute(select(Device.desired_seq, Device.signed_seq, Device.desired_reason, Device.assignment,
                                     Device.assignment_expires_at)
                              .where(Device.id == device_id, Device.credential_hash == h)).first()
        if row is None:
            raise _auth_failure(session, h, device_id)
        if _needs_signing(ctx, row.desired_seq, row.signed_seq, row.desired_reason, row.assignment_expires_at, now):
            return sign_for(ctx, session, device_id, now)
        return cast("str | None", row.assignment)


def authenticate_device(session: Session, credential: str) -> Device:
    device = session.scalar(select(Device).where(Device.credential_hash == digest(credential)))
    if device is None:
        raise Unauthorized("invalid device credential")
    return device


# ---- admin views --------------------------------------------------------------------------------------
def list_devices(session: Session, *, group: str | None = None, tag: Mapping[str, str] | None = None,
                 hardware_id: str | None = None, limit: int = 1000, offset: int = 0) -> tuple[int, list[Device]]:
    stmt = select(Device)
    if group:
        stmt = stmt.where(Device.group_name == group)
    if hardware_id:
        stmt = stmt.where(Device.hardware_id == hardware_id)
    devices = list(session.scalars(stmt.order_by(Device.id)))
    if tag:
        devices = [d for d in devices if all(str(d.tags.get(k)) == str(v) for k, v in tag.items())]
    return len(devices), devices[offset:offset + limit]


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return device


def update_device(ctx: ServerContext, device_id: str, *, group: str | None, tags: Mapping[str, Any] | None,
                  actor: str) -> Device:
    now = ctx.clock()
    with ctx.sessions() as session, session.begin():
        device = get_device(session, device_id)
        if group is not None:
            device.group_name = group or None
        if tags is not None:
            device.tags = dict(tags)
        audit(session, now=now, actor=actor, action="device.update", subject=device_id,
              detail={"group": device.group_name, "tags": device.tags})
        return device


def device_view(device: Device, bundles: Mapping[int, Bundle] | None = None) -> dict[str, Any]:
    desired = bundles.get(device.desired_bundle_id) if bundles and device.desired_bundle_id else None
    return {
        "device_id": device.id, "hardware_id": device.hardware_id, "group": device.group_name, "tags": device.tags,
        "platform": device.platform, "agent_version": device.agent_version, "runtimes": device.runtimes,
        "state": device.state, "last_error": device.last_error,
        "active": None if not device.active_name else {
            "name": device.active_name, "version": device.active_version,
            "release_counter": device.active_release_counter, "variant": device.active_variant},
        "assigned": None if desired is None else {"name": desired.name, "version": desired.version,
                                                  "reason": device.desired_reason,
                                                  "rollout_id": device.desired_rollout_id},
        "enrolled_at": device.enrolled_at.isoformat(),
        "revoked_at": device.revoked_at.isoformat() if device.revoked_at else None,
        "last_seen_at": device.last_seen_at.isoformat() if device.last_seen_at else None,
    }


def with_telemetry(session: Session, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each device's telemetry delivery figures: ``committed_seq`` (every message up to it stored or
    known lost), ``lost`` (messages that left the device's outbox before the server stored them), ``resets``."""
    ids = [v["device_id"] for v in views]
    rows = {r.device_id: r for r in session.scalars(select(TelemetryProgress)
                                                    .where(TelemetryProgress.device_id.in_(ids)))} if ids else {}
    for v in views:
        r = rows.get(v["device_id"])
        v["telemetry"] = {"committed_seq": r.committed_seq if r else 0, "lost": r.lost if r else 0,
                          "resets": r.resets if r else 0}
    return views


def telemetry_totals(session: Session) -> dict[str, int]:
    """Fleet-wide: messages lost (left an outbox before the server stored them) and seq resets."""
    lost, resets = session.execute(select(func.coalesce(func.sum(TelemetryProgress.lost), 0),
                                          func.coalesce(func.sum(TelemetryProgress.resets), 0))).one()
    return {"lost": int(lost), "seq_resets": int(resets)}


def count_devices(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Device)) or 0)
