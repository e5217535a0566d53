"""The update state machine as data: a closed set of states and events and one transition table.

Each state names the step the agent performs *next*; the state is persisted (atomically) before that
step runs, so a restart re-runs the step, and every step is idempotent. Resume is a table lookup:
``next_state(persisted_state, Event.BOOT)``. One line per edge, as in mender's state machine::

    IDLE ──assignment──▶ DOWNLOADING ──downloaded──▶ VERIFYING ──verified──▶ SELFTEST
      ▲                      │ retry/failed              │ failed              │ passed
      │◀─────────────────────┘◀──────────────────────────┘◀──failed────────────┤
      │                                                                        ▼
      │◀──committed── COMMITTING ◀──trial_passed── TRIAL ◀──activated── ACTIVATING
      │                                              │ trial_failed           │ failed
      └◀──rolled_back── ROLLING_BACK ◀───────────────┴────────────────────────┘
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    IDLE = "idle"
    """Serving the active bundle (or none); checking in every poll interval or when notified."""
    DOWNLOADING = "downloading"
    """Fetching the assigned bundle's files into the staging directory (resumable ``.part`` files)."""
    VERIFYING = "verifying"
    """Checking every staged file against the offline-signed targets; moving it into its slot."""
    SELFTEST = "selftest"
    """Loading the new bundle in a fresh worker and running its golden vectors."""
    ACTIVATING = "activating"
    """Switching the active bundle (one atomic state write) and the serving worker."""
    TRIAL = "trial"
    """Serving the new bundle; a crash or failed health check rolls back, the end of the period commits."""
    COMMITTING = "committing"
    """Deleting the previous bundle; the new one becomes the only one on disk."""
    ROLLING_BACK = "rolling_back"
    """Serving the previous bundle again and deleting the failed one."""


class Event(str, enum.Enum):
    BOOT = "boot"
    ASSIGNMENT = "assignment"
    NO_CHANGE = "no_change"
    DOWNLOADED = "downloaded"
    RETRY = "retry"
    FAILED = "failed"
    VERIFIED = "verified"
    SELFTEST_PASSED = "selftest_passed"
    ACTIVATED = "activated"
    TRIAL_PASSED = "trial_passed"
    TRIAL_FAILED = "trial_failed"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.BOOT): S.IDLE,
    (S.IDLE, E.NO_CHANGE): S.IDLE,
    (S.IDLE, E.RETRY): S.IDLE,
    (S.IDLE, E.ASSIGNMENT): S.DOWNLOADING,
    (S.DOWNLOADING, E.BOOT): S.DOWNLOADING,
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.DOWNLOADING, E.RETRY): S.IDLE,          # transient: back off, check in again, resume the .part files
    (S.DOWNLOADING, E.FAILED): S.IDLE,         # refused (corrupt, too large): report, keep serving
    (S.VERIFYING, E.BOOT): S.VERIFYING,
    (S.VERIFYING, E.VERIFIED): S.SELFTEST,
    (S.VERIFYING, E.FAILED): S.IDLE,
    (S.SELFTEST, E.BOOT): S.SELFTEST,
    (S.SELFTEST, E.SELFTEST_PASSED): S.ACTIVATING,
    (S.SELFTEST, E.FAILED): S.IDLE,
    (S.ACTIVATING, E.BOOT): S.ACTIVATING,
    (S.ACTIVATING, E.ACTIVATED): S.TRIAL,
    (S.ACTIVATING, E.FAILED): S.ROLLING_BACK,
    (S.TRIAL, E.BOOT): S.TRIAL,
    (S.TRIAL, E.TRIAL_PASSED): S.COMMITTING,
    (S.TRIAL, E.TRIAL_FAILED): S.ROLLING_BACK,
    (S.COMMITTING, E.BOOT): S.COMMITTING,
    (S.COMMITTING, E.COMMITTED): S.IDLE,
    (S.ROLLING_BACK, E.BOOT): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.IDLE,
}


class TransitionError(Exception):
    """An event that the table does not allow in this state: a bug, never a runtime condition."""


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state.value} on {event.value}") from None


UPDATE_STATES = frozenset(S) - {S.IDLE}
"""States in which an update is in progress (``pending`` is set in the persisted record)."""
