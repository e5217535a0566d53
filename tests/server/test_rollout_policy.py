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
    next_state,
    percentile_from_histogram,
    phase_of,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
SPEC = RolloutSpec(phases=tuple(PhaseSpec(p, 600, 5) for p in (1, 10, 50, 100)),
                   gates=GateSpec(min_accuracy=0.8))
LAT_FAST = (0, 500, 400, 100, 0, 0, 0, 0, 0, 0, 0)  # p95 ~ 4.5 ms
LAT_SLOW = (0, 0, 0, 100, 500, 400, 0, 0, 0, 0, 0)  # p95 ~ 42 ms
HEALTHY = GroupStats(devices_reporting=10, requests=1000, errors=5, feedback_count=500, feedback_correct=460,
                     latency_counts=LAT_FAST, crashed_devices=0, devices_with_events=10, failed_devices=0)
CONTROL = replace(HEALTHY, feedback_correct=465)


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
    ("empty phase advances after soak", stats(phase=0, members={1: 5}, reporting={}), Verdict.ADVANCE, False, "0/0"),
    ("final phase completes", stats(phase=3, reporting={0: 2, 1: 8, 2: 30, 3: 40}), Verdict.COMPLETE, False,
     "final phase"),
    ("paused never advances", stats(state=RolloutState.PAUSED), Verdict.NONE, False, "paused"),
    ("created is not evaluated", stats(state=RolloutState.CREATED), Verdict.NONE, False, "created"),
    ("crash rate breach halts + rolls back",
     stats(soaked_s=5, target=replace(HEALTHY, crashed_devices=1)), Verdict.HALT, True, "crash_rate 0.1 > 0.05"),
    ("breach halts even while paused",
     stats(state=RolloutState.PAUSED, target=replace(HEALTHY, failed_devices=2)), Verdict.HALT, True,
     "install_failure_rate 0.2 > 0.05"),
    ("error rate breach", stats(target=replace(HEALTHY, errors=50)), Verdict.HALT, True, "error_rate 0.05 > 0.02"),
    ("error rate ignored below min_requests", stats(target=replace(HEALTHY, requests=50, errors=10)),
     Verdict.ADVANCE, False, ""),
    ("accuracy floor", stats(target=replace(HEALTHY, feedback_correct=350), control=replace(CONTROL,
                                                                                          feedback_correct=350)),
     Verdict.HALT, True, "accuracy 0.7 < 0.8"),
    ("accuracy drop against control", stats(target=replace(HEALTHY, feedback_correct=440)), Verdict.HALT, True,
     "accuracy_drop"),
    ("accuracy not judged on little feedback",
     stats(target=replace(HEALTHY, feedback_count=10, feedback_correct=1)), Verdict.ADVANCE, False, ""),
    ("p95 latency regression", stats(target=replace(HEALTHY, latency_counts=LAT_SLOW)), Verdict.HALT, True,
     "p95_latency_regression"),
    ("no control: comparative gates have no data", stats(control=GroupStats()), Verdict.ADVANCE, False, ""),
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
    decision = decide(spec, stats(target=replace(HEALTHY, crashed_devices=3)), NOW)
    assert decision.verdict is Verdict.HALT and not decision.rollback
    gates = {g.name: g for g in decision.gates}
    assert gates["crash_rate"].status is GateStatus.BREACHED and gates["crash_rate"].value == 0.3
    assert gates["crash_rate"].threshold == 0.05 and gates["crash_rate"].detail == "3/10 devices"
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


@pytest.mark.parametrize(("require", "target", "verdict", "reason"), [
    ((), replace(HEALTHY, feedback_count=10, feedback_correct=9), Verdict.ADVANCE, "soaked"),
    (("accuracy_drop",), replace(HEALTHY, feedback_count=10, feedback_correct=9), Verdict.NONE,
     "waiting for gate data: accuracy_drop"),
    (("accuracy_drop",), HEALTHY, Verdict.ADVANCE, "soaked"),
])
def test_require_data_holds_a_phase_until_the_gate_counts(require: tuple[str, ...], target: GroupStats,
                                                          verdict: Verdict, reason: str) -> None:
    spec = replace(SPEC, gates=replace(SPEC.gates, require_data=require))
    decision = decide(spec, stats(target=target), NOW)
    assert decision.verdict is verdict and reason in decision.reason


def test_require_data_names_known_gates() -> None:
    with pytest.raises(ValueError, match="unknown gates"):
        GateSpec(require_data=("accurcy",))
    assert RolloutSpec.from_dict(replace(SPEC, gates=GateSpec(require_data=["accuracy"])).to_dict()).gates \
        .require_data == ("accuracy",)
