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

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

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
    """PSI of one feature (the vectorized :func:`compare` computes the same for every feature at once)."""
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


@dataclass(frozen=True)
class Reference:
    """A drift profile as flat arrays: every feature's expected shares one after the other."""

    names: tuple[str, ...]
    sizes: npt.NDArray[np.int64]
    starts: npt.NDArray[np.int64]
    expected: npt.NDArray[np.float64]

    @classmethod
    def of(cls, profile: Mapping[str, Any]) -> Reference:
        feats = list(profile.get("features", []))
        sizes = np.asarray([len(f["expected"]) for f in feats], dtype=np.int64)
        expected = np.asarray([float(e) for f in feats for e in f["expected"]], dtype=np.float64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes
        return cls(tuple(str(f["name"]) for f in feats), sizes, starts, expected)

    @property
    def width(self) -> int:
        return int(self.sizes.sum())

    def flatten(self, counts: Sequence[Sequence[int]]) -> npt.NDArray[np.int64] | None:
        """Per-feature counts as one flat array, or None when they do not fit this profile."""
        flat = np.fromiter(itertools.chain.from_iterable(counts), dtype=np.int64)
        return flat if flat.size == self.width and len(counts) == len(self.sizes) else None


def compare(profile: Mapping[str, Any] | None, counts: Sequence[Sequence[int]] | npt.NDArray[np.int64] | None,
            samples: int, min_samples: int, *, ref: Reference | None = None, detail: bool = True) -> InputDrift:
    """Drift of ``counts`` (per feature per bin, nested or flat) against a profile (``DriftProfile.to_dict()``).

    Every feature at once with numpy: about 0.1 ms for 64 features of 10 bins."""
    if profile is None:
        return InputDrift(None, samples, reason="the bundle has no drift profile (rebuild it with this edgepack)")
    if counts is None or len(counts) == 0 or samples <= 0:
        return InputDrift(None, 0, reason="no input statistics reported yet")
    ref = ref or Reference.of(profile)
    flat = counts if isinstance(counts, np.ndarray) else ref.flatten(counts)
    if flat is None or flat.size != ref.width or not len(ref.sizes):
        return InputDrift(None, samples, reason="counts do not match the profile")
    totals = np.add.reduceat(flat, ref.starts).astype(np.float64)
    share = flat / np.repeat(np.maximum(totals, 1.0), ref.sizes)
    a, e = np.maximum(share, EPS), np.maximum(ref.expected, EPS)
    psis = np.add.reduceat((a - e) * np.log(a / e), ref.starts)
    psis[totals <= 0] = 0.0
    before = np.concatenate([[0.0], np.cumsum(share - ref.expected)])[ref.starts]
    gaps = np.abs(np.cumsum(share - ref.expected) - np.repeat(before, ref.sizes))
    kss = np.maximum.reduceat(gaps, ref.starts)
    features = tuple(FeatureDrift(n, round(float(p), 6), round(float(k), 6), int(t))
                     for n, p, k, t in zip(ref.names, psis, kss, totals, strict=True)) if detail else ()
    if samples < min_samples:
        return InputDrift(None, samples, reason=f"{samples}/{min_samples} samples", features=features)
    worst = int(np.argmax(psis))
    return InputDrift(round(float(psis[worst]), 6), samples, ref.names[worst], round(float(kss.max()), 6), features)


def worst_per_row(ref: Reference, rows: npt.NDArray[np.int64], samples: Sequence[int],
                  min_samples: int) -> list[float | None]:
    """Worst-feature PSI of each row of a (rows x bins) matrix of flat counts, all at once (a drift time series)."""
    if not len(rows):
        return []
    totals = np.add.reduceat(rows, ref.starts, axis=1).astype(np.float64)
    share = rows / np.repeat(np.maximum(totals, 1.0), ref.sizes, axis=1)
    a, e = np.maximum(share, EPS), np.maximum(ref.expected, EPS)
    psis = np.add.reduceat((a - e) * np.log(a / e), ref.starts, axis=1)
    psis[totals <= 0] = 0.0
    worst = psis.max(axis=1)
    return [round(float(w), 6) if n >= min_samples else None for w, n in zip(worst, samples, strict=True)]
