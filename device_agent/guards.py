"""Pure decisions of the agent's fault handling: no I/O, no clock inside (``now`` and figures come in).

* :func:`loop_verdict`: has the agent booted too often in one state of one update (a boot loop)?
* :func:`space_verdict`: does a bundle fit in the state directory now, later, or never?
* :func:`clock_verdict`: is the device clock below the newest signed time the agent accepted?
* :func:`retry_delay`: capped exponential backoff with jitter for the n-th failed attempt.

Each is tested with a table of cases (tests/agent/test_guards.py); the agent's step code acts on them.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from device_agent.states import State


@dataclass(frozen=True)
class LoopVerdict:
    """The update must be abandoned: ``boots`` boots in ``state`` exceed ``limit``."""

    state: State
    boots: int
    limit: int
    reason: str
    """``boot_loop``; ``trial_restarts`` in the trial (its own, older limit: ``trial.max_restarts``)."""


def loop_verdict(state: State, boots: dict[str, int], *, limit: int, trial_limit: int) -> LoopVerdict | None:
    """A boot loop when the agent booted more than ``limit`` times in ``state`` during one update.

    The count is persisted *before* the state's step runs, so a step that kills the agent (a kernel OOM kill,
    a watchdog, a power cut timed by the fault) is counted even though it never returns. Mender stops a looping
    update after a fixed number of state saves in the same way. IDLE has no update to abandon: never a loop.
    """
    if state is State.IDLE:
        return None
    n = boots.get(state.value, 0)
    if state is State.TRIAL:
        return LoopVerdict(state, n, trial_limit, "trial_restarts") if n > trial_limit else None
    return LoopVerdict(state, n, limit, "boot_loop") if n > limit else None


class Space(str, enum.Enum):
    FITS = "fits"
    WAIT = "wait"
    """Not enough free space now; enough once other files are deleted: retry later."""
    NEVER = "never"
    """More than the file system can hold next to the bundle(s) the agent keeps: refuse the update."""


def space_verdict(*, needed: int, free: int, total: int, kept: int, reserve: int) -> Space:
    """Whether ``needed`` more bytes (the bundle's signed length minus what is already downloaded) fit.

    Args:
        needed: bytes still to write for the bundle.
        free: free bytes on the state directory's file system now.
        total: size of that file system.
        kept: bytes of bundles the agent must keep meanwhile (the active one, a previous one) plus what the
            bundle already has on disk.
        reserve: bytes always left free for the state file, the outbox and TUF metadata.
    """
    if needed + reserve <= free:
        return Space.FITS
    if needed + kept + reserve > total:
        return Space.NEVER
    return Space.WAIT


@dataclass(frozen=True)
class ClockRegression:
    """The device clock reads ``now`` although the agent already accepted a signed time ``floor``."""

    now: datetime
    floor: datetime
    tolerance_s: float

    def detail(self) -> dict[str, object]:
        behind = (self.floor - self.now).total_seconds()
        return {"error": "clock_regression",
                "message": f"the device clock ({self.now.isoformat()}) is {behind:.0f} s behind the newest signed "
                           f"time this agent accepted ({self.floor.isoformat()}); expiry checks cannot be trusted, "
                           "so updates are refused until the clock is set right (NTP, RTC battery)",
                "clock": self.now.isoformat(), "floor": self.floor.isoformat(), "behind_s": round(behind, 1)}


def clock_verdict(now: datetime, floor: str | None, *, tolerance_s: float) -> ClockRegression | None:
    """A regression when ``now`` is more than ``tolerance_s`` before ``floor`` (ISO 8601, or None: no floor).

    The tolerance absorbs the ordinary skew between the server's clock (which signed ``floor``) and the
    device's; a clock rewound by more than that is refused instead of trusted for expiry checks."""
    if not floor:
        return None
    at = datetime.fromisoformat(floor)
    if now < at - timedelta(seconds=tolerance_s):
        return ClockRegression(now, at, tolerance_s)
    return None


def raise_floor(floor: str | None, seen: datetime) -> str | None:
    """The floor after accepting a signed time ``seen``: it only ever moves forward."""
    if floor is not None and datetime.fromisoformat(floor) >= seen:
        return floor
    return seen.isoformat()


def retry_delay(attempt: int, *, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``attempt`` (1-based): ``initial_s * 2**(attempt-1)``, capped, jittered to
    50-100 % so a fleet that failed together does not retry together."""
    delay = min(max_s, initial_s * 2.0 ** max(0, attempt - 1))
    return delay * (rng or random).uniform(0.5, 1.0)
