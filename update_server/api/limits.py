"""Request body limits, enforced before and while a body is read.

Every route has a limit (:func:`body_limit`, a pure function of method, path and settings): the device
routes take small JSON (``max_device_request_bytes``, 64 KiB), a bundle upload ``max_upload_bytes``,
targets metadata the size the bundle library accepts, everything else ``max_request_bytes`` (1 MiB).

:class:`BodyLimitMiddleware` refuses a request whose ``Content-Length`` is above the limit with 413 before a
byte of the body is read, and counts the bytes of a body sent without one (chunked): once the count passes
the limit the application stops receiving, whatever it was doing with the body is dropped, and the client
gets the same 413. Both answers carry ``Connection: close``, so the server does not read (or wait for) the
rest of a body it refused. The application below never holds more than the limit of any request body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

from bundles.trust import MAX_TARGETS_BYTES
from update_server.errors import PayloadTooLarge
from update_server.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Limit(NamedTuple):
    bytes: int
    setting: str
    """What an operator changes to raise it (named in the 413 message)."""


_DEVICE_POST = re.compile(r"^/api/v1/devices/(enroll|[^/]+/checkin)$")


def body_limit(method: str, path: str, settings: Settings) -> Limit:
    """The largest request body accepted by ``method path``."""
    if method == "POST" and path == "/api/v1/bundles":
        return Limit(settings.max_upload_bytes, "max_upload_bytes")
    if method == "PUT" and path == "/api/v1/admin/trust/targets":
        return Limit(MAX_TARGETS_BYTES, "the bundle library's MAX_TARGETS_BYTES")
    if method == "POST" and _DEVICE_POST.match(path):
        return Limit(settings.max_device_request_bytes, "max_device_request_bytes")
    return Limit(settings.max_request_bytes, "max_request_bytes")


def too_large(limit: Limit, declared: int | None) -> PayloadTooLarge:
    size = f"{declared} bytes declared" if declared is not None else f"more than {limit.bytes} bytes sent"
    return PayloadTooLarge(f"request body too large: {size}, this endpoint accepts at most {limit.bytes} bytes "
                           f"(server setting {limit.setting})", code="body_too_large",
                           detail={"limit": limit.bytes, "declared": declared, "setting": limit.setting})


class _BodyTooLarge(Exception):
    """Raised into the application by the counting ``receive``: it stops reading the body."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before we see it
    return None


class BodyLimitMiddleware:
    """Pure ASGI middleware (see the module docstring); ``limit_for(method, path)`` gives each request's limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], Limit]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit.bytes:
            await _refuse(send, too_large(limit, declared))
            return
        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the application's answer to a body we cut short; ours replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await _refuse(send, too_large(limit, None))


async def _refuse(send: Send, error: PayloadTooLarge) -> None:
    from update_server.api.errors import error_body

    body = json.dumps(error_body(error.code, error.message, error.detail)).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
