"""Operator endpoints: bundles, devices, rollouts, tokens, trust, audit, stats. API tokens with roles:
viewer (read), operator (push, roll out, enroll), admin (tokens, deletions)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from update_server.api.deps import Admin, CtxDep, Operator, Viewer, actor, bearer
from update_server.api.files import blob_response
from update_server.errors import BadRequest
from update_server.models import Bundle
from update_server.rollout_policy import Action
from update_server.schemas import ActionRequest, DevicePatch, EnrollmentTokenCreate, RolloutCreate, TokenCreate
from update_server.security import DEVICE_PREFIX, Role
from update_server.services import bundles, devices, rollouts, tokens

router = APIRouter(prefix="/api/v1")


# ---- bundles -------------------------------------------------------------------------------------------
_WRITE_BYTES = 1024 * 1024  # received chunks are written in a worker thread, this many bytes at a time


async def _receive(request: Request, directory: Path) -> Path:
    """The request body, streamed into a file in ``directory``; the size limit is ``limits.BodyLimitMiddleware``'s.
    Disk writes run in a worker thread: the event loop keeps serving other requests during a large upload."""
    fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".edgepack", dir=directory)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            buffer = bytearray()
            async for chunk in request.stream():
                buffer += chunk
                if len(buffer) >= _WRITE_BYTES:
                    size += len(buffer)
                    await anyio.to_thread.run_sync(fh.write, buffer)
                    buffer = bytearray()
            size += len(buffer)
            await anyio.to_thread.run_sync(fh.write, buffer)
    except BaseException:
        os.unlink(tmp)
        raise
    if size == 0:
        os.unlink(tmp)
        raise BadRequest("empty upload: send the .edgepack file as the request body")
    return Path(tmp)


@router.post("/bundles", status_code=201, tags=["bundles"])
async def push_bundle(request: Request, response: Response, ctx: CtxDep, token: Operator) -> dict[str, Any]:
    """Upload a signed bundle (raw .edgepack body, at most ``max_upload_bytes``); verified before it is accepted.
    201 new; 200 the server already had these very files (idempotent); 409 the same version with other content."""
    path = await _receive(request, ctx.storage.staging_area())
    try:
        bundle, created = await run_in_threadpool(bundles.upload_bundle, ctx, path, actor=actor(token))
    finally:
        path.unlink(missing_ok=True)
    if not created:
        response.status_code = 200
    return {**bundles.bundle_view(bundle), "created": created}


@router.get("/bundles", tags=["bundles"])
def list_bundles(ctx: CtxDep, _: Viewer, name: str | None = None) -> list[dict[str, Any]]:
    with ctx.sessions() as session, session.begin():
        return [bundles.bundle_view(b) for b in bundles.list_bundles(session, name)]


@router.get("/bundles/{name}/{version}", tags=["bundles"])
def get_bundle(name: str, version: str, ctx: CtxDep, _: Viewer) -> dict[str, Any]:
    with ctx.sessions() as session, session.begin():
        return bundles.bundle_detail(bundles.get_bundle(session, name, version))


@router.delete("/bundles/{name}/{version}", status_code=204, tags=["bundles"])
def delete_bundle(name: str, version: str, ctx: CtxDep, token: Admin, reason: str = "") -> Response:
    bundles.delete_bundle(ctx, name, version, actor=actor(token), reason=reason)
    return Response(status_code=204)


@router.get("/bundles/{name}/{version}/archive", tags=["bundles"])
def download_archive(name: str, version: str, request: Request, ctx: CtxDep) -> Response:
    """The whole archive (Range supported), for an API token or any enrolled device."""
    secret = bearer(request)
    with ctx.sessions() as session, session.begin():
        if secret is not None and secret.startswith(DEVICE_PREFIX):
            devices.authenticate_device(session, secret)
        else:
            tokens.require(tokens.authenticate(session, secret), Role.VIEWER)
        bundles.get_bundle(session, name, version)
    return blob_response(ctx.storage, bundles.archive_key(name, version), filename=f"{name}-{version}.edgepack")


@router.put("/admin/trust/targets", tags=["trust"])
async def put_targets(request: Request, ctx: CtxDep, token: Operator) -> dict[str, Any]:
    """Newer targets metadata signed offline (e.g. after `edgepack keys raise-floor`)."""
    data = await request.body()
    version = await run_in_threadpool(bundles.upload_targets, ctx, data, actor=actor(token))
    return {"targets_version": version}


# ---- devices -------------------------------------------------------------------------------------------
@router.get("/devices", tags=["devices"])
def list_devices(ctx: CtxDep, _: Viewer, group: str | None = None, hardware_id: str | None = None,
                 tag: list[str] = Query(default=[]), limit: int = 1000, offset: int = 0) -> dict[str, Any]:
    try:
        tags = dict(t.split("=", 1) for t in tag)
    except ValueError:
        raise BadRequest("tag filters are key=value") from None
    with ctx.sessions() as session, session.begin():
        total, rows = devices.list_devices(session, group=group, tag=tags, hardware_id=hardware_id,
                                           limit=limit, offset=offset)
        by_id = {b.id: b for b in session.query(Bundle).all()}
        return {"total": total, "devices": devices.with_telemetry(session, [devices.device_view(d, by_id)
                                                                              for d in rows])}


@router.get("/devices/{device_id}", tags=["devices"])
def get_device(device_id: str, ctx: CtxDep, _: Viewer) -> dict[str, Any]:
    with ctx.sessions() as session, session.begin():
        device = devices.get_device(session, device_id)
        by_id = {b.id: b for b in session.query(Bundle).all()}
        return devices.with_telemetry(session, [devices.device_view(device, by_id)])[0]


@router.patch("/devices/{device_id}", tags=["devices"])
def patch_device(device_id: str, body: DevicePatch, ctx: CtxDep, token: Operator) -> dict[str, Any]:
    device = devices.update_device(ctx, device_id, group=body.group, tags=body.tags, actor=actor(token))
    return devices.device_view(device)


@router.post("/devices/{device_id}/revoke", tags=["devices"])
def revoke_device(device_id: str, ctx: CtxDep, token: Operator, body: ActionRequest | None = None) -> dict[str, Any]:
    """Revoke a device: credential and broker account deleted at once (it is disconnected). Idempotent."""
    device = devices.revoke_device(ctx, device_id, actor=actor(token), reason=(body.reason if body else ""))
    return devices.device_view(device)


@router.post("/admin/enrollment-tokens", status_code=201, tags=["devices"])
def create_enrollment_token(body: EnrollmentTokenCreate, ctx: CtxDep, token: Operator) -> dict[str, Any]:
    from datetime import timedelta

    ttl = timedelta(seconds=body.ttl_s or ctx.settings.enrollment_token_ttl_s)
    with ctx.sessions() as session, session.begin():
        row, secret = tokens.create_enrollment_token(session, uses=body.uses, ttl=ttl, group=body.group,
                                                     tags=body.tags, actor=actor(token), now=ctx.clock())
        return {"id": row.id, "token": secret, "uses": row.uses_left, "expires_at": row.expires_at.isoformat(),
                "group": row.group_name, "tags": row.tags}


# ---- rollouts ------------------------------------------------------------------------------------------
@router.post("/rollouts", status_code=201, tags=["rollouts"])
def create_rollout(body: RolloutCreate, ctx: CtxDep, token: Operator) -> dict[str, Any]:
    rollout, _ = rollouts.create_rollout(ctx, body.to_request(), actor=actor(token))
    return rollouts.rollout_status(ctx, rollout.id)


@router.get("/rollouts", tags=["rollouts"])
def list_rollouts(ctx: CtxDep, _: Viewer, state: str | None = None) -> list[dict[str, Any]]:
    with ctx.sessions() as session, session.begin():
        return [rollouts.rollout_summary(r) for r in rollouts.list_rollouts(session, state)]


@router.get("/rollouts/{rollout_id}", tags=["rollouts"])
def rollout_status(rollout_id: str, ctx: CtxDep, _: Viewer) -> dict[str, Any]:
    return rollouts.rollout_status(ctx, rollout_id)


@router.post("/rollouts/{rollout_id}/{action}", tags=["rollouts"])
def rollout_action(rollout_id: str, action: str, ctx: CtxDep, token: Operator,
                   body: ActionRequest | None = None) -> dict[str, Any]:
    """start | pause | resume | advance | abort | rollback, with a reason for the audit log."""
    manual = {a.value: a for a in (Action.START, Action.PAUSE, Action.RESUME, Action.ADVANCE, Action.ABORT,
                                   Action.ROLLBACK)}
    if action not in manual:
        raise BadRequest(f"unknown action {action!r}; use {', '.join(manual)}")
    rollouts.act(ctx, rollout_id, manual[action], actor=actor(token), reason=(body.reason if body else ""))
    return rollouts.rollout_status(ctx, rollout_id)


@router.get("/rollouts/{rollout_id}/devices", tags=["rollouts"])
def rollout_members(rollout_id: str, ctx: CtxDep, _: Viewer) -> list[dict[str, Any]]:
    """Members with their cohort bucket, phase and current assignment."""
    with ctx.sessions() as session, session.begin():
        return rollouts.rollout_devices(session, rollout_id)


@router.get("/rollouts/{rollout_id}/audit", tags=["rollouts"])
def rollout_audit(rollout_id: str, ctx: CtxDep, _: Viewer) -> list[dict[str, Any]]:
    with ctx.sessions() as session, session.begin():
        rollouts.get_rollout(session, rollout_id)
        return rollouts.audit_entries(session, rollout_id)


@router.get("/audit", tags=["admin"])
def audit_log(ctx: CtxDep, _: Viewer, limit: int = 200) -> list[dict[str, Any]]:
    with ctx.sessions() as session, session.begin():
        return rollouts.audit_entries(session, None, limit)


# ---- tokens and stats ----------------------------------------------------------------------------------
@router.post("/admin/tokens", status_code=201, tags=["admin"])
def create_token(body: TokenCreate, ctx: CtxDep, token: Admin) -> dict[str, Any]:
    with ctx.sessions() as session, session.begin():
        row, secret = tokens.create_api_token(session, name=body.name, role=Role.parse(body.role),
                                              actor=actor(token), now=ctx.clock())
        return {"id": row.id, "name": row.name, "role": row.role, "token": secret}


@router.get("/admin/tokens", tags=["admin"])
def list_tokens(ctx: CtxDep, _: Admin) -> list[dict[str, Any]]:
    with ctx.sessions() as session, session.begin():
        return [{"id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at.isoformat(),
                 "revoked": t.revoked_at is not None} for t in tokens.list_tokens(session)]


@router.delete("/admin/tokens/{token_id}", status_code=204, tags=["admin"])
def revoke_token(token_id: str, ctx: CtxDep, token: Admin) -> Response:
    with ctx.sessions() as session, session.begin():
        tokens.revoke_token(session, token_id, actor=actor(token), now=ctx.clock())
    return Response(status_code=204)


@router.get("/admin/stats", tags=["admin"])
def stats(ctx: CtxDep, _: Viewer) -> dict[str, Any]:
    """This replica's counters, summed over its worker processes (telemetry ingested, duplicates, drops by
    reason, notices sent); the same figures as /metrics. ``telemetry`` is fleet-wide, from the database:
    messages lost (left a device's outbox before the server stored them) and device seq resets."""
    with ctx.sessions() as session:
        totals = devices.telemetry_totals(session)
    return {"counters": ctx.counters.snapshot(), "telemetry": totals}


