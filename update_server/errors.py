"""The update server's domain errors; one handler (``api.errors``) maps them to HTTP once.

Tree (HTTP status in brackets)::

    ServerError
    ├── BadRequest          [400] malformed request
    ├── Unauthorized        [401] missing or invalid credential or token
    ├── Forbidden           [403] valid credential, not allowed here (another device, too low a role)
    ├── NotFound            [404] unknown id
    ├── Conflict            [409] immutable bundle exists, device id taken, conflicting rollout, bad transition
    ├── PayloadTooLarge     [413] upload above the configured limit
    ├── RangeNotSatisfiable [416] a Range outside the file
    ├── InvalidContent      [422] a bundle or metadata that failed verification (detail says which check)
    └── Unavailable         [503] the database (or another dependency) is down; retry later

Every error carries a machine-readable ``code``, a message that says what is wrong and what to do, and an
optional ``detail`` dict.
"""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.detail = detail or {}


class BadRequest(ServerError):
    status, code = 400, "bad_request"


class Unauthorized(ServerError):
    status, code = 401, "unauthorized"


class Forbidden(ServerError):
    status, code = 403, "forbidden"


class NotFound(ServerError):
    status, code = 404, "not_found"


class Conflict(ServerError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServerError):
    status, code = 413, "too_large"


class RangeNotSatisfiable(ServerError):
    status, code = 416, "bad_range"


class InvalidContent(ServerError):
    status, code = 422, "invalid_content"


class Unavailable(ServerError):
    status, code = 503, "unavailable"


def verification_detail(exc: Exception) -> dict[str, Any]:
    """The 422 detail of a bundle library error: its class, file, expected and found values."""
    out: dict[str, Any] = {"error": type(exc).__name__, "message": getattr(exc, "message", str(exc))}
    for key in ("path", "expected", "found"):
        value = getattr(exc, key, None)
        if value is not None:
            out["file" if key == "path" else key] = value if isinstance(value, (int, float, bool)) else str(value)
    return out
