"""The preprocessing pipeline: an ordered list of ops and the names of what it produces.

One object runs on the workstation (fit on training data, then ``to_dict`` into the
bundle) and on the device (``from_dict`` from the bundle, then ``transform``), so the
model sees the same features in both places. The spec is data, never code::

    {"opset": 1, "input": {"kind": "image"},
     "steps": [{"op": "resize", "version": 1, "since": "0.1.0", "params": {...}}, ...],
     "output": "input"}

``output`` is either one feature name (the last step yields one array) or a mapping
model-input-name -> produced name (the last step yields named arrays, e.g. tokenize).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundles.errors import BundleError, PreprocessingError
from bundles.preprocessing.base import KINDS, OPSET_VERSION, Op, check_opset, op_from_dict
from bundles.preprocessing.table import Table, table_from_raw

MAX_STEPS = 256
#: Foreign errors a step may raise on data it cannot take; translated once, here.
_FOREIGN = (ValueError, TypeError, IndexError, KeyError, ArithmeticError, MemoryError, zlib.error)


def _check_output(output: object) -> str | dict[str, str]:
    if isinstance(output, str) and output:
        return output
    if (
        isinstance(output, Mapping)
        and output
        and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in output.items())
    ):
        return dict(output)
    raise PreprocessingError(
        "pipeline 'output' must be a feature name or a mapping model-input -> produced name",
        found=repr(output)[:80],
    )


def _infer_kind(steps: Sequence[Op], given: str | None) -> str:
    allowed = set(KINDS)
    for step in steps:
        allowed &= step.kinds
    if given is not None:
        if given not in KINDS:
            raise PreprocessingError("unknown input kind", expected=list(KINDS), found=repr(given)[:40])
        if given not in allowed:
            raise PreprocessingError(
                f"input kind {given!r} does not fit the ops",
                found=[s.name for s in steps if given not in s.kinds],
            )
        return given
    if not allowed:
        raise PreprocessingError("the ops are for different input kinds", found=[s.name for s in steps])
    return next(k for k in KINDS if k in allowed)  # only generic ops: image first, as documented


def _check_raw(kind: str, raw: object) -> object:
    """Validate a raw batch for its kind; returns what the first op receives."""
    if kind == "tabular":
        return table_from_raw(raw)
    if kind == "text":
        if isinstance(raw, (list, tuple)) and raw and all(isinstance(t, str) for t in raw):
            return list(raw)
        hint = "; wrap a single text in a list" if isinstance(raw, str) else ""
        raise PreprocessingError(
            f"text input must be a non-empty list of str{hint}",
            found=type(raw).__name__ if not isinstance(raw, list) else "list with non-str items",
        )
    if isinstance(raw, np.ndarray):
        if raw.ndim not in (3, 4) or raw.shape[0] == 0:
            raise PreprocessingError(
                "image input array must have shape (N, H, W) or (N, H, W, C) with N >= 1",
                found=f"shape {raw.shape}",
            )
        if raw.dtype.kind not in "buif":
            raise PreprocessingError(
                "image input array must be numeric", expected="bool/int/float dtype", found=str(raw.dtype)
            )
        return raw
    if (
        isinstance(raw, (list, tuple))
        and raw
        and all(isinstance(b, (bytes, bytearray, memoryview)) for b in raw)
    ):
        return list(raw)
    raise PreprocessingError(
        "image input must be an (N, H, W[, C]) array or a non-empty list of encoded images",
        found=type(raw).__name__,
    )


@dataclass(frozen=True)
class Pipeline:
    """Steps run in order on a raw batch; see the module docstring for the spec."""

    steps: tuple[Op, ...]
    output: str | dict[str, str] = "input"
    input_kind: str = ""

    def __hash__(self) -> int:
        output = self.output if isinstance(self.output, str) else tuple(sorted(self.output.items()))
        return hash((self.steps, output, self.input_kind))

    def __init__(
        self, steps: Sequence[Op], output: str | Mapping[str, str] = "input", input_kind: str | None = None
    ) -> None:
        if not isinstance(steps, (list, tuple)) or len(steps) > MAX_STEPS:
            raise PreprocessingError(
                f"pipeline steps must be a list of at most {MAX_STEPS} ops", found=type(steps).__name__
            )
        for step in steps:
            if not isinstance(step, Op):
                raise PreprocessingError("pipeline steps must be ops", found=type(step).__name__)
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "output", _check_output(output))
        object.__setattr__(self, "input_kind", _infer_kind(self.steps, input_kind))

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        output = self.output if isinstance(self.output, str) else dict(self.output)
        return {
            "opset": OPSET_VERSION,
            "input": {"kind": self.input_kind},
            "steps": [step.to_dict() for step in self.steps],
            "output": output,
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], resources: Mapping[str, bytes] | None = None) -> Pipeline:
        """Rebuild from a spec; refuses unknown ops/versions/opsets with UnsupportedError."""
        if not isinstance(spec, Mapping):
            raise PreprocessingError("preprocessing spec must be a JSON object", found=type(spec).__name__)
        check_opset(spec.get("opset"))
        unknown = sorted(str(k)[:40] for k in spec if k not in ("opset", "input", "steps", "output"))
        if unknown:
            raise PreprocessingError(
                f"preprocessing spec has unknown key(s) {unknown}", expected="opset, input, steps, output"
            )
        source = spec.get("input")
        kind = source.get("kind") if isinstance(source, Mapping) else None
        if not isinstance(kind, str) or kind not in KINDS or len(source) != 1:  # type: ignore[arg-type]
            raise PreprocessingError(
                "spec 'input' must be {\"kind\": ...}", expected=list(KINDS), found=repr(source)[:80]
            )
        steps = spec.get("steps")
        if not isinstance(steps, list) or len(steps) > MAX_STEPS:
            raise PreprocessingError(
                f"spec 'steps' must be a list of at most {MAX_STEPS} steps", found=type(steps).__name__
            )
        if resources is not None and not isinstance(resources, Mapping):
            raise PreprocessingError(
                "resources must be a mapping name -> bytes", found=type(resources).__name__
            )
        ops = [op_from_dict(step, resources or {}) for step in steps]
        return cls(ops, output=spec.get("output"), input_kind=kind)  # type: ignore[arg-type]

    def resources(self) -> dict[str, bytes]:
        """Files the ops need in the bundle, name -> content."""
        out: dict[str, bytes] = {}
        for step in self.steps:
            for name, payload in step.resources().items():
                if out.get(name, payload) != payload:
                    raise PreprocessingError(f"two steps need different files named {name!r}")
                out[name] = payload
        return out

    # -- running -------------------------------------------------------------------------------
    def fit(self, raw_batch: object) -> Pipeline:
        """Learn every learning op's parameters in order, each on the output of the steps before it."""
        value = _check_raw(self.input_kind, raw_batch)
        fitted: list[Op] = []
        for step in self.steps:
            step = _run(step, "fit", step.fit, value)
            value = _run(step, "apply", step.apply, value)
            fitted.append(step)
        return Pipeline(fitted, self.output, self.input_kind)

    def transform(self, raw_batch: object) -> dict[str, np.ndarray]:
        """Raw batch -> model features (feature name -> batch array)."""
        value = _check_raw(self.input_kind, raw_batch)
        for step in self.steps:
            step.check_fitted()
            value = _run(step, "apply", step.apply, value)
        return self._features(value)

    def _features(self, value: object) -> dict[str, np.ndarray]:
        if isinstance(value, Table):
            value = value.to_matrix(np.float32)
        named: Mapping[str, object]
        if isinstance(value, Mapping):
            if isinstance(self.output, str):
                raise PreprocessingError(
                    "pipeline output must map model inputs to these features", found=sorted(value)
                )
            named = value
        else:
            named = {self.output if isinstance(self.output, str) else "input": value}
        mapping = {self.output: self.output} if isinstance(self.output, str) else self.output
        features: dict[str, np.ndarray] = {}
        for model_name, produced in mapping.items():
            array = named.get(produced)
            if array is None:
                raise PreprocessingError(f"pipeline output {produced!r} is not produced", found=sorted(named))
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "buif" or array.ndim == 0:
                what = (
                    "images of different sizes (add a resize step)"
                    if isinstance(array, list)
                    else (f"{getattr(array, 'dtype', type(array).__name__)}")
                )
                raise PreprocessingError(
                    f"pipeline output {produced!r} is not a numeric batch array", found=what
                )
            features[model_name] = np.ascontiguousarray(array)
        return features


def _run(step: Op, what: str, func: Any, value: object) -> Any:
    try:
        with np.errstate(all="ignore"):
            return func(value)
    except BundleError:
        raise
    except _FOREIGN as exc:
        raise PreprocessingError(f"op {step.name!r} could not {what} this input: {str(exc)[:200]}") from None
