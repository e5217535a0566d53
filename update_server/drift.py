"""Input drift, as pure functions: a version's binned inputs against its bundle's reference profile.

The reference profile (``bundles.drift``) gives each feature's bin edges and the evaluation data's share per
bin; devices send counts per bin; the server sums them per version (``services.health``). For each feature:

* **PSI** (population stability index): ``sum((a - e) * ln(a / e))`` over bins, with both shares floored at
  ``EPS`` so an empty bin does not make it infinite. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift,
  > 0.25 a real shift (the default threshold).
* **KS-style distance**: the largest gap between the two cumulative distributions at the bin edges (the
  Kolmogorov-Smirnov statistic of the binned data; 0 same, 1 disjoint).

A version's drift is its worst feature's PSI, so one drifting input (a camera gone dark, a column in other
units) is not averaged away by 63 stable ones. With few samples PSI is biased upward (about
``(bins - 1) / samples`` for identical distributions), hence ``min_samples`` before a value counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EPS = 1e-4


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    psi: float
    ks: float
    samples: int


@dataclass(frozen=True)
class InputDrift:
    """A version's (or a device's) input drift against its reference; ``value`` is None without enough data."""

    value: float | None
    samples: int
    worst: str = ""
    ks: float | None = None
    features: tuple[FeatureDrift, ...] = ()
    reason: str = ""
    """Why there is no value (no profile, too few samples), for the operator."""


def psi(expected: Sequence[float], counts: Sequence[int]) -> float:
    total = sum(counts)
    if total <= 0:
        return 0.0
    out = 0.0
    for e, c in zip(expected, counts, strict=False):
        a = max(c / total, EPS)
        e = max(e, EPS)
        out += (a - e) * math.log(a / e)
    return out


def ks_distance(expected: Sequence[float], counts: Sequence[int]) -> float:
    total = sum(counts)
    if total <= 0:
        return 0.0
    cum_e = cum_a = gap = 0.0
    for e, c in zip(expected, counts, strict=False):
        cum_e += e
        cum_a += c / total
        gap = max(gap, abs(cum_a - cum_e))
    return gap


def add_counts(into: list[list[int]] | None, more: Sequence[Sequence[int]]) -> list[list[int]]:
    """Element-wise sum of two per-feature count lists (shapes come from the same profile)."""
    if into is None:
        return [list(map(int, row)) for row in more]
    return [[int(x) + int(y) for x, y in zip(a, b, strict=False)] for a, b in zip(into, more, strict=False)]


def compare(profile: Mapping[str, Any] | None, counts: Sequence[Sequence[int]] | None, samples: int,
            min_samples: int) -> InputDrift:
    """Drift of ``counts`` (per feature, per bin) against a profile dict (``DriftProfile.to_dict()``)."""
    if profile is None:
        return InputDrift(None, samples, reason="the bundle has no drift profile (rebuild it with this edgepack)")
    if not counts or samples <= 0:
        return InputDrift(None, 0, reason="no input statistics reported yet")
    features = []
    for spec, row in zip(profile.get("features", []), counts, strict=False):
        expected = [float(e) for e in spec["expected"]]
        if len(row) != len(expected):
            continue
        features.append(FeatureDrift(str(spec["name"]), round(psi(expected, row), 6),
                                     round(ks_distance(expected, row), 6), int(sum(row))))
    if not features:
        return InputDrift(None, samples, reason="counts do not match the profile")
    if samples < min_samples:
        return InputDrift(None, samples, reason=f"{samples}/{min_samples} samples", features=tuple(features))
    worst = max(features, key=lambda f: f.psi)
    return InputDrift(worst.psi, samples, worst.name, max(f.ks for f in features), tuple(features))
