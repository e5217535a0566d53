"""The rollout gates, as pure functions: each gate's estimate, its always-valid interval and its status.

A gate is one of:

* ``breached``: its confidence sequence lies entirely on the wrong side of the threshold (the release is
  worse than the limit, with the false-halt rate bounded by ``false_halt_rate`` over all gates and all
  evaluations); the rollout halts;
* ``ok``: it has its data and its interval shows the value within the threshold plus the gate's margin (a
  release that much worse than the limit would have been halted here, with probability >= 1 - alpha);
* ``unproven``: it has data, but its interval still reaches past threshold + margin: the phase waits;
* ``no_data``: nothing to judge yet (no device, no label, no control group): the phase waits;
* ``off``: not configured.

``unproven`` and ``no_data`` block advancing unless the spec names the gate in ``allow_unproven`` (an
explicit, audited opt-out). The device-count gates (``install_failure_rate``, ``crash_rate``) count each
device once, so they cannot be proven on a handful of devices: they are ``ok`` from the first device on and
only halt when the interval says so; how many devices a phase needs is ``min_devices``.

Devices are weighted, not their raw counts: see :mod:`update_server.gate_stats` for the cap and its bound.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from update_server import gate_stats as gs
from update_server.drift import InputDrift

LATENCY_BOUNDS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
GATE_NAMES = ("install_failure_rate", "crash_rate", "error_rate", "accuracy", "accuracy_drop",
              "p95_latency_regression", "input_drift")
STATISTICAL = GATE_NAMES[:-1]
"""Gates decided by a confidence sequence (they share ``false_halt_rate``); input_drift compares a PSI."""
MIN_NORMAL_LABELS = 10
"""Labels (or latency samples) each group needs before a normal-approximation gate may halt."""


@dataclass(frozen=True)
class GateSpec:
    max_install_failure_rate: float | None = 0.05
    max_crash_rate: float | None = 0.05
    max_error_rate: float | None = 0.02
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = 0.02
    max_p95_latency_regression: float | None = 0.25
    min_requests: int = 100
    """Requests (latency samples) on the target before error_rate / p95_latency_regression may be ``ok``."""
    min_feedback: int = 50
    """Labels on the target (and control) before accuracy / accuracy_drop may be ``ok``."""
    max_input_drift: float | None = None
    min_drift_samples: int = 1000
    false_halt_rate: float = 0.01
    """Chance that a release within every limit is ever halted, split evenly over the statistical gates on."""
    margin_error_rate: float = 0.02
    margin_accuracy: float = 0.05
    margin_accuracy_drop: float = 0.03
    margin_p95_latency_regression: float = 0.25
    """How far past its threshold a gate's interval may still reach when the phase advances: a phase waits
    until it would have caught a release worse than threshold + margin."""
    allow_unproven: tuple[str, ...] = ()
    """Gates that may be ``no_data`` or ``unproven`` when a phase advances: an explicit opt-out, audited."""
    require_data: tuple[str, ...] = ()
    """Accepted for older specs and clients: every configured gate now requires data unless allowed."""

    def __post_init__(self) -> None:
        for name in ("allow_unproven", "require_data"):
            names = tuple(getattr(self, name))
            unknown = sorted(set(names) - set(GATE_NAMES))
            if unknown:
                raise ValueError(f"{name} names unknown gates {unknown}; known: {list(GATE_NAMES)}")
            object.__setattr__(self, name, names)
        if not 0 < self.false_halt_rate < 0.5:
            raise ValueError(f"false_halt_rate must be between 0 and 0.5 (e.g. 0.01), got {self.false_halt_rate}")
        for name in ("margin_error_rate", "margin_accuracy", "margin_accuracy_drop",
                     "margin_p95_latency_regression"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    def gate_alpha(self) -> float:
        """Each statistical gate's share of the false-halt budget."""
        on = sum(1 for limit in (self.max_install_failure_rate, self.max_crash_rate, self.max_error_rate,
                                 self.min_accuracy, self.max_accuracy_drop, self.max_p95_latency_regression)
                 if limit is not None)
        return self.false_halt_rate / max(on, 1)


@dataclass(frozen=True, eq=False)
class DeviceTable:
    """Per-device telemetry sums of one group, one row per device (what device weighting needs)."""

    requests: gs.Floats
    errors: gs.Floats
    feedback_count: gs.Floats
    feedback_correct: gs.Floats
    latency: gs.Floats
    """Shape (devices, latency buckets)."""

    @classmethod
    def of(cls, rows: list[tuple[int, int, int, int, tuple[int, ...]]]) -> DeviceTable:
        """From (requests, errors, feedback_count, feedback_correct, latency_counts) per device."""
        width = max([len(LATENCY_BOUNDS_MS) + 1, *(len(r[4]) for r in rows)])
        lat = np.zeros((len(rows), width))
        for i, r in enumerate(rows):
            lat[i, :len(r[4])] = r[4]
        col = np.array([r[:4] for r in rows], dtype=np.float64).reshape(len(rows), 4)
        return cls(col[:, 0], col[:, 1], col[:, 2], col[:, 3], lat)


@dataclass(frozen=True)
class GroupStats:
    """Telemetry of one group of devices (target or control): sums, and per device when gathered."""

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
    per_device: DeviceTable | None = field(default=None, compare=False, repr=False)
    """One row per device; None = only the sums are known (they are then treated as one device)."""

    def sums(self) -> dict[str, Any]:
        """The sums as plain values (for status views)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_device"}

    def table(self) -> DeviceTable:
        if self.per_device is not None:
            return self.per_device
        return DeviceTable.of([(self.requests, self.errors, self.feedback_count, self.feedback_correct,
                                tuple(self.latency_counts))])


class GateStatus(enum.Enum):
    OK = "ok"
    BREACHED = "breached"
    UNPROVEN = "unproven"
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
    lower: float | None = None
    upper: float | None = None
    """The always-valid interval for the value (level 1 - alpha)."""
    alpha: float | None = None
    devices: int = 0
    """Devices whose data the value is computed from (target group)."""
    max_share: float | None = None
    """The largest weight one device holds in the target's estimate (device weighting)."""

    @property
    def blocks(self) -> bool:
        """Whether this gate keeps a phase from advancing (unless the spec allows it unproven)."""
        return self.status in (GateStatus.NO_DATA, GateStatus.UNPROVEN)


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.4g}"


def _more(now: float, need: float, value: float, upper: float) -> str:
    """Roughly how many more trials shrink ``upper`` to ``need`` (width ~ 1/sqrt(n))."""
    if not (math.isfinite(upper) and upper > need > value) or now <= 0:
        return ""
    return f"; about {max(1, math.ceil(now * ((upper - value) / (need - value)) ** 2 - now)):,} more (weighted)"


def _device_rate(name: str, failed: int, devices: int, limit: float | None, alpha: float, what: str) -> GateResult:
    """A share of devices (each device counts once): ok from the first device, breached when the interval's
    lower end passes the limit."""
    if limit is None:
        return GateResult(name, GateStatus.OFF, None, None, "<=")
    if devices <= 0:
        return GateResult(name, GateStatus.NO_DATA, None, limit, "<=", f"no device has reported {what} yet",
                          alpha=alpha)
    lo, hi = gs.beta_binomial_cs(failed, devices, alpha)
    status = GateStatus.BREACHED if lo > limit else GateStatus.OK
    return GateResult(name, status, _r(failed / devices), limit, "<=",
                      f"{failed}/{devices} devices, interval [{lo:.4f}, {hi:.4f}]", _r(lo), _r(hi), alpha,
                      devices, _r(1 / devices))


def _upper_gate(name: str, value: float, lo: float, hi: float, limit: float, margin: float, *, enough: bool,
                need_text: str, basis: str, alpha: float, devices: int, share: float, trials: float,
                may_halt: bool = True) -> GateResult:
    """A gate whose value must stay <= limit."""
    detail = f"{basis}, interval [{_fmt(lo)}, {_fmt(hi)}]"
    if may_halt and lo > limit:
        status = GateStatus.BREACHED
    elif enough and hi <= limit + margin:
        status = GateStatus.OK
    else:
        status = GateStatus.UNPROVEN
        detail += (f"; needs {need_text}" if not enough else
                   f"; upper end must reach <= {limit + margin:.4g}{_more(trials, limit + margin, value, hi)}")
    return GateResult(name, status, _r(value), limit, "<=", detail, _r(lo), _r(hi), alpha, devices, _r(share))


def evaluate_gates(gates: GateSpec, target: GroupStats, control: GroupStats, *,
                   drift: InputDrift | None = None) -> tuple[GateResult, ...]:
    """Every gate's estimate, interval and status."""
    alpha = gates.gate_alpha()
    t, c = target.table(), control.table()
    err_spread = gs.between_device_variance(*((c.errors, c.requests) if (c.requests > 0).sum()
                                              >= (t.requests > 0).sum() else (t.errors, t.requests)))
    results = [
        _device_rate("install_failure_rate", target.failed_devices, target.devices_with_events,
                     gates.max_install_failure_rate, alpha, "an install event"),
        _device_rate("crash_rate", target.crashed_devices, max(target.devices_reporting, target.crashed_devices),
                     gates.max_crash_rate, alpha, "on the target"),
        _error_gate(gates, t, alpha, err_spread),
    ]
    # how much devices' accuracy differs, from the group with more devices (usually the control)
    tw, cw = t.feedback_count - t.feedback_correct, c.feedback_count - c.feedback_correct
    larger = (cw, c.feedback_count) if (c.feedback_count > 0).sum() >= (t.feedback_count > 0).sum() \
        else (tw, t.feedback_count)
    spread = gs.between_device_variance(*larger)
    pt = gs.pool_rates(tw, t.feedback_count, between_var=spread)
    pc = gs.pool_rates(cw, c.feedback_count, between_var=spread)
    results.append(_accuracy_gate(gates, pt, int(target.feedback_count), alpha))
    results.append(_accuracy_drop_gate(gates, pt, pc, int(target.feedback_count), int(control.feedback_count),
                                       alpha))
    results.append(_latency_gate(gates, t, c, alpha))
    results.append(_drift_gate(gates, drift))
    return tuple(results)


def _error_gate(gates: GateSpec, t: DeviceTable, alpha: float, spread: float) -> GateResult:
    limit = gates.max_error_rate
    if limit is None:
        return GateResult("error_rate", GateStatus.OFF, None, None, "<=")
    p = gs.pool_rates(t.errors, t.requests, between_var=spread)
    if p.raw_trials <= 0:
        return GateResult("error_rate", GateStatus.NO_DATA, None, limit, "<=", "no request on the target yet",
                          alpha=alpha)
    lo, hi = gs.beta_binomial_cs(p.successes, p.trials, alpha)
    return _upper_gate("error_rate", p.rate, lo, hi, limit, gates.margin_error_rate,
                       enough=p.raw_trials >= gates.min_requests,
                       need_text=f"{gates.min_requests} requests (has {p.raw_trials})",
                       basis=f"{p.raw_trials} requests on {p.devices} devices", alpha=alpha, devices=p.devices,
                       share=p.max_share, trials=p.trials)


def _accuracy_gate(gates: GateSpec, pt: gs.Pooled, labels: int, alpha: float) -> GateResult:
    floor = gates.min_accuracy
    if floor is None:
        return GateResult("accuracy", GateStatus.OFF, None, None, ">=")
    if pt.raw_trials <= 0:
        return GateResult("accuracy", GateStatus.NO_DATA, None, floor, ">=", "no labelled prediction on the target",
                          alpha=alpha)
    err_lo, err_hi = gs.beta_binomial_cs(pt.successes, pt.trials, alpha)
    acc, lo, hi = 1 - pt.rate, 1 - err_hi, 1 - err_lo
    detail = f"{labels} labels on {pt.devices} devices, interval [{lo:.4f}, {hi:.4f}]"
    need = floor - gates.margin_accuracy
    if hi < floor:
        status = GateStatus.BREACHED
    elif labels >= gates.min_feedback and lo >= need:
        status = GateStatus.OK
    else:
        status = GateStatus.UNPROVEN
        detail += (f"; needs {gates.min_feedback} labels" if labels < gates.min_feedback else
                   f"; lower end must reach >= {need:.4g}{_more(pt.trials, -need, -acc, -lo)}")
    return GateResult("accuracy", status, _r(acc), floor, ">=", detail, _r(lo), _r(hi), alpha, pt.devices,
                      _r(pt.max_share))


def _accuracy_drop_gate(gates: GateSpec, pt: gs.Pooled, pc: gs.Pooled, labels_t: int, labels_c: int,
                        alpha: float) -> GateResult:
    limit = gates.max_accuracy_drop
    if limit is None:
        return GateResult("accuracy_drop", GateStatus.OFF, None, None, "<=")
    if pt.raw_trials <= 0 or pc.raw_trials <= 0:
        missing = "the target" if pt.raw_trials <= 0 else "the control group (devices on the previous version)"
        return GateResult("accuracy_drop", GateStatus.NO_DATA, None, limit, "<=",
                          f"no labelled prediction from {missing}; labels target {labels_t}, control {labels_c}",
                          alpha=alpha)
    # errors: control.rate - target.rate is (1 - acc_c) - (1 - acc_t) = acc_t - acc_c, so the drop is its negative
    value, lo, hi = gs.difference_cs(pt, pc, alpha)
    return _upper_gate("accuracy_drop", value, lo, hi, limit, gates.margin_accuracy_drop,
                       enough=min(labels_t, labels_c) >= gates.min_feedback,
                       need_text=f"{gates.min_feedback} labels in each group (target {labels_t}, control {labels_c})",
                       basis=f"control {1 - pc.rate:.4f} ({labels_c} labels), target {1 - pt.rate:.4f} "
                             f"({labels_t} labels on {pt.devices} devices)",
                       alpha=alpha, devices=pt.devices, share=pt.max_share, trials=pt.trials,
                       may_halt=min(labels_t, labels_c) >= MIN_NORMAL_LABELS)


def _latency_gate(gates: GateSpec, t: DeviceTable, c: DeviceTable, alpha: float) -> GateResult:
    limit = gates.max_p95_latency_regression
    if limit is None:
        return GateResult("p95_latency_regression", GateStatus.OFF, None, None, "<=")
    ht, wt = gs.pool_histograms(t.latency)
    hc, wc = gs.pool_histograms(c.latency)
    if wt.raw_trials <= 0 or wc.raw_trials <= 0:
        return GateResult("p95_latency_regression", GateStatus.NO_DATA, None, limit, "<=",
                          f"latency samples target {wt.raw_trials}, control {wc.raw_trials}: both groups need some",
                          alpha=alpha)
    p_t, lo_t, hi_t = gs.quantile_cs(ht, wt.trials, 0.95, alpha / 2, LATENCY_BOUNDS_MS)
    p_c, lo_c, hi_c = gs.quantile_cs(hc, wc.trials, 0.95, alpha / 2, LATENCY_BOUNDS_MS)
    value = p_t / p_c - 1 if p_c > 0 else 0.0
    lo = lo_t / hi_c - 1 if hi_c > 0 and math.isfinite(hi_c) else -1.0
    hi = hi_t / lo_c - 1 if lo_c > 0 else math.inf
    n = min(wt.raw_trials, wc.raw_trials)
    return _upper_gate("p95_latency_regression", value, lo, hi, limit, gates.margin_p95_latency_regression,
                       enough=n >= gates.min_requests,
                       need_text=f"{gates.min_requests} samples in each group (target {wt.raw_trials}, "
                                 f"control {wc.raw_trials})",
                       basis=f"p95 control {p_c:.2f} ms, target {p_t:.2f} ms ({wt.raw_trials} samples on "
                             f"{wt.devices} devices)",
                       alpha=alpha, devices=wt.devices, share=wt.max_share, trials=wt.trials,
                       may_halt=n >= MIN_NORMAL_LABELS)


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
