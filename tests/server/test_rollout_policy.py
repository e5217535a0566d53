"""The pure rollout decision, tested with tables of cases (no database, no clock, no broker)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from update_server.rollout_policy import (
    TRANSITIONS,
    Action,
    BreachPolicy,
    GateSpec,
    GateStatus,
    GroupStats,
    IllegalTransition,
    PhaseSpec,
    Progress,
    RolloutSpec,
    RolloutState,
    RolloutStats,
    Verdict,
    cohort_bucket,
    decide,
    devices_to_halt,
    next_state,
    percentile_from_histogram,
    phase_of,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
SPEC = RolloutSpec(phases=tuple(PhaseSpec(p, 600, 5) for p in (1, 10, 50, 100)),
                   gates=GateSpec(min_accuracy=0.8))
LAT_FAST = tuple(100 * c for c in (0, 500, 400, 100, 0, 0, 0, 0, 0, 0, 0))  # p95 ~ 4.5 ms
LAT_SLOW = tuple(100 * c for c in (0, 0, 0, 100, 500, 400, 0, 0, 0, 0, 0))  # p95 ~ 42 ms
# enough data that every interval is decisive: 20,000 labels and 100,000 requests per group
HEALTHY = GroupStats(devices_reporting=10, requests=100_000, errors=500, feedback_count=20_000,
                     feedback_correct=18_400, latency_counts=LAT_FAST, crashed_devices=0, devices_with_events=10,
                     failed_devices=0)
CONTROL = replace(HEALTHY, feedback_correct=18_500)


def stats(*, state: RolloutState = RolloutState.RUNNING, phase: int = 1, soaked_s: float = 700,
          members: dict[int, int] | None = None, reporting: dict[int, int] | None = None,
          target: GroupStats = HEALTHY, control: GroupStats = CONTROL) -> RolloutStats:
    return RolloutStats(progress=Progress(state, phase, NOW - timedelta(seconds=soaked_s)),
                        members_by_phase=members if members is not None else {0: 2, 1: 10, 2: 40, 3: 48},
                        reporting_by_phase=reporting if reporting is not None else {0: 2, 1: 8},
                        target=target, control=control)


CASES = [
    # (id, stats, verdict, rollback, reason fragment)
    ("advance when soaked with enough devices", stats(), Verdict.ADVANCE, False, "phase 1 soaked"),
    ("soaking", stats(soaked_s=100), Verdict.NONE, False, "soaking: 100/600"),
    ("too few reporting devices", stats(reporting={0: 1, 1: 1}), Verdict.NONE, False, "waiting for devices: 2/5"),
    ("small phase: required capped at members", stats(phase=0, members={0: 2}, reporting={0: 2}),
     Verdict.ADVANCE, False, "2/2"),
    ("final phase completes", stats(phase=3, reporting={0: 2, 1: 8, 2: 30, 3: 40}), Verdict.COMPLETE, False,
     "final phase"),
    ("paused never advances", stats(state=RolloutState.PAUSED), Verdict.NONE, False, "paused"),
    ("created is not evaluated", stats(state=RolloutState.CREATED), Verdict.NONE, False, "created"),
    ("crash rate breach halts + rolls back",
     stats(soaked_s=5, target=replace(HEALTHY, crashed_devices=6)), Verdict.HALT, True, "crash_rate 0.6"),
    ("one crashed device of ten is noise, not a breach", stats(target=replace(HEALTHY, crashed_devices=1)),
     Verdict.ADVANCE, False, ""),
    ("breach halts even while paused",
     stats(state=RolloutState.PAUSED, target=replace(HEALTHY, failed_devices=6)), Verdict.HALT, True,
     "install_failure_rate 0.6"),
    ("error rate breach", stats(target=replace(HEALTHY, errors=5000)), Verdict.HALT, True, "error_rate 0.05"),
    ("error rate unproven below min_requests", stats(target=replace(HEALTHY, requests=50, errors=1)),
     Verdict.NONE, False, "error_rate unproven"),
    ("accuracy floor", stats(target=replace(HEALTHY, feedback_correct=14_000),
                             control=replace(CONTROL, feedback_correct=14_000)),
     Verdict.HALT, True, "accuracy 0.7"),
    ("accuracy drop against control", stats(target=replace(HEALTHY, feedback_correct=17_600)), Verdict.HALT, True,
     "accuracy_drop"),
    ("little feedback waits instead of passing",
     stats(target=replace(HEALTHY, feedback_count=10, feedback_correct=9)), Verdict.NONE, False,
     "accuracy_drop unproven"),
    ("p95 latency regression", stats(target=replace(HEALTHY, latency_counts=LAT_SLOW)), Verdict.HALT, True,
     "p95_latency_regression"),
    ("no control group: comparative gates wait", stats(control=GroupStats()), Verdict.NONE, False,
     "accuracy_drop no_data"),
    ("no device reported: the device gates wait", stats(target=replace(HEALTHY, devices_with_events=0)),
     Verdict.NONE, False, "install_failure_rate no_data"),
]


@pytest.mark.parametrize(("case", "observed", "verdict", "rollback", "reason"), CASES, ids=[c[0] for c in CASES])
def test_decide(case: str, observed: RolloutStats, verdict: Verdict, rollback: bool, reason: str) -> None:
    decision = decide(SPEC, observed, NOW)
    assert decision.verdict is verdict, decision.reason
    assert decision.rollback is rollback
    assert reason in decision.reason
    if verdict is Verdict.ADVANCE:
        assert decision.next_phase == observed.progress.current_phase + 1


def test_halt_policy_and_gate_values() -> None:
    spec = replace(SPEC, on_breach=BreachPolicy.HALT)
    decision = decide(spec, stats(target=replace(HEALTHY, crashed_devices=7)), NOW)
    assert decision.verdict is Verdict.HALT and not decision.rollback
    gates = {g.name: g for g in decision.gates}
    crash = gates["crash_rate"]
    assert crash.status is GateStatus.BREACHED and crash.value == 0.7 and crash.threshold == 0.05
    assert crash.lower is not None and crash.upper is not None and 0.05 < crash.lower < 0.7 < crash.upper
    assert crash.detail.startswith("7/10 devices, interval [")
    assert gates["error_rate"].status is GateStatus.OK and gates["error_rate"].value == 0.005
    off = decide(replace(SPEC, gates=GateSpec(max_crash_rate=None)), stats(), NOW)
    assert {g.name: g.status for g in off.gates}["crash_rate"] is GateStatus.OFF


def test_decide_is_pure() -> None:
    observed = stats()
    assert decide(SPEC, observed, NOW) == decide(SPEC, observed, NOW)


@pytest.mark.parametrize(("counts", "q", "expected"), [
    ((0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0), 0.5, 3.5),   # all in (2, 5]: midpoint by interpolation
    ((10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), 0.95, 0.95),
    ((0,) * 10 + (5,), 0.95, 1000.0),                 # overflow reports the last bound
    ((0,) * 11, 0.95, None),
])
def test_percentile(counts: tuple[int, ...], q: float, expected: float | None) -> None:
    value = percentile_from_histogram(counts, q)
    assert value == (pytest.approx(expected) if expected is not None else None)


def test_cohorts_are_deterministic_and_uniform() -> None:
    assert cohort_bucket("r-1", "dev") == cohort_bucket("r-1", "dev")
    assert cohort_bucket("r-1", "dev") != cohort_bucket("r-2", "dev")
    phases = SPEC.phases
    counts = Counter(phase_of(cohort_bucket("r-x", f"d{i}"), phases) for i in range(20_000))
    assert abs(counts[0] / 20_000 - 0.01) < 0.004
    assert abs((counts[0] + counts[1]) / 20_000 - 0.10) < 0.01
    assert abs(sum(counts[p] for p in (0, 1, 2)) / 20_000 - 0.50) < 0.015


@pytest.mark.parametrize(("state", "action", "expected"), [
    (RolloutState.CREATED, Action.START, RolloutState.RUNNING),
    (RolloutState.RUNNING, Action.PAUSE, RolloutState.PAUSED),
    (RolloutState.PAUSED, Action.RESUME, RolloutState.RUNNING),
    (RolloutState.HALTED, Action.RESUME, RolloutState.RUNNING),
    (RolloutState.RUNNING, Action.HALT, RolloutState.HALTED),
    (RolloutState.COMPLETED, Action.ROLLBACK, RolloutState.ROLLED_BACK),
    (RolloutState.CREATED, Action.PAUSE, None),
    (RolloutState.ABORTED, Action.RESUME, None),
    (RolloutState.ROLLED_BACK, Action.ROLLBACK, None),
    (RolloutState.COMPLETED, Action.ADVANCE, None),
])
def test_transitions(state: RolloutState, action: Action, expected: RolloutState | None) -> None:
    if expected is None:
        with pytest.raises(IllegalTransition):
            next_state(state, action)
    else:
        assert next_state(state, action) is expected


def test_final_states_have_no_way_out() -> None:
    assert not [k for k in TRANSITIONS if k[0] in (RolloutState.ABORTED, RolloutState.ROLLED_BACK)]


@pytest.mark.parametrize("phases", [(10, 50), (0, 100), (50, 10, 100), ()])
def test_invalid_phases(phases: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        RolloutSpec(phases=tuple(PhaseSpec(p, 0, 0) for p in phases))


def test_require_data_is_still_accepted() -> None:
    """Older specs name gates in require_data; every configured gate requires data now, so it is a no-op."""
    spec = replace(SPEC, gates=replace(SPEC.gates, require_data=("accuracy_drop",)))
    assert decide(spec, stats(), NOW).verdict is Verdict.ADVANCE
    with pytest.raises(ValueError, match="unknown gates"):
        GateSpec(require_data=("accurcy",))
    assert RolloutSpec.from_dict(replace(SPEC, gates=GateSpec(require_data=["accuracy"])).to_dict()).gates \
        .require_data == ("accuracy",)


def test_a_phase_without_labels_never_advances_by_default() -> None:
    """The measured failure: 30 devices, a 1-device first phase, no labels yet, a worse release. It used to
    advance on gates that never counted; now it waits, and says which gate lacks what."""
    target = replace(HEALTHY, devices_reporting=1, devices_with_events=1, requests=40, errors=0, feedback_count=0,
                     feedback_correct=0, latency_counts=(0, 20, 20) + (0,) * 8)
    observed = stats(phase=0, soaked_s=10 ** 6, members={0: 1, 1: 2, 2: 12, 3: 15}, reporting={0: 1}, target=target)
    decision = decide(SPEC, observed, NOW)
    assert decision.verdict is Verdict.NONE
    assert "accuracy no_data (no labelled prediction on the target)" in decision.reason
    assert "accuracy_drop no_data" in decision.reason and "error_rate unproven" in decision.reason


def test_allow_unproven_is_an_explicit_opt_out() -> None:
    spec = replace(SPEC, gates=replace(SPEC.gates, allow_unproven=("accuracy_drop", "p95_latency_regression")))
    decision = decide(spec, stats(control=GroupStats()), NOW)
    assert decision.verdict is Verdict.ADVANCE and decision.unproven == ("accuracy_drop", "p95_latency_regression")
    assert "allowed unproven: accuracy_drop, p95_latency_regression" in decision.reason
    # a breach is never waived
    bad = stats(control=GroupStats(), target=replace(HEALTHY, crashed_devices=8))
    assert decide(spec, bad, NOW).verdict is Verdict.HALT
    with pytest.raises(ValueError, match="allow_unproven names unknown gates"):
        GateSpec(allow_unproven=("acc",))
    assert RolloutSpec.from_dict(spec.to_dict()).gates.allow_unproven == ("accuracy_drop", "p95_latency_regression")


def test_devices_to_halt() -> None:
    """At the defaults the crash and install gates need 3 devices all failing; off means no such limit."""
    assert devices_to_halt(GateSpec()) == 3
    assert devices_to_halt(GateSpec(max_crash_rate=None, max_install_failure_rate=None)) is None
    assert devices_to_halt(GateSpec(max_crash_rate=0.5)) <= 3
