"""Time as a dependency. Decision code takes ``now`` from a :class:`Clock`; tests and the fleet simulator
pass their own (python-tuf's ``is_expired(reference_time)`` is the model)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC (expiry checks, timestamps in telemetry)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, latencies)."""
        ...

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Sleep up to ``seconds`` or until ``event`` is set; True when the event is set."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds))


def iso(ts: datetime) -> str:
    """ISO 8601 with milliseconds and offset, as the protocol writes times."""
    return ts.isoformat(timespec="milliseconds")
