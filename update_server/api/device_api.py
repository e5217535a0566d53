"""Device-side endpoints (docs/protocol.md): enroll, check in, read the own assignment."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from update_server.api.deps import CredentialDep, CtxDep
from update_server.schemas import CheckinRequest, CheckinResponse, EnrollRequest
from update_server.services import devices

router = APIRouter(prefix="/api/v1/devices", tags=["device"])


@router.post("/enroll", status_code=201)
def enroll(body: EnrollRequest, ctx: CtxDep) -> dict[str, Any]:
    """Trade a one-time enrollment token for this device's own credential."""
    device, credential, account = devices.enroll(ctx, body.model_dump())
    s = ctx.settings
    mqtt: dict[str, Any] = {"url": s.mqtt_public_url or s.mqtt_url or None,
                            "topic_prefix": f"{s.mqtt_topic_prefix}/{device.id}"}
    if account is not None:
        mqtt.update(username=account.username, password=account.password, client_id=account.client_id)
    return {"device_id": device.id, "credential": credential, "mqtt": mqtt,
            "image_repo_url": f"{s.effective_public_url}/tuf/image/", "poll_interval_s": s.poll_interval_s}


@router.post("/{device_id}/checkin", response_model=CheckinResponse)
async def checkin(device_id: str, body: CheckinRequest, ctx: CtxDep, credential: CredentialDep) -> Response:
    """Report inventory; get the signed assignment (or null)."""
    req = body.model_dump(exclude_unset=True)
    if ctx.checkin_pool is not None:  # PostgreSQL: awaited on psycopg's async connections, no thread
        result = await devices.checkin_async(ctx, device_id, credential, req)
    else:
        # SQLite: in a worker thread. On the event loop it would stall every request (even /healthz) while it
        # waits for the one connection, which a bundle upload or the ingester may hold for seconds.
        result = await run_in_threadpool(devices.checkin, ctx, device_id, credential, req)
    return Response(json.dumps(result), media_type="application/json")  # hot path: skip re-validation


@router.get("/{device_id}/assignment")
def assignment(device_id: str, ctx: CtxDep, credential: CredentialDep) -> Response:
    """The device's own signed assignment; 204 when it has none."""
    text = devices.assignment(ctx, device_id, credential)
    if text is None:
        return Response(status_code=204)
    return Response(text, media_type="application/json")
