"""Golden vectors: raw inputs, expected features and expected outputs per variant, with tolerances.

Stored as ``golden.npz`` (NumPy's format, loaded with ``allow_pickle=False``)::

    raw                          the raw inputs (numeric array, or a unicode array for text)
    features__<input name>       what preprocessing must produce from ``raw``
    outputs__<variant>__<output> what each variant must output from those features

Tolerances live in the manifest's ``golden`` section: ``features_atol`` and per variant ``atol``/``rtol``.
The converter writes the file; the agent's self-test and the tests run these checks.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundles.errors import FormatError, VerificationError


class GoldenMismatchError(VerificationError):
    """Features or outputs differ from the golden vectors beyond tolerance."""


@dataclass(frozen=True)
class Golden:
    raw: np.ndarray
    features: dict[str, np.ndarray]
    outputs: dict[str, dict[str, np.ndarray]]
    """variant id -> output name -> expected array."""

    @classmethod
    def from_bytes(cls, data: bytes) -> Golden:
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
            arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise FormatError(f"golden vectors are not a readable .npz: {exc}", path="golden.npz") from exc
        if "raw" not in arrays:
            raise FormatError("golden vectors lack the raw inputs", path="golden.npz", expected="raw")
        features = {k.split("__", 1)[1]: v for k, v in arrays.items() if k.startswith("features__")}
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            if key.startswith("outputs__"):
                parts = key.split("__", 2)
                if len(parts) != 3:
                    raise FormatError("bad golden key", path="golden.npz", found=key)
                outputs.setdefault(parts[1], {})[parts[2]] = value
        return cls(arrays["raw"], features, outputs)

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {"raw": self.raw}
        arrays.update({f"features__{k}": v for k, v in self.features.items()})
        for variant, outs in self.outputs.items():
            arrays.update({f"outputs__{variant}__{k}": v for k, v in outs.items()})
        buf = io.BytesIO()
        np.savez(buf, **dict(sorted(arrays.items())))  # type: ignore[arg-type]  # numpy stub: kwargs are arrays
        return buf.getvalue()

    def raw_inputs(self) -> Any:
        """Raw inputs as the preprocessing expects them (a list of str for text)."""
        if self.raw.dtype.kind == "U":
            return [str(x) for x in self.raw]
        return self.raw


def _compare(name: str, expected: np.ndarray, found: np.ndarray, atol: float, rtol: float) -> None:
    if expected.shape != found.shape:
        raise GoldenMismatchError("shape differs from the golden vector", path=name,
                                  expected=expected.shape, found=found.shape)
    if expected.dtype.kind in "iub" and found.dtype.kind in "iub":
        bad = int(np.count_nonzero(expected != found))
        if bad:
            raise GoldenMismatchError(f"{bad} values differ from the golden vector", path=name)
        return
    e, f = expected.astype(np.float64), found.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise GoldenMismatchError("non-finite values where the golden vector has none", path=name)
    diff = np.abs(e - f)
    allowed = atol + rtol * np.abs(e)
    if np.any(diff > allowed):
        worst = float(np.max(diff - allowed))
        raise GoldenMismatchError("values differ from the golden vector beyond tolerance", path=name,
                                  expected=f"|diff| <= {atol} + {rtol}*|x|",
                                  found=f"max excess {worst:.3g} in {int(np.count_nonzero(diff > allowed))} values")


def check_features(golden: Golden, features: Mapping[str, np.ndarray], atol: float) -> None:
    """Preprocessing output must match the golden features (exactly for integers)."""
    for name, expected in golden.features.items():
        if name not in features:
            raise GoldenMismatchError("preprocessing did not produce a golden feature", path=name,
                                      expected=sorted(golden.features), found=sorted(features))
        _compare(f"features/{name}", expected, np.asarray(features[name]), atol, 0.0)


def check_outputs(golden: Golden, variant: str, outputs: Mapping[str, np.ndarray], atol: float,
                  rtol: float) -> None:
    """A variant's outputs on the golden features must match its golden outputs within tolerance."""
    expected = golden.outputs.get(variant)
    if not expected:
        raise GoldenMismatchError("no golden outputs for this variant", path=variant)
    for name, value in expected.items():
        if name not in outputs:
            raise GoldenMismatchError("model did not produce a golden output", path=f"{variant}/{name}",
                                      expected=sorted(expected), found=sorted(outputs))
        _compare(f"{variant}/{name}", value, np.asarray(outputs[name]), atol, rtol)


def tolerances(golden_section: Mapping[str, Any], variant: str) -> tuple[float, float]:
    v = golden_section.get("variants", {}).get(variant, {})
    return float(v.get("atol", 1e-4)), float(v.get("rtol", 1e-3))
