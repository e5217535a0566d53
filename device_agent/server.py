"""The update server's device API (docs/protocol.md): enroll and check in. Thin: JSON in, JSON out.

HTTP errors are translated here: 5xx and network failures are transient
(:class:`~device_agent.errors.TransportError`), 4xx are the server's refusal
(:class:`~device_agent.errors.ServerError`, with the protocol's error code and message).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from device_agent.errors import ServerError, TransportError
from device_agent.transport import HttpResponse, Transport

API = "/api/v1"


@dataclass(frozen=True)
class CheckinAnswer:
    assignment: bytes | None
    """The signed assignment, exactly as the server sent it (verified by the caller)."""
    poll_interval_s: float | None
    server_time: str | None
    committed_seq: int | None = None
    """The server's committed telemetry high-water mark for this device (``telemetry.committed_seq``);
    None from a server that does not report it."""


def _decode(resp: HttpResponse, what: str) -> Any:
    if resp.status >= 500:
        raise TransportError(f"{what}: server error HTTP {resp.status}", code=f"http_{resp.status}",
                             detail={"body": resp.body[:300].decode(errors="replace")})
    try:
        doc = json.loads(resp.body) if resp.body else None
    except ValueError:
        doc = None
    if resp.status >= 400:
        err = doc.get("error", {}) if isinstance(doc, dict) and isinstance(doc.get("error"), dict) else {}
        raise ServerError(f"{what}: HTTP {resp.status} {err.get('code', '')}: {err.get('message', '')}".strip(),
                          status=resp.status, code=str(err.get("code") or f"http_{resp.status}"),
                          detail={"detail": err.get("detail")} if err.get("detail") else None)
    return doc


class ServerClient:
    def __init__(self, base_url: str, transport: Transport, *, timeout_s: float = 15.0) -> None:
        self.base = base_url.rstrip("/")
        self.transport = transport
        self.timeout_s = timeout_s

    def enroll(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.transport.request("POST", f"{self.base}{API}/devices/enroll",
                                      headers={"Content-Type": "application/json"},
                                      body=json.dumps({"enrollment_token": token, **body}).encode(),
                                      timeout=self.timeout_s)
        doc = _decode(resp, "enrollment")
        if not isinstance(doc, dict) or not isinstance(doc.get("credential"), str):
            raise ServerError("enrollment answer lacks the credential", status=resp.status, code="bad_answer")
        return doc

    def checkin(self, device_id: str, credential: str, body: dict[str, Any]) -> CheckinAnswer:
        resp = self.transport.request("POST", f"{self.base}{API}/devices/{device_id}/checkin",
                                      headers={"Content-Type": "application/json",
                                               "Authorization": f"Bearer {credential}"},
                                      body=json.dumps(body).encode(), timeout=self.timeout_s)
        doc = _decode(resp, "check-in")
        if not isinstance(doc, dict):
            raise ServerError("check-in answer is not a JSON object", status=resp.status, code="bad_answer")
        assignment = doc.get("assignment")
        if assignment is not None and not isinstance(assignment, str):
            raise ServerError("check-in answer: assignment must be the signed JSON text or null",
                              status=resp.status, code="bad_answer")
        poll = doc.get("poll_interval_s")
        tel = doc.get("telemetry")
        committed = tel.get("committed_seq") if isinstance(tel, dict) else None
        return CheckinAnswer(assignment.encode() if assignment is not None else None,
                             float(poll) if isinstance(poll, (int, float)) else None, doc.get("server_time"),
                             committed if isinstance(committed, int) and not isinstance(committed, bool) else None)
