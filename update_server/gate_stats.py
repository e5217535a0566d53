"""The statistics behind the rollout gates, as pure functions (numpy/scipy, no I/O, no clock).

Three pieces, each documented with the invariant it keeps (docs/server.md, "How gates decide"):

* **Device weighting** (:func:`pool_rates`, :func:`pool_histograms`): each device's counts (requests,
  labels, latency samples) are capped at the *lower median* ``c`` of the reporting devices' counts. With
  ``n`` devices reporting, at least ``m = n - (n - 1) // 2`` of them have a count >= ``c`` and so carry
  the full weight ``c``; any ``k`` devices carry at most ``k * c``. So ``k`` devices, whatever they send,
  hold at most ``k / m`` of a group's weight, and move a rate estimate (a number in [0, 1]) by at most
  ``k / m`` from the weighted rate of the other devices (:func:`max_weight_share`). Per-device rates are
  also winsorized across devices (:func:`winsorize`, ``t = n // 20 + 1`` per side): up to ``t`` compromised
  devices end up inside the honest devices' range, and so move a rate by at most ``k / m`` times the spread
  of the honest devices' rates.
* **Rates** (:func:`beta_binomial_cs`): Robbins' beta-binomial mixture confidence sequence. For every
  ``p``, ``M_n(p) = B(a + x, b + n - x) / B(a, b) / (p^x (1 - p)^(n - x))`` is a nonnegative martingale
  with mean 1 under ``p``; by Ville's inequality ``P(exists n: M_n(p) >= 1/alpha) <= alpha``, so
  ``{p : M_n(p) < 1/alpha}`` covers the true rate at every sample size at once (always valid: the gate
  loop may look after every window). Devices differ, so the variance of a weighted rate is the binomial
  part plus the variance of devices' true rates (:func:`between_device_variance`, estimated on the larger
  group); counts are divided by the resulting design effect ``deff`` before the mixture sees them.
* **Differences and quantiles** (:func:`normal_mixture_halfwidth`): the two-sided normal-mixture boundary
  (Robbins; Howard et al. 2021) in information time ``I = 1/variance``: the estimate is within
  ``sqrt((I + rho) log((I + rho) / (rho alpha^2))) / I`` of the truth at every ``I`` with probability
  ``1 - alpha`` (asymptotically, as for any CLT-based confidence sequence: Waudby-Smith et al. 2021).

A halt is a rejection of "the release is within the limit" by these sequences, so the chance that a
release within every limit is ever halted is at most the sum of the gates' ``alpha`` (the spec's
``false_halt_rate``), however often the gates are evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import brentq
from scipy.special import betaln

PRIOR_A = 0.5
PRIOR_B = 0.5
"""Beta(1/2, 1/2) mixing distribution (Jeffreys): mass near 0 and 1, where failure rates live."""
DESIGN_INFORMATION = 10_000.0
"""The information (1 / variance) at which the normal-mixture boundary is tightest: about 1,000 labels per
group at 90 % accuracy, where accuracy decisions are made. The boundary grows only like log away from it."""

Floats = NDArray[np.float64]


@dataclass(frozen=True)
class Pooled:
    """A group's rate after device weighting."""

    successes: float
    """Weighted count of the event (errors, wrong labels, ...), after the design effect."""
    trials: float
    """Weighted count of trials, after the design effect (what the confidence sequence sees)."""
    rate: float
    devices: int
    """Devices with at least one trial."""
    cap: float
    """Each device's trials were capped at this (the lower median of the devices' counts)."""
    deff: float
    """Design effect: variance between devices over binomial variance (>= 1)."""
    raw_trials: int
    """Trials before weighting (what the devices reported)."""
    max_share: float
    """The largest weight share one device holds (<= 1 / m, m = devices - (devices - 1) // 2)."""


def lower_median(counts: Floats) -> float:
    """The lower median: at least ``n - (n - 1) // 2`` of the values are >= it."""
    if counts.size == 0:
        return 0.0
    return float(np.sort(counts)[(counts.size - 1) // 2])


def max_weight_share(devices: int, k: int = 1) -> float:
    """The most weight ``k`` devices can hold in a group of ``devices`` reporting ones under median capping."""
    if devices <= 0:
        return 1.0
    m = devices - (devices - 1) // 2
    return min(1.0, k / m)


def trim_count(devices: int) -> int:
    """How many devices' rates are winsorized on each side: ``devices // 20 + 1`` (0 below 3 devices)."""
    return 0 if devices < 3 else devices // 20 + 1


def winsorize(rates: Floats, t: int) -> Floats:
    """Clip each column of per-device rates to [its (t+1)-th lowest, its (t+1)-th highest] value.

    With at most ``t`` compromised devices both limits are values of honest devices, so whatever the
    compromised devices send ends up inside the honest devices' range. Clipping non-decreasing rows with
    non-decreasing limits keeps them non-decreasing (per-device CDFs stay CDFs).
    """
    if t <= 0 or rates.shape[0] <= 2 * t:
        return rates
    ordered = np.sort(rates, axis=0)
    return np.clip(rates, ordered[t], ordered[rates.shape[0] - 1 - t])


def capped_weights(counts: Floats) -> tuple[Floats, float]:
    """Each device's weight ``min(count, c)`` with ``c`` the lower median of the positive counts."""
    cap = lower_median(counts[counts > 0])
    return np.minimum(counts, cap), cap


def between_device_variance(events: Floats, trials: Floats) -> float:
    """How much devices' true rates differ (method of moments): the weighted variance of the per-device
    rates minus what binomial sampling alone explains. 0 with fewer than 2 devices."""
    events, trials = np.asarray(events, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    keep = trials > 0
    x, n = np.clip(events[keep], 0.0, trials[keep]), trials[keep]  # a device cannot report outside [0, n]
    if n.size < 2:
        return 0.0
    w, _ = capped_weights(n)
    r = winsorize(x / n, trim_count(n.size))
    total = float(w.sum())
    p = float((w * r).sum() / total)
    spread = float((w * (r - p) ** 2).sum() / total) * n.size / (n.size - 1)
    within = float((w * p * (1 - p) / n).sum() / total)
    return max(0.0, spread - within)


def pool_rates(events: Floats, trials: Floats, *, between_var: float | None = None) -> Pooled:
    """Weight per-device (events, trials) so no device outweighs the median device; estimate the rate and
    the design effect. Devices with no trial are left out.

    The design effect covers that devices differ: ``between_var`` (the variance of devices' true rates,
    best estimated on the larger group, :func:`between_device_variance`) adds ``sum(w^2) * between_var``
    to the binomial variance; with 10 or more devices the group's own cluster-robust variance is used when
    it is larger."""
    events = np.asarray(events, dtype=np.float64)
    trials = np.asarray(trials, dtype=np.float64)
    keep = trials > 0
    x, n = np.clip(events[keep], 0.0, trials[keep]), trials[keep]  # a device cannot report outside [0, n]
    if n.size == 0:
        return Pooled(0.0, 0.0, 0.0, 0, 0.0, 1.0, 0, 0.0)
    w, cap = capped_weights(n)
    r = winsorize(x / n, trim_count(n.size))
    total = float(w.sum())
    p = float((w * r).sum() / total)
    # binomial variance of the weighted estimate vs the variance seen between devices
    p_smooth = (p * total + 0.5) / (total + 1.0)
    v_binom = p_smooth * (1 - p_smooth) * float((w * w / n).sum()) / total**2
    m = n.size
    v_model = v_binom + (between_var or 0.0) * float((w * w).sum()) / total**2
    v_cluster = float((w * w * (r - p) ** 2).sum()) / total**2 * m / (m - 1) if m >= 2 else 0.0
    own = v_cluster if m >= 2 else v_binom
    v = own if between_var is None else (max(v_model, v_cluster) if m >= 10 else v_model)
    deff = max(1.0, v / v_binom) if v_binom > 0 else 1.0
    n_eff = total**2 / float((w * w / n).sum()) / deff
    return Pooled(successes=p * n_eff, trials=n_eff, rate=p, devices=int(m), cap=cap, deff=deff,
                  raw_trials=int(n.sum()), max_share=float(w.max() / total))


def _log_mixture(p: float, x: float, n: float, a: float, b: float) -> float:
    """log M_n(p) of the beta-binomial mixture."""
    p = min(max(p, 1e-300), 1 - 1e-16)
    return float(betaln(a + x, b + n - x) - betaln(a, b) - x * math.log(p) - (n - x) * math.log1p(-p))


def beta_binomial_cs(x: float, n: float, alpha: float, *, a: float = PRIOR_A,
                     b: float = PRIOR_B) -> tuple[float, float]:
    """The set ``{p : M_n(p) < 1/alpha}`` as an interval [lower, upper] (always valid, level 1 - alpha).

    ``log M_n(p)`` is convex in ``p`` with its minimum (<= 0) at ``x / n``, so the set is one interval found
    by two root searches. ``x`` and ``n`` may be fractional (after weighting); n = 0 gives [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    x = min(max(x, 0.0), n)
    level = math.log(1 / alpha)
    phat = x / n

    def f(p: float) -> float:
        return _log_mixture(p, x, n, a, b) - level

    lower = 0.0 if phat <= 0 or f(0.0) < 0 else float(brentq(f, 0.0, phat, xtol=1e-14))
    upper = 1.0 if phat >= 1 or f(1.0) < 0 else float(brentq(f, phat, 1.0, xtol=1e-14))
    return lower, upper


def mixture_rho(alpha: float, design_information: float = DESIGN_INFORMATION) -> float:
    """The normal mixture's precision that makes the boundary tightest at ``design_information``."""
    two_log = 2 * math.log(1 / alpha)
    return design_information / (two_log + math.log1p(two_log))


def normal_mixture_halfwidth(variance: float, alpha: float, *,
                             design_information: float = DESIGN_INFORMATION) -> float:
    """Half-width of the two-sided normal-mixture confidence sequence for an estimate with this variance."""
    if variance <= 0:
        return 0.0
    if not math.isfinite(variance):
        return math.inf
    return float(normal_mixture_halfwidths(np.array([variance]), alpha, design_information=design_information)[0])


def normal_mixture_halfwidths(variances: Floats, alpha: float, *,
                              design_information: float = DESIGN_INFORMATION) -> Floats:
    """:func:`normal_mixture_halfwidth` of many variances at once (all > 0)."""
    info = 1.0 / np.asarray(variances, dtype=np.float64)
    rho = mixture_rho(alpha, design_information)
    out: Floats = np.sqrt((info + rho) * np.log((info + rho) / (rho * alpha * alpha))) / info
    return out


def rate_variance(pooled: Pooled) -> float:
    """Variance of a pooled rate (smoothed so that 0 and 1 are not certain after a few trials)."""
    if pooled.trials <= 0:
        return math.inf
    p = (pooled.successes + 0.5) / (pooled.trials + 1.0)
    return p * (1 - p) / pooled.trials


def difference_cs(control: Pooled, target: Pooled, alpha: float) -> tuple[float, float, float]:
    """``control.rate - target.rate`` and its always-valid interval (normal mixture)."""
    value = control.rate - target.rate
    hw = normal_mixture_halfwidth(rate_variance(control) + rate_variance(target), alpha)
    return value, value - hw, value + hw


def pool_histograms(hists: Floats) -> tuple[Floats, Pooled]:
    """Merge per-device histograms (rows): each device's CDF, winsorized across devices at every bucket bound,
    weighted by its sample count capped at the median device's.

    Returns the merged histogram and a :class:`Pooled` describing the weighting (its rate is unused).
    """
    hists = np.clip(np.atleast_2d(np.asarray(hists, dtype=np.float64)), 0.0, None)
    totals = hists.sum(axis=1)
    keep = totals > 0
    hists, totals = hists[keep], totals[keep]
    if totals.size == 0:
        return np.zeros(hists.shape[1]), Pooled(0.0, 0.0, 0.0, 0, 0.0, 1.0, 0, 0.0)
    w, cap = capped_weights(totals)
    cdf = winsorize(np.cumsum(hists, axis=1) / totals[:, None], trim_count(totals.size))
    total = float(w.sum())
    pooled_cdf = (cdf * w[:, None]).sum(axis=0) / total
    merged = np.diff(pooled_cdf, prepend=0.0) * total
    n_eff = total**2 / float((w * w / totals).sum())
    return merged, Pooled(0.0, n_eff, 0.0, int(totals.size), cap, 1.0, int(totals.sum()),
                          float(w.max() / total))


def quantile(counts: Floats, q: float, bounds: tuple[float, ...], *, overflow: float | None = None) -> float:
    """The q-quantile of a (weighted) histogram (bucket i holds values <= bounds[i], the last bucket is the
    overflow), interpolated linearly inside the bucket; a quantile in the overflow bucket is ``overflow``
    (default: the last bound, as :func:`update_server.rollout_policy.percentile_from_histogram`)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = float(counts.sum())
    if total <= 0:
        return math.nan
    rank = min(max(q, 0.0), 1.0) * total
    seen = 0.0
    for i, count in enumerate(counts):
        count = float(count)
        if count > 0 and seen + count >= rank - 1e-12 * total:
            if i >= len(bounds):
                break
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            frac = min(max((rank - seen) / count, 0.0), 1.0)
            return lower + (float(bounds[i]) - lower) * frac
        seen += count
    return float(bounds[-1]) if overflow is None else overflow


def quantile_cs(counts: Floats, n_eff: float, q: float, alpha: float,
                bounds: tuple[float, ...]) -> tuple[float, float, float]:
    """The q-quantile and an always-valid interval for it: the quantiles at ``q -+ h``, where ``h`` is the
    confidence sequence's half-width for the share of samples below the true quantile (a Bernoulli(q) mean)."""
    point = quantile(counts, q, bounds)
    if n_eff <= 0:
        return point, 0.0, math.inf
    h = normal_mixture_halfwidth(q * (1 - q) / n_eff, alpha)
    lower = quantile(counts, q - h, bounds) if q - h > 0 else 0.0
    upper = quantile(counts, q + h, bounds, overflow=math.inf) if q + h < 1 else math.inf
    return point, lower, upper
