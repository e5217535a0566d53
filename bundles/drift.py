"""Input-drift profiles: reference bins written by the converter, counted on the device, compared on the server.

A bundle's ``reference_stats.json`` may carry a ``drift`` profile (:class:`DriftProfile`): a list of features,
each with interior bin edges (the deciles of the evaluation data, duplicates removed) and the share of the
evaluation data in each bin. The converter builds it (:func:`build_profile`); the device agent counts its own
inputs into the same bins (:class:`DriftCounter`) and sends the counts with each telemetry window; the server
sums them per version and compares them with the reference (``update_server.drift``: PSI, and a KS-style
distance on the binned distributions). Only counts per bin leave the device, never an input.

Features, by what the model takes:

* numeric inputs (tabular rows, images, audio frames): one feature per value of the model's first input
  when it has at most ``MAX_FEATURES`` values per sample, else one feature pooling all of them;
* text (a tokenized first input with an ``attention_mask``): the token-length distribution;
* embedding models: the distribution of the embedding's L2 norm, in addition.

Binning rule, the same everywhere: a value ``v`` falls in bin ``i`` such that ``edges[i-1] < v <= edges[i]``
(``numpy.searchsorted(edges, v, side="left")``); bin 0 holds everything up to the first edge, the last bin
everything above the last edge.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FORMAT = 1
QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_FEATURES = 128
SOURCES = ("input", "token_length", "output_norm")


@dataclass(frozen=True)
class DriftFeature:
    name: str
    source: str
    """``input`` (a value of the first input), ``token_length`` or ``output_norm``."""
    tensor: str
    index: int | None
    """For ``input``: the column of the flattened tensor; None pools every value."""
    edges: tuple[float, ...]
    expected: tuple[float, ...]
    """Reference share of each of the ``len(edges) + 1`` bins."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "tensor": self.tensor, "index": self.index,
                "edges": list(self.edges), "expected": list(self.expected)}


@dataclass(frozen=True)
class DriftProfile:
    features: tuple[DriftFeature, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "features": [f.to_dict() for f in self.features]}

    @property
    def digest(self) -> str:
        """Identifies the profile in telemetry (the server ignores counts made against another profile)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftProfile:
        """Parse a profile; raises ValueError naming what is wrong."""
        if d.get("format") != FORMAT:
            raise ValueError(f"drift profile format {d.get('format')!r} is not supported (expected {FORMAT})")
        features = []
        for i, f in enumerate(d.get("features") or []):
            edges = tuple(float(e) for e in f["edges"])
            expected = tuple(float(e) for e in f["expected"])
            if f["source"] not in SOURCES:
                raise ValueError(f"drift feature {i}: unknown source {f['source']!r}; expected one of {SOURCES}")
            if not edges or len(expected) != len(edges) + 1 or list(edges) != sorted(set(edges)):
                raise ValueError(f"drift feature {i}: needs strictly growing edges and one expected share per bin")
            index = f.get("index")
            features.append(DriftFeature(str(f["name"]), str(f["source"]), str(f["tensor"]),
                                         None if index is None else int(index), edges, expected))
        if not features:
            raise ValueError("drift profile has no features")
        return cls(tuple(features))


def feature_values(feature: DriftFeature, features: Mapping[str, Any],
                   outputs: Mapping[str, Any]) -> npt.NDArray[np.float64] | None:
    """The values of one drift feature in a batch (None when the batch lacks its tensor)."""
    source = outputs if feature.source == "output_norm" else features
    if feature.tensor not in source:
        return None
    x = np.asarray(source[feature.tensor], dtype=np.float64)
    flat = x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    if feature.source == "token_length":
        return np.asarray((flat != 0).sum(axis=1), dtype=np.float64)
    if feature.source == "output_norm":
        return np.asarray(np.linalg.norm(flat, axis=1), dtype=np.float64)
    if feature.index is None:
        return np.asarray(flat.ravel(), dtype=np.float64)
    if feature.index >= flat.shape[1]:
        return None
    return np.asarray(flat[:, feature.index], dtype=np.float64)


def bin_counts(edges: tuple[float, ...], values: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


def _feature(name: str, source: str, tensor: str, index: int | None,
             values: npt.NDArray[np.float64]) -> DriftFeature:
    values = values[np.isfinite(values)]
    if not len(values):
        values = np.zeros(1)
    edges = tuple(sorted({round(float(q), 6) for q in np.quantile(values, QUANTILES)}))
    counts = bin_counts(edges, values)
    return DriftFeature(name, source, tensor, index, edges,
                        tuple(round(float(c) / len(values), 6) for c in counts))


def build_profile(features: Mapping[str, Any], outputs: Mapping[str, Any], *, first_input: str, task: str,
                  max_features: int = MAX_FEATURES) -> DriftProfile:
    """The reference profile from evaluation features (preprocessed, as the model sees them) and outputs."""
    x = np.asarray(features[first_input])
    out: list[DriftFeature] = []
    if x.dtype.kind in "iu" and "attention_mask" in features:
        mask = np.asarray(features["attention_mask"])
        lengths = (mask.reshape(len(mask), -1) != 0).sum(axis=1).astype(np.float64)
        out.append(_feature("token_length", "token_length", "attention_mask", None, lengths))
    else:
        flat = x.reshape(len(x), -1).astype(np.float64)
        if flat.shape[1] <= max_features:
            out += [_feature(f"{first_input}[{i}]", "input", first_input, i, flat[:, i]) for i in range(flat.shape[1])]
        else:
            out.append(_feature(f"{first_input}[*]", "input", first_input, None, flat.ravel()))
    if task == "embedding":
        for name, value in outputs.items():
            arr = np.asarray(value, dtype=np.float64)
            norms = np.linalg.norm(arr.reshape(len(arr), -1), axis=1)
            out.append(_feature("embedding_norm", "output_norm", name, None, norms))
            break
    return DriftProfile(tuple(out))


class DriftCounter:
    """Counts inputs into a profile's bins (the device side); :meth:`take` returns and resets the counts.

    Per-value features of one tensor are binned together in one vectorized pass (edges padded with +inf), so
    counting 64 features costs about as much as counting one.
    """

    def __init__(self, profile: DriftProfile) -> None:
        self.profile = profile
        self.digest = profile.digest
        self.samples = 0
        self._counts = [np.zeros(len(f.edges) + 1, dtype=np.int64) for f in profile.features]
        self._columns: dict[str, tuple[list[int], npt.NDArray[np.int64], npt.NDArray[np.float64]]] = {}
        self._tables: dict[str, npt.NDArray[np.int64]] = {}
        by_tensor: dict[str, list[int]] = {}
        for k, f in enumerate(profile.features):
            if f.source == "input" and f.index is not None:
                by_tensor.setdefault(f.tensor, []).append(k)
        for tensor, ks in by_tensor.items():
            width = max(len(profile.features[k].edges) for k in ks)
            edges = np.full((len(ks), width), np.inf)
            for row, k in enumerate(ks):
                edges[row, :len(profile.features[k].edges)] = profile.features[k].edges
            cols = np.asarray([profile.features[k].index for k in ks], dtype=np.int64)
            self._columns[tensor] = (ks, cols, edges)
            self._tables[tensor] = np.zeros((len(ks), width + 1), dtype=np.int64)

    def observe(self, features: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        done: set[int] = set()
        n = 0
        for tensor, (ks, cols, edges) in self._columns.items():
            if tensor not in features:
                continue
            x = np.asarray(features[tensor], dtype=np.float64)
            flat = x.reshape(len(x), -1)
            if flat.shape[1] <= int(cols.max()):
                continue
            vals = flat[:, cols]  # (N, F)
            bins = (vals[:, :, None] > edges[None, :, :]).sum(axis=2)  # (N, F): value > edge[j] for j < bin
            width = edges.shape[1] + 1
            self._tables[tensor] += np.bincount((bins + np.arange(len(ks)) * width).ravel(),
                                                minlength=len(ks) * width).reshape(len(ks), width)
            done.update(ks)
            n = max(n, len(flat))
        for k, f in enumerate(self.profile.features):
            if k in done:
                continue
            values = feature_values(f, features, outputs)
            if values is None:
                continue
            self._counts[k] += bin_counts(f.edges, values)
            n = max(n, len(values) if f.source != "input" else len(np.asarray(features[f.tensor])))
        self.samples += n

    def take(self) -> dict[str, Any] | None:
        """``{"profile", "samples", "counts"}`` since the last call, or None when nothing was counted."""
        if not self.samples:
            return None
        counts = [c.copy() for c in self._counts]
        for tensor, (ks, _, _) in self._columns.items():
            table = self._tables[tensor]
            for row, k in enumerate(ks):
                counts[k] += table[row, :len(counts[k])]
            table[:] = 0
        out = {"profile": self.digest, "samples": self.samples, "counts": [c.tolist() for c in counts]}
        self.samples = 0
        self._counts = [np.zeros_like(c) for c in self._counts]
        return out
