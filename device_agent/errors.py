"""The agent's exception tree. Each error says whether retrying can help.

::

    AgentError                       .transient says whether a retry may succeed
    ├── ConfigError                  the TOML file or enrollment is wrong (fatal: fix the file)
    ├── StateError                   the persisted state file is unreadable (fatal: inspect the state dir)
    ├── StorageError                 the disk refused a write: full, over quota, I/O error (transient)
    ├── TransportError               network, timeout, 5xx (transient)
    │   └── DeadlineError            a download exceeded its overall deadline (slow retrieval)
    ├── ServerError                  the server refused a request: 4xx (fatal for this request)
    ├── UpdateRefused                an update failed verification; nothing of it is used (fatal)
    ├── InstallFailed                a verified bundle cannot run here (no runtime, self-test failed)
    ├── WorkerError                  the inference worker died or hung (transient: it is restarted)
    └── PredictionError              a prediction request is wrong (the caller's fault, HTTP 400)

Foreign errors (urllib3, python-tuf, bundles) are translated once, at the seam where they are caught:
``transport.py`` for HTTP, ``fetcher.py`` for TUF, ``update.py`` for bundle verification; an ``OSError``
from a write to the state directory becomes a :class:`StorageError` (``StorageError.from_os``) where it
is written (``store.py``, ``update.py``).
"""

from __future__ import annotations

import errno
from typing import Any

STORAGE_ERRNOS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EIO: "io_error",
                  errno.EROFS: "read_only"}
"""errno values that mean "the disk refused the write" (not a bug, not the network), and their code."""


class AgentError(Exception):
    """Base of every agent error. ``code`` is a stable name used in telemetry ``detail.error``."""

    transient = False

    def __init__(self, message: str, *, code: str | None = None, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).__name__
        self.detail = dict(detail or {})

    def as_detail(self) -> dict[str, Any]:
        """The error as a telemetry ``detail`` object (``error`` + ``message`` + extra fields)."""
        return {"error": self.code, "message": self.message[:2000], **self.detail}


class ConfigError(AgentError):
    """The configuration file or enrollment data is missing or invalid."""


class StateError(AgentError):
    """The persisted state is unreadable or inconsistent."""


class StorageError(AgentError):
    """The state directory refused a write (no space, quota, I/O error, read-only). Retry once space returns.

    ``code`` is ``disk_full``, ``io_error`` or ``read_only``."""

    transient = True

    @classmethod
    def from_os(cls, exc: OSError, what: str) -> StorageError:
        code = STORAGE_ERRNOS.get(exc.errno or 0, "io_error")
        return cls(f"{what}: {exc.strerror or exc}", code=code, detail={"errno": exc.errno})

    @staticmethod
    def matches(exc: BaseException) -> bool:
        """True for an ``OSError`` that means the disk refused a write."""
        return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


class TransportError(AgentError):
    """Network failure, timeout or server-side error (5xx): retry with backoff."""

    transient = True


class DeadlineError(TransportError):
    """A download did not finish within its overall deadline (drip-feed / slow retrieval)."""


class ServerError(AgentError):
    """The server refused the request (4xx). ``status`` is the HTTP status."""

    def __init__(self, message: str, *, status: int, code: str | None = None,
                 detail: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code or f"http_{status}", detail=detail)
        self.status = status


class UpdateRefused(AgentError):
    """The update failed verification (signature, hash, expiry, rollback, hardware, another device)."""


class InstallFailed(AgentError):
    """A verified bundle cannot be installed here: no usable variant or runtime, or the self-test failed."""


class WorkerError(AgentError):
    """The inference worker crashed, hung or could not start."""

    transient = True

    def __init__(self, message: str, *, exitcode: int | None = None, code: str | None = None,
                 detail: dict[str, Any] | None = None) -> None:
        detail = dict(detail or {})
        if exitcode is not None:
            if exitcode < 0:
                detail.setdefault("signal", -exitcode)
            else:
                detail.setdefault("exitcode", exitcode)
        super().__init__(message, code=code, detail=detail)
        self.exitcode = exitcode


class PredictionError(AgentError):
    """The prediction request is malformed or does not fit the model (shape, type, size)."""
