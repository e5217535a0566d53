"""The rollout decision, as pure functions: no database, no clock, no I/O.

``decide(spec, stats, now)`` looks at a rollout's configuration (:class:`RolloutSpec`), what it has
observed so far (:class:`RolloutStats`: its progress and the telemetry aggregates of its devices) and the
time, and says what to do next (:class:`Decision`): nothing, advance to the next phase, complete, or halt
(and, by policy, roll back). The service layer gathers the stats under a row lock, calls ``decide`` and
applies the result, so two replicas evaluating the same rollout at once cannot both act on it.

Cohorts: a device's bucket is a hash of (rollout id, device id) mapped to [0, 100); it belongs to the
first phase whose percentage exceeds its bucket. Membership is therefore stable across pause and resume,
and a device that enrolls later lands in the phase it would have had from the start.

Gates (each reports its value against its threshold; a gate without enough data is ``NO_DATA`` and
neither passes nor blocks):

* ``install_failure_rate``: devices that reported an install failure of the target / devices that
  reported any event about it;
* ``crash_rate``: devices on the target that crashed at least once / devices reporting on the target;
* ``error_rate``: errors / requests on the target (needs ``min_requests``);
* ``accuracy``: feedback correct / feedback count on the target, against an absolute floor;
* ``accuracy_drop``: control accuracy minus target accuracy, against ``max_accuracy_drop``;
* ``p95_latency_regression``: target p95 / control p95 - 1 from merged histograms;
* ``input_drift`` (off unless ``max_input_drift`` is set): the target's worst per-feature PSI against the
  bundle's reference inputs (``update_server.drift``).

The control group is the rollout's devices while on another version than the target (docs/server.md).
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from update_server.drift import InputDrift

LATENCY_BOUNDS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class RolloutState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


ACTIVE_STATES = frozenset({RolloutState.CREATED, RolloutState.RUNNING, RolloutState.PAUSED,
                           RolloutState.HALTED})
"""States in which a rollout owns its devices: no other rollout of the same model may include them."""


class Action(enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    ADVANCE = "advance"
    ABORT = "abort"
    ROLLBACK = "rollback"
    HALT = "halt"
    COMPLETE = "complete"


_S, _A = RolloutState, Action
TRANSITIONS: Mapping[tuple[RolloutState, Action], RolloutState] = {
    (_S.CREATED, _A.START): _S.RUNNING,
    (_S.CREATED, _A.ABORT): _S.ABORTED,
    (_S.RUNNING, _A.PAUSE): _S.PAUSED,
    (_S.RUNNING, _A.ADVANCE): _S.RUNNING,
    (_S.RUNNING, _A.COMPLETE): _S.COMPLETED,
    (_S.RUNNING, _A.HALT): _S.HALTED,
    (_S.RUNNING, _A.ABORT): _S.ABORTED,
    (_S.RUNNING, _A.ROLLBACK): _S.ROLLED_BACK,
    (_S.PAUSED, _A.RESUME): _S.RUNNING,
    (_S.PAUSED, _A.ADVANCE): _S.PAUSED,
    (_S.PAUSED, _A.COMPLETE): _S.COMPLETED,
    (_S.PAUSED, _A.HALT): _S.HALTED,
    (_S.PAUSED, _A.ABORT): _S.ABORTED,
    (_S.PAUSED, _A.ROLLBACK): _S.ROLLED_BACK,
    (_S.HALTED, _A.RESUME): _S.RUNNING,
    (_S.HALTED, _A.ABORT): _S.ABORTED,
    (_S.HALTED, _A.ROLLBACK): _S.ROLLED_BACK,
    (_S.COMPLETED, _A.ROLLBACK): _S.ROLLED_BACK,
}
"""Every allowed (state, action) -> new state; anything else is refused (409)."""


class IllegalTransition(Exception):
    def __init__(self, state: RolloutState, action: Action) -> None:
        allowed = sorted(a.value for (s, a) in TRANSITIONS if s is state)
        super().__init__(f"cannot {action.value} a rollout that is {state.value}; "
                         f"allowed now: {', '.join(allowed) or 'nothing (final state)'}")
        self.state, self.action, self.allowed = state, action, allowed


def next_state(state: RolloutState, action: Action) -> RolloutState:
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        raise IllegalTransition(state, action) from None


class BreachPolicy(enum.Enum):
    ROLLBACK = "rollback"
    """Halt and send every device that got the target back to its previous bundle."""
    HALT = "halt"
    """Halt only; devices keep what they run until an operator decides."""


@dataclass(frozen=True)
class PhaseSpec:
    percent: float
    min_soak_s: float
    min_devices: int
    """Devices of this and earlier phases that must report on the target before advancing (capped at
    the number of such devices, so a small fleet is never stuck)."""


@dataclass(frozen=True)
class GateSpec:
    max_install_failure_rate: float | None = 0.05
    max_crash_rate: float | None = 0.05
    max_error_rate: float | None = 0.02
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = 0.02
    max_p95_latency_regression: float | None = 0.25
    min_requests: int = 100
    min_feedback: int = 50
    max_input_drift: float | None = None
    min_drift_samples: int = 1000
    require_data: tuple[str, ...] = ()
    """Gates that must have data (not ``no_data``) before a phase may advance, e.g. ("accuracy_drop",):
    without it a phase that soaked too briefly to collect labels could advance on gates that never counted."""

    def __post_init__(self) -> None:
        names = tuple(self.require_data)
        unknown = sorted(set(names) - set(GATE_NAMES))
        if unknown:
            raise ValueError(f"require_data names unknown gates {unknown}; known: {list(GATE_NAMES)}")
        object.__setattr__(self, "require_data", names)


GATE_NAMES = ("install_failure_rate", "crash_rate", "error_rate", "accuracy", "accuracy_drop",
              "p95_latency_regression", "input_drift")


@dataclass(frozen=True)
class RolloutSpec:
    phases: tuple[PhaseSpec, ...]
    gates: GateSpec = field(default_factory=GateSpec)
    on_breach: BreachPolicy = BreachPolicy.ROLLBACK

    def __post_init__(self) -> None:
        pct = [p.percent for p in self.phases]
        if not pct or pct[-1] != 100 or pct[0] <= 0 or any(b <= a for a, b in itertools.pairwise(pct)):
            raise ValueError(f"phase percentages must grow strictly from above 0 to 100, got {pct}")
        if any(p.min_soak_s < 0 or p.min_devices < 0 for p in self.phases):
            raise ValueError("min_soak_s and min_devices must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return {"phases": [asdict(p) for p in self.phases], "gates": asdict(self.gates),
                "on_breach": self.on_breach.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutSpec:
        return cls(phases=tuple(PhaseSpec(float(p["percent"]), float(p["min_soak_s"]), int(p["min_devices"]))
                                for p in d["phases"]),
                   gates=GateSpec(**dict(d.get("gates", {}))),
                   on_breach=BreachPolicy(d.get("on_breach", "rollback")))


@dataclass(frozen=True)
class GroupStats:
    """Telemetry sums of one group of devices (target or control)."""

    devices_reporting: int = 0
    """Devices with at least one telemetry window."""
    requests: int = 0
    errors: int = 0
    feedback_count: int = 0
    feedback_correct: int = 0
    latency_counts: tuple[int, ...] = ()
    crashed_devices: int = 0
    devices_with_events: int = 0
    failed_devices: int = 0


@dataclass(frozen=True)
class Progress:
    state: RolloutState
    current_phase: int
    phase_started_at: datetime | None


@dataclass(frozen=True)
class RolloutStats:
    progress: Progress
    members_by_phase: Mapping[int, int]
    """Devices in each phase (cohort), whether or not they report."""
    reporting_by_phase: Mapping[int, int]
    """Devices in each phase that reported a window on the target."""
    target: GroupStats
    control: GroupStats
    drift: InputDrift | None = None
    """The target's input drift since the rollout started (None when not gathered)."""


class GateStatus(enum.Enum):
    OK = "ok"
    BREACHED = "breached"
    NO_DATA = "no_data"
    OFF = "off"


@dataclass(frozen=True)
class GateResult:
    name: str
    status: GateStatus
    value: float | None
    threshold: float | None
    comparison: str
    """How value is compared with threshold: "<=" or ">="."""
    detail: str = ""


class Verdict(enum.Enum):
    NONE = "none"
    ADVANCE = "advance"
    COMPLETE = "complete"
    HALT = "halt"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    gates: tuple[GateResult, ...]
    rollback: bool = False
    next_phase: int | None = None


def cohort_bucket(rollout_id: str, device_id: str) -> float:
    """A device's position in [0, 100) for one rollout: deterministic and uniform."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def phase_of(bucket: float, phases: Sequence[PhaseSpec]) -> int:
    """The first phase whose percentage exceeds ``bucket``."""
    for index, phase in enumerate(phases):
        if bucket < phase.percent:
            return index
    return len(phases) - 1


def percentile_from_histogram(counts: Sequence[int], q: float,
                              bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> float | None:
    """The q-quantile of a histogram (bucket i <= bounds[i], last bucket overflow), interpolated linearly
    inside the bucket; values in the overflow bucket report the last bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            return lower + (float(bounds[i]) - lower) * (rank - seen) / count
        seen += count
    return float(bounds[-1])


def _rate(name: str, num: int, den: int, limit: float | None, *, min_den: int = 1, what: str = "") -> GateResult:
    if limit is None:
        return GateResult(name, GateStatus.OFF, None, None, "<=")
    if den < min_den or den <= 0:
        return GateResult(name, GateStatus.NO_DATA, None, limit, "<=", f"{den}/{min_den} {what}")
    value = num / den
    status = GateStatus.BREACHED if value > limit else GateStatus.OK
    return GateResult(name, status, round(value, 6), limit, "<=", f"{num}/{den} {what}")


def evaluate_gates(gates: GateSpec, target: GroupStats, control: GroupStats, *,
                   drift: InputDrift | None = None) -> tuple[GateResult, ...]:
    """Every gate's value against its threshold."""
    results = [
        _rate("install_failure_rate", target.failed_devices, target.devices_with_events,
              gates.max_install_failure_rate, what="devices"),
        _rate("crash_rate", target.crashed_devices, max(target.devices_reporting, target.crashed_devices),
              gates.max_crash_rate, what="devices"),
        _rate("error_rate", target.errors, target.requests, gates.max_error_rate,
              min_den=gates.min_requests, what="requests"),
    ]
    acc_t = target.feedback_correct / target.feedback_count if target.feedback_count >= gates.min_feedback \
        else None
    acc_c = control.feedback_correct / control.feedback_count if control.feedback_count >= gates.min_feedback \
        else None
    if gates.min_accuracy is None:
        results.append(GateResult("accuracy", GateStatus.OFF, None, None, ">="))
    elif acc_t is None:
        results.append(GateResult("accuracy", GateStatus.NO_DATA, None, gates.min_accuracy, ">=",
                                  f"{target.feedback_count}/{gates.min_feedback} feedback"))
    else:
        results.append(GateResult("accuracy", GateStatus.BREACHED if acc_t < gates.min_accuracy else GateStatus.OK,
                                  round(acc_t, 6), gates.min_accuracy, ">=",
                                  f"{target.feedback_correct}/{target.feedback_count} correct"))
    if gates.max_accuracy_drop is None:
        results.append(GateResult("accuracy_drop", GateStatus.OFF, None, None, "<="))
    elif acc_t is None or acc_c is None:
        results.append(GateResult("accuracy_drop", GateStatus.NO_DATA, None, gates.max_accuracy_drop, "<=",
                                  f"feedback target {target.feedback_count}, control {control.feedback_count}, "
                                  f"need {gates.min_feedback} each"))
    else:
        drop = acc_c - acc_t
        results.append(GateResult("accuracy_drop",
                                  GateStatus.BREACHED if drop > gates.max_accuracy_drop else GateStatus.OK,
                                  round(drop, 6), gates.max_accuracy_drop, "<=",
                                  f"control {acc_c:.4f}, target {acc_t:.4f}"))
    limit = gates.max_p95_latency_regression
    t_n, c_n = sum(target.latency_counts), sum(control.latency_counts)
    if limit is None:
        results.append(GateResult("p95_latency_regression", GateStatus.OFF, None, None, "<="))
    elif t_n < gates.min_requests or c_n < gates.min_requests:
        results.append(GateResult("p95_latency_regression", GateStatus.NO_DATA, None, limit, "<=",
                                  f"latency samples target {t_n}, control {c_n}, need {gates.min_requests} each"))
    else:
        p_t = percentile_from_histogram(target.latency_counts, 0.95) or 0.0
        p_c = percentile_from_histogram(control.latency_counts, 0.95) or 0.0
        value = (p_t / p_c - 1.0) if p_c > 0 else 0.0
        results.append(GateResult("p95_latency_regression",
                                  GateStatus.BREACHED if value > limit else GateStatus.OK,
                                  round(value, 6), limit, "<=", f"p95 control {p_c:.2f} ms, target {p_t:.2f} ms"))
    results.append(_drift_gate(gates, drift))
    return tuple(results)


def _drift_gate(gates: GateSpec, drift: InputDrift | None) -> GateResult:
    limit = gates.max_input_drift
    if limit is None:
        return GateResult("input_drift", GateStatus.OFF, None, None, "<=")
    if drift is None or drift.value is None or drift.samples < gates.min_drift_samples:
        why = drift.reason if drift is not None and drift.reason else \
            f"{drift.samples if drift else 0}/{gates.min_drift_samples} samples"
        return GateResult("input_drift", GateStatus.NO_DATA, None, limit, "<=", why)
    return GateResult("input_drift", GateStatus.BREACHED if drift.value > limit else GateStatus.OK,
                      round(drift.value, 6), limit, "<=", f"worst feature {drift.worst}, {drift.samples} samples")


def required_devices(spec: RolloutSpec, stats: RolloutStats, phase: int) -> tuple[int, int]:
    """(reporting, required) devices of phases 0..phase on the target."""
    members = sum(n for p, n in stats.members_by_phase.items() if p <= phase)
    reporting = sum(n for p, n in stats.reporting_by_phase.items() if p <= phase)
    return reporting, min(spec.phases[phase].min_devices, members)


def decide(spec: RolloutSpec, stats: RolloutStats, now: datetime) -> Decision:
    """What to do with a rollout now. Pure: same inputs, same decision."""
    progress = stats.progress
    gates = evaluate_gates(spec.gates, stats.target, stats.control, drift=stats.drift)
    if progress.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
        return Decision(Verdict.NONE, f"rollout is {progress.state.value}", gates)
    breached = [g for g in gates if g.status is GateStatus.BREACHED]
    if breached:
        why = "; ".join(f"{g.name} {g.value} > {g.threshold}" if g.comparison == "<="
                        else f"{g.name} {g.value} < {g.threshold}" for g in breached)
        return Decision(Verdict.HALT, f"gate breached: {why}", gates,
                        rollback=spec.on_breach is BreachPolicy.ROLLBACK)
    if progress.state is RolloutState.PAUSED:
        return Decision(Verdict.NONE, "paused", gates)
    phase = progress.current_phase
    started = progress.phase_started_at
    soaked = 0.0 if started is None else (now - started).total_seconds()
    need_soak = spec.phases[phase].min_soak_s
    if soaked < need_soak:
        return Decision(Verdict.NONE, f"soaking: {soaked:.0f}/{need_soak:.0f} s", gates)
    missing = [g.name for g in gates if g.name in spec.gates.require_data and g.status is GateStatus.NO_DATA]
    if missing:
        return Decision(Verdict.NONE, f"waiting for gate data: {', '.join(missing)}", gates)
    reporting, required = required_devices(spec, stats, phase)
    if reporting < required:
        return Decision(Verdict.NONE, f"waiting for devices: {reporting}/{required} reporting on the target",
                        gates)
    if phase + 1 >= len(spec.phases):
        return Decision(Verdict.COMPLETE, f"final phase soaked {soaked:.0f} s with {reporting} devices", gates)
    return Decision(Verdict.ADVANCE, f"phase {phase} soaked {soaked:.0f} s with {reporting}/{required} devices",
                    gates, next_phase=phase + 1)


def with_state(stats: RolloutStats, state: RolloutState) -> RolloutStats:
    """``stats`` with another progress state (used by status views and tests)."""
    return replace(stats, progress=replace(stats.progress, state=state))
