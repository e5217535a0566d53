"""The gates' statistics: intervals that cover the truth at every sample size, move the right way, and a
compromised device that cannot move a gate by more than its share (update_server/gate_stats.py, gates.py).

Coverage is checked on simulated data: the share of simulated runs whose interval ever misses the true
value must stay within alpha (plus sampling slack), however often the gate looks."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import betaln

from update_server import gate_stats as gs
from update_server.gates import DeviceTable, GateSpec, GateStatus, GroupStats, evaluate_gates
from update_server.rollout_policy import PhaseSpec, Progress, RolloutSpec, RolloutState, RolloutStats, Verdict, decide

SLOW = settings(max_examples=12, deadline=None)


@SLOW
@given(p=st.floats(0.005, 0.995), seed=st.integers(0, 2**32 - 1))
def test_beta_binomial_sequence_covers_at_every_sample_size(p: float, seed: int) -> None:
    """Ville: the chance that M_n(p) ever reaches 1/alpha (the interval ever excludes p) is at most alpha."""
    alpha, runs, steps = 0.1, 1500, 400
    rng = np.random.default_rng(seed)
    xs = np.cumsum(rng.random((runs, steps)) < p, axis=1)
    ns = np.arange(1, steps + 1)
    log_m = (betaln(gs.PRIOR_A + xs, gs.PRIOR_B + ns - xs) - betaln(gs.PRIOR_A, gs.PRIOR_B)
             - xs * math.log(p) - (ns - xs) * math.log1p(-p))
    ever_missed = float((log_m.max(axis=1) >= math.log(1 / alpha)).mean())
    assert ever_missed <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / runs)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0, 1), alpha=st.sampled_from([0.001, 0.01, 0.05, 0.2]))
def test_the_interval_is_the_set_the_mixture_keeps(n: int, frac: float, alpha: float) -> None:
    x = round(frac * n)
    lo, hi = gs.beta_binomial_cs(x, n, alpha)
    assert 0 <= lo <= x / n <= hi <= 1
    for bound in (lo, hi):
        if 0 < bound < 1:  # on the boundary the mixture is exactly 1/alpha
            log_m = float(betaln(gs.PRIOR_A + x, gs.PRIOR_B + n - x) - betaln(gs.PRIOR_A, gs.PRIOR_B)
                          - x * math.log(bound) - (n - x) * math.log1p(-bound))
            assert log_m == pytest.approx(math.log(1 / alpha), abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 3000), a=st.floats(0, 1), b=st.floats(0, 1))
def test_more_failures_never_lower_the_interval(n: int, a: float, b: float) -> None:
    x1, x2 = sorted((round(a * n), round(b * n)))
    lo1, hi1 = gs.beta_binomial_cs(x1, n, 0.01)
    lo2, hi2 = gs.beta_binomial_cs(x2, n, 0.01)
    assert lo1 <= lo2 + 1e-9 and hi1 <= hi2 + 1e-9


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2000), frac=st.floats(0, 1))
def test_more_data_at_the_same_rate_narrows_the_interval(n: int, frac: float) -> None:
    x = round(frac * n)
    lo1, hi1 = gs.beta_binomial_cs(x, n, 0.01)
    lo4, hi4 = gs.beta_binomial_cs(4 * x, 4 * n, 0.01)
    assert hi4 - lo4 <= hi1 - lo1 + 1e-9


@settings(max_examples=60, deadline=None)
@given(v1=st.floats(1e-8, 1.0), v2=st.floats(1e-8, 1.0))
def test_normal_mixture_width_grows_with_variance_and_confidence(v1: float, v2: float) -> None:
    small, large = sorted((v1, v2))
    assert gs.normal_mixture_halfwidth(small, 0.01) <= gs.normal_mixture_halfwidth(large, 0.01) + 1e-12
    assert gs.normal_mixture_halfwidth(small, 0.01) <= gs.normal_mixture_halfwidth(small, 0.001)


@SLOW
@given(p=st.floats(0.6, 0.98), seed=st.integers(0, 2**32 - 1))
def test_accuracy_difference_sequence_covers_at_every_look(p: float, seed: int) -> None:
    """Two equally accurate groups (control gets 3 labels per target label), looked at 60 times from 10 to
    3,000 target labels: the interval for the difference rarely ever excludes 0."""
    alpha, runs = 0.05, 300
    rng = np.random.default_rng(seed)
    looks = np.unique(np.geomspace(10, 3000, 60).astype(int))
    t_correct = np.cumsum(rng.random((runs, 3000)) < p, axis=1)
    c_correct = np.cumsum(rng.random((runs, 9000)) < p, axis=1)
    missed = np.zeros(runs, dtype=bool)
    for n in looks:
        for r in range(runs):
            if missed[r]:
                continue
            pt = gs.pool_rates(np.array([n - t_correct[r, n - 1]]), np.array([n]))
            pc = gs.pool_rates(np.array([3 * n - c_correct[r, 3 * n - 1]]), np.array([3 * n]))
            _, lo, hi = gs.difference_cs(pt, pc, alpha)
            missed[r] = not lo <= 0 <= hi
    assert missed.mean() <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / runs)


@settings(max_examples=80, deadline=None)
@given(honest=st.lists(st.tuples(st.integers(1, 10_000), st.floats(0, 1)), min_size=1, max_size=60),
       evil=st.lists(st.tuples(st.integers(1, 10**9), st.floats(0, 1)), min_size=1, max_size=5))
def test_k_devices_hold_at_most_k_over_m_of_the_weight(honest: list[tuple[int, float]],
                                                       evil: list[tuple[int, float]]) -> None:
    """Whatever k devices report, they hold at most k/m of a group's weight (m = n - (n-1)//2), and with
    k <= t (the winsorizing depth) the pooled rate stays inside the honest devices' range."""
    counts = np.array([n for n, _ in honest + evil], dtype=float)
    events = np.array([round(n * r) for n, r in honest + evil], dtype=float)
    n, k = counts.size, len(evil)
    weights, _ = gs.capped_weights(counts)
    share = weights[len(honest):].sum() / weights.sum()
    assert share <= gs.max_weight_share(n, k) + 1e-12
    pooled = gs.pool_rates(events, counts)
    assert pooled.max_share <= gs.max_weight_share(n, 1) + 1e-12
    honest_rates = events[:len(honest)] / counts[:len(honest)]
    if k <= gs.trim_count(n):
        assert honest_rates.min() - 1e-12 <= pooled.rate <= honest_rates.max() + 1e-12
    # ... and move it at most k/m away from what the honest devices alone give under the same weighting
    clipped = gs.winsorize(events / counts, gs.trim_count(n))
    honest_mean = (weights[:len(honest)] * clipped[:len(honest)]).sum() / weights[:len(honest)].sum()
    assert abs(pooled.rate - honest_mean) <= gs.max_weight_share(n, k) + 1e-9


def test_pooled_histograms_keep_a_cdf_and_bound_one_device() -> None:
    rng = np.random.default_rng(7)
    hists = np.array([np.bincount(np.minimum(rng.poisson(3, 500), 10), minlength=11) for _ in range(20)], float)
    merged, pooled = gs.pool_histograms(hists)
    assert np.all(merged >= -1e-9) and merged.sum() == pytest.approx(pooled.raw_trials / 20 * 20, rel=0.2)
    evil = hists.copy()
    evil[0] = 0
    evil[0, -1] = 10**9  # every sample of one device past the last bound
    merged_evil, _ = gs.pool_histograms(evil)
    bounds = tuple(float(b) for b in range(1, 11))
    assert gs.quantile(merged_evil, 0.95, bounds) == pytest.approx(gs.quantile(merged, 0.95, bounds), rel=0.1)


# ---- one compromised device in the first phase -------------------------------------------------------------

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _devices(rng: np.random.Generator, n: int, accuracy: float, *, labels: int = 150,
             requests: int = 1000) -> list[tuple[int, int, int, int, tuple[int, ...]]]:
    rows = []
    for _ in range(n):
        acc = rng.beta(accuracy * 400, (1 - accuracy) * 400)  # devices differ a little (their users' digits)
        f = int(rng.poisson(labels))
        req = int(rng.poisson(requests))
        lat = np.digitize(rng.lognormal(math.log(3.0), 0.35, req), BOUNDS, right=True)
        rows.append((req, int(rng.binomial(req, 0.005)), f, int(rng.binomial(f, acc)),
                     tuple(int(c) for c in np.bincount(lat, minlength=11))))
    return rows


def _group(rows: list[tuple[int, int, int, int, tuple[int, ...]]], *, crashed: int = 0, failed: int = 0) -> GroupStats:
    table = DeviceTable.of(rows)
    return GroupStats(devices_reporting=len(rows), requests=int(table.requests.sum()), errors=int(table.errors.sum()),
                      feedback_count=int(table.feedback_count.sum()),
                      feedback_correct=int(table.feedback_correct.sum()),
                      latency_counts=tuple(int(c) for c in table.latency.sum(axis=0)), crashed_devices=crashed,
                      devices_with_events=len(rows), failed_devices=failed, per_device=table)


SPEC = RolloutSpec(phases=tuple(PhaseSpec(p, 600, 5) for p in (1, 10, 50, 100)),
                   gates=GateSpec(min_accuracy=0.8))


def _first_phase(target: GroupStats, control: GroupStats) -> RolloutStats:
    return RolloutStats(progress=Progress(RolloutState.RUNNING, 0, NOW - timedelta(hours=2)),
                        members_by_phase={0: 20, 1: 180, 2: 800, 3: 1000}, reporting_by_phase={0: 20},
                        target=target, control=control)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_compromised_device_cannot_halt_a_good_release(seed: int) -> None:
    rng = np.random.default_rng(seed)
    control = _group(_devices(rng, 400, 0.90))
    honest = _devices(rng, 19, 0.90)
    worst = (10**6, 10**6, 10**6, 0, (0,) * 10 + (10**6,))  # every request an error, every label wrong, all slow
    target = _group([*honest, worst], crashed=1, failed=1)  # ... and it reports a crash and a failed install
    decision = decide(SPEC, _first_phase(target, control), NOW)
    assert decision.verdict is Verdict.ADVANCE, decision.reason
    gates = {g.name: g for g in decision.gates}
    assert gates["accuracy_drop"].max_share is not None and gates["accuracy_drop"].max_share <= 1 / 11
    # the same device's windows, counted raw as before, would have halted it
    raw = replace(target, per_device=None)
    assert decide(SPEC, _first_phase(raw, control), NOW).verdict is Verdict.HALT


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_compromised_device_cannot_save_a_bad_release(seed: int) -> None:
    rng = np.random.default_rng(seed)
    control = _group(_devices(rng, 400, 0.90))
    best = (10**6, 0, 10**6, 10**6, (10**6,) + (0,) * 10)  # perfect and instant
    early = _group([*_devices(rng, 19, 0.85, labels=100), best])  # five points worse, few labels yet
    decision = decide(SPEC, _first_phase(early, control), NOW)
    assert decision.verdict in (Verdict.NONE, Verdict.HALT), decision.reason  # waits (or halts), never advances
    later = _group([*_devices(rng, 19, 0.85, labels=600), best])  # the same phase, later
    decision = decide(SPEC, _first_phase(later, control), NOW)
    assert decision.verdict is Verdict.HALT and decision.rollback, decision.reason
    assert "accuracy_drop" in decision.reason


def test_device_gates_count_each_device_once() -> None:
    """A device reporting a thousand crashes is one crashed device: 1 of 20 is not a breach of 5 %."""
    results = {g.name: g for g in evaluate_gates(GateSpec(), replace(GroupStats(), devices_reporting=20,
                                                                      crashed_devices=1), GroupStats())}
    assert results["crash_rate"].status is GateStatus.OK and results["crash_rate"].value == 0.05


def test_impossible_counts_stay_within_bounds() -> None:
    """More correct labels than labels, or negative counts, from one device: rates stay in [0, 1]."""
    pooled = gs.pool_rates(np.array([-50.0, 3.0, 4.0]), np.array([10.0, 100.0, 100.0]))
    assert 0 <= pooled.rate <= 1
    merged, _ = gs.pool_histograms(np.array([[5.0, -100.0, 3.0], [1.0, 1.0, 1.0]]))
    assert np.all(merged >= -1e-12)
