"""Device-side endpoints (docs/protocol.md): enroll, check in, read the own assignment."""

from __future__ import annotations

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
    device, credential = devices.enroll(ctx, body.model_dump())
    s = ctx.settings
    return {"device_id": device.id, "credential": credential,
            "mqtt": {"url": s.mqtt_public_url or s.mqtt_url or None,
                     "topic_prefix": f"{s.mqtt_topic_prefix}/{device.id}"},
            "image_repo_url": f"{s.effective_public_url}/tuf/image/", "poll_interval_s": s.poll_interval_s}


@router.post("/{device_id}/checkin", response_model=CheckinResponse)
async def checkin(device_id: str, body: CheckinRequest, ctx: CtxDep, credential: CredentialDep) -> dict[str, Any]:
    """Report inventory; get the signed assignment (or null)."""
    return await run_in_threadpool(devices.checkin, ctx, device_id, credential, body.model_dump(exclude_unset=True))


@router.get("/{device_id}/assignment")
def assignment(device_id: str, ctx: CtxDep, credential: CredentialDep) -> Response:
    """The device's own signed assignment; 204 when it has none."""
    text = devices.assignment(ctx, device_id, credential)
    if text is None:
        return Response(status_code=204)
    return Response(text, media_type="application/json")
