"""The pure decisions behind the agent's fault handling, as tables of cases; and the persisted record's
compatibility with what an older agent wrote (an agent upgraded in place must resume)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest

from device_agent.guards import Space, clock_verdict, loop_verdict, raise_floor, retry_delay, space_verdict
from device_agent.states import State
from device_agent.store import KEEP, Attempts, Change, StateRecord

MB = 1 << 20


@pytest.mark.parametrize("state, boots, expected", [
    (State.IDLE, {"idle": 50}, None),                           # no update to abandon
    (State.VERIFYING, {"verifying": 3}, None),                  # at the limit: one more try
    (State.VERIFYING, {"verifying": 4}, ("boot_loop", 3)),
    (State.ACTIVATING, {"verifying": 9, "activating": 1}, None),  # counted per state
    (State.ACTIVATING, {"activating": 4}, ("boot_loop", 3)),
    (State.TRIAL, {"trial": 3}, None),
    (State.TRIAL, {"trial": 3, "activating": 2}, None),
    (State.TRIAL, {"trial": 2 + 2}, ("trial_restarts", 2)),     # the trial keeps its own limit
    (State.ROLLING_BACK, {"rolling_back": 4}, ("boot_loop", 3)),
])
def test_loop_verdict(state: State, boots: dict[str, int], expected: tuple[str, int] | None) -> None:
    trial_limit = 2 if expected and expected[0] == "trial_restarts" else 3
    verdict = loop_verdict(state, boots, limit=3, trial_limit=trial_limit)
    assert (None if verdict is None else (verdict.reason, verdict.limit)) == expected
    if verdict is not None:
        assert verdict.boots == boots[state.value] and verdict.state is state


@pytest.mark.parametrize("needed, free, total, kept, reserve, expected", [
    (10 * MB, 20 * MB, 100 * MB, 5 * MB, 4 * MB, Space.FITS),
    (10 * MB, 13 * MB, 100 * MB, 5 * MB, 4 * MB, Space.WAIT),     # the reserve does not fit next to it
    (31 * MB, 15 * MB, 20 * MB, 0, 0, Space.NEVER),              # the case: 31.5 MB on 20 MB
    (11 * MB, 1 * MB, 20 * MB, 6 * MB, 4 * MB, Space.NEVER),     # kept bundle + new + reserve > disk
    (11 * MB, 1 * MB, 21 * MB, 6 * MB, 4 * MB, Space.WAIT),
    (0, 0, 20 * MB, 0, 0, Space.FITS),                           # everything downloaded already
])
def test_space_verdict(needed: int, free: int, total: int, kept: int, reserve: int, expected: Space) -> None:
    assert space_verdict(needed=needed, free=free, total=total, kept=kept, reserve=reserve) is expected


NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("now, floor, regressed", [
    (NOW, None, False),
    (NOW, (NOW - timedelta(days=3)).isoformat(), False),
    (NOW, (NOW + timedelta(seconds=299)).isoformat(), False),   # ordinary skew with the server
    (NOW, (NOW + timedelta(seconds=301)).isoformat(), True),
    (NOW - timedelta(days=400), NOW.isoformat(), True),          # RTC reset to an old date
])
def test_clock_verdict(now: datetime, floor: str | None, regressed: bool) -> None:
    verdict = clock_verdict(now, floor, tolerance_s=300)
    assert (verdict is not None) is regressed
    if verdict is not None:
        detail = verdict.detail()
        assert detail["error"] == "clock_regression" and detail["floor"] == floor
        assert "behind" in detail["message"] and detail["behind_s"] > 300


def test_the_floor_only_moves_forward() -> None:
    assert raise_floor(None, NOW) == NOW.isoformat()
    assert raise_floor(NOW.isoformat(), NOW - timedelta(hours=1)) == NOW.isoformat()
    assert raise_floor(NOW.isoformat(), NOW + timedelta(hours=1)) == (NOW + timedelta(hours=1)).isoformat()


def test_retry_delay_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, initial_s=2, max_s=300, rng=rng) for n in range(1, 12)]
    assert all(2 * 2 ** (n - 1) * 0.5 <= d <= 2 * 2 ** (n - 1) for n, d in enumerate(delays[:7], start=1))
    assert all(150 <= d <= 300 for d in delays[8:])


OLD_RECORD = {  # state.json as the agent before this change wrote it, in the middle of a trial
    "schema": 1, "state": "trial",
    "active": {"name": "digits", "version": "1.1.0", "release_counter": 2, "variant": "onnx-fp32",
               "runtime": "onnxruntime", "slot": "digits-1.1.0-aaaaaaaaaaaa",
               "files": {"manifest.json": {"length": 10, "sha256": "a" * 64}}},
    "previous": None,
    "pending": {"name": "digits", "version": "1.1.0", "release_counter": 2, "assignment_version": 7,
                "assignment_digest": "d" * 64, "rollout_id": "r-1", "slot": "digits-1.1.0-aaaaaaaaaaaa",
                "files": {"manifest.json": {"length": 10, "sha256": "a" * 64}}, "variant": "onnx-fp32",
                "runtime": "onnxruntime", "trial_started_at": "2026-11-01T12:00:00.000+00:00", "trial_boots": 2},
    "assignment_version": 7, "refused": None, "last_error": None, "rollout_id": "r-1", "extra": {},
}


def test_a_record_written_by_an_older_agent_resumes_and_keeps_its_trial_count() -> None:
    rec = StateRecord.from_dict(json.loads(json.dumps(OLD_RECORD)))
    assert rec.state is State.TRIAL and rec.pending is not None
    assert rec.pending.trial_boots == 2 and rec.pending.boots == {"trial": 2}
    assert rec.attempts is None and rec.clock_floor is None
    booted = rec.pending.booted(State.TRIAL)
    out = StateRecord.from_dict(rec.evolve(pending=booted).to_dict())
    assert out.pending is not None and out.pending.trial_boots == 3
    written = rec.evolve(pending=booted).to_dict()
    assert written["pending"]["trial_boots"] == 3  # an older agent reading this file still counts the trial
    assert {k for k in OLD_RECORD if k != "pending"} <= set(written)


def test_typed_changes_keep_what_they_do_not_name() -> None:
    rec = StateRecord.from_dict(OLD_RECORD)
    att = Attempts("digits/1.2.0").failed().report("disk_full")
    out = Change(last_error={"error": "disk_full"}, attempts=att).apply(rec, State.IDLE)
    assert out.state is State.IDLE and out.active == rec.active and out.pending == rec.pending
    assert out.last_error == {"error": "disk_full"} and out.attempts == att
    assert Change().rollout_id is KEEP and Change(rollout_id=None).apply(rec, rec.state).rollout_id is None
    again = StateRecord.from_dict(json.loads(json.dumps(out.to_dict())))
    assert again.attempts == att and again.attempts.reported == ("disk_full",)
