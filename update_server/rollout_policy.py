"""The rollout decision, as pure functions: no database, no clock, no I/O.

``decide(spec, stats, now)`` looks at a rollout's configuration (:class:`RolloutSpec`), what it has
observed so far (:class:`RolloutStats`: its progress and the telemetry aggregates of its devices) and the
time, and says what to do next (:class:`Decision`): nothing, advance to the next phase, complete, or halt
(and, by policy, roll back). The service layer gathers the stats under a row lock, calls ``decide`` and
applies the result, so two replicas evaluating the same rollout at once cannot both act on it.

Cohorts: a device's bucket is a hash of (rollout id, device id) mapped to [0, 100); it belongs to the
first phase whose percentage exceeds its bucket. Membership is therefore stable across pause and resume,
and a device that enrolls later lands in the phase it would have had from the start.

Gates (``update_server.gates``): each reports an estimate with an always-valid interval and a status.
A breached gate halts; a configured gate that is ``no_data`` or ``unproven`` keeps the phase waiting unless
the spec names it in ``allow_unproven`` (an explicit, audited opt-out). Devices are weighted, not their
raw counts (``update_server.gate_stats``).

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
from update_server.gate_stats import beta_binomial_cs
from update_server.gates import (
    GATE_NAMES,
    LATENCY_BOUNDS_MS,
    DeviceTable,
    GateResult,
    GateSpec,
    GateStatus,
    GroupStats,
    evaluate_gates,
)

__all__ = ["ACTIVE_STATES", "GATE_NAMES", "LATENCY_BOUNDS_MS", "TRANSITIONS", "Action", "BreachPolicy", "Decision",
           "DeviceTable", "GateResult", "GateSpec", "GateStatus", "GroupStats", "IllegalTransition", "PhaseSpec",
           "Progress", "RolloutSpec", "RolloutState", "RolloutStats", "Verdict", "cohort_bucket", "decide",
           "devices_to_halt", "evaluate_gates", "next_state", "percentile_from_histogram", "phase_of",
           "required_devices", "with_state"]


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
class RolloutSpec:
    phases: tuple[PhaseSpec, ...]
    gates: GateSpec = field(default_factory=GateSpec)
    on_breach: BreachPolicy = BreachPolicy.ROLLBACK
    canary_devices: int = 1
    """The first phase holds at least this many members (the lowest buckets), fixed at creation. A device
    gate cannot halt on fewer devices than :func:`devices_to_halt` says, whatever they report."""

    def __post_init__(self) -> None:
        if self.canary_devices < 1:
            raise ValueError(f"canary_devices must be at least 1, got {self.canary_devices}")
        pct = [p.percent for p in self.phases]
        if not pct or pct[-1] != 100 or pct[0] <= 0 or any(b <= a for a, b in itertools.pairwise(pct)):
            raise ValueError(f"phase percentages must grow strictly from above 0 to 100, got {pct}")
        if any(p.min_soak_s < 0 or p.min_devices < 0 for p in self.phases):
            raise ValueError("min_soak_s and min_devices must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return {"phases": [asdict(p) for p in self.phases], "gates": asdict(self.gates),
                "on_breach": self.on_breach.value, "canary_devices": self.canary_devices}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutSpec:
        return cls(phases=tuple(PhaseSpec(float(p["percent"]), float(p["min_soak_s"]), int(p["min_devices"]))
                                for p in d["phases"]),
                   gates=GateSpec(**dict(d.get("gates", {}))),
                   on_breach=BreachPolicy(d.get("on_breach", "rollback")),
                   canary_devices=int(d.get("canary_devices", 1)))


def devices_to_halt(gates: GateSpec, limit: int = 1000) -> int | None:
    """The fewest devices on which a device gate (install failures, crashes) can halt: all of them failing.

    A single device can never show a 5 % crash rate exceeded at 99.8 % confidence; a first phase smaller
    than this cannot halt on those gates (docs/server.md, "How gates decide"). None when both are off.
    """
    limits = [x for x in (gates.max_install_failure_rate, gates.max_crash_rate) if x is not None]
    if not limits:
        return None
    for n in range(1, limit + 1):
        if beta_binomial_cs(n, n, gates.gate_alpha())[0] > min(limits):
            return n
    return limit


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
    unproven: tuple[str, ...] = ()
    """Gates that lacked data when advancing or completing, let through by the spec's ``allow_unproven``."""


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
        why = "; ".join(f"{g.name} {g.value} (interval [{g.lower}, {g.upper}]) > {g.threshold}"
                        if g.comparison == "<=" else
                        f"{g.name} {g.value} (interval [{g.lower}, {g.upper}]) < {g.threshold}" for g in breached)
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
    waiting = [g for g in gates if g.blocks and g.name not in spec.gates.allow_unproven]
    if waiting:
        return Decision(Verdict.NONE, "waiting for gate data: " + "; ".join(
            f"{g.name} {g.status.value} ({g.detail})" for g in waiting), gates)
    reporting, required = required_devices(spec, stats, phase)
    if reporting < required:
        return Decision(Verdict.NONE, f"waiting for devices: {reporting}/{required} reporting on the target",
                        gates)
    unproven = tuple(g.name for g in gates if g.blocks)
    note = f"; allowed unproven: {', '.join(unproven)}" if unproven else ""
    if phase + 1 >= len(spec.phases):
        return Decision(Verdict.COMPLETE, f"final phase soaked {soaked:.0f} s with {reporting} devices{note}", gates,
                        unproven=unproven)
    return Decision(Verdict.ADVANCE, f"phase {phase} soaked {soaked:.0f} s with {reporting}/{required} devices"
                    f"{note}", gates, next_phase=phase + 1, unproven=unproven)


def with_state(stats: RolloutStats, state: RolloutState) -> RolloutStats:
    """``stats`` with another progress state (used by status views and tests)."""
    return replace(stats, progress=replace(stats.progress, state=state))
