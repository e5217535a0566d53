"""Ops on any numeric batch: scale, clip, cast, reshape, expand_dims.

They take an array whose first axis is the batch. A :class:`Table` is turned into its
``float64`` matrix first (``clip`` keeps the table, so it can work column by column),
and ``cast`` also takes the dict of arrays a tokenizer produces (e.g. ids to int32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from bundles.errors import PreprocessingError
from bundles.preprocessing import _params as P
from bundles.preprocessing.base import Op, register
from bundles.preprocessing.table import Table

DTYPES = (
    "float16",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "bool",
)


def numeric_array(op: str, value: object) -> np.ndarray:
    """A non-empty numeric batch array; a Table becomes its float64 matrix."""
    if isinstance(value, Table):
        return value.to_matrix(np.float64)
    if not isinstance(value, np.ndarray):
        hint = "; images differ in size: add a resize step first" if isinstance(value, list) else ""
        raise PreprocessingError(
            f"op {op!r}: expected a numeric batch array{hint}", found=type(value).__name__
        )
    if value.ndim == 0 or value.shape[0] == 0:
        raise PreprocessingError(f"op {op!r}: expected a non-empty batch array", found=f"shape {value.shape}")
    if value.dtype.kind not in "buif":
        raise PreprocessingError(
            f"op {op!r}: expected numbers", expected="bool/int/float dtype", found=str(value.dtype)
        )
    return value


@register
@dataclass(frozen=True)
class Scale(Op):
    """``x * multiply + offset`` computed and returned in float32 (e.g. 1/255 for 8-bit pixels)."""

    name: ClassVar[str] = "scale"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"

    multiply: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "multiply", P.as_float(self.name, "multiply", self.multiply))
        object.__setattr__(self, "offset", P.as_float(self.name, "offset", self.offset))

    def apply(self, value: object) -> object:
        data = numeric_array(self.name, value).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            return data * np.float32(self.multiply) + np.float32(self.offset)


@register
@dataclass(frozen=True)
class Clip(Op):
    """Bound values to ``[min, max]`` (either may be null). NaN stays NaN.

    On a table it works on ``columns`` (null: every numeric column) and keeps the table;
    on an array float dtypes are kept and other dtypes become float32.
    """

    name: ClassVar[str] = "clip"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"

    min: float | None = None
    max: float | None = None
    columns: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        lo = None if self.min is None else P.as_float(self.name, "min", self.min)
        hi = None if self.max is None else P.as_float(self.name, "max", self.max)
        if lo is None and hi is None:
            raise P.fail(self.name, "min", "at least one of min and max", None)
        if lo is not None and hi is not None and lo > hi:
            raise P.fail(self.name, "max", f"a value >= min ({lo})", hi)
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)
        object.__setattr__(self, "columns", P.as_columns(self.name, "columns", self.columns))

    def _clip(self, data: np.ndarray) -> np.ndarray:
        lo = -np.inf if self.min is None else self.min
        hi = np.inf if self.max is None else self.max
        out: np.ndarray = np.clip(data, np.asarray(lo, data.dtype), np.asarray(hi, data.dtype))
        return out

    def apply(self, value: object) -> object:
        if isinstance(value, Table):
            picked = value.resolve(self.name, self.columns, numeric=True)
            return value.replace({i: self._clip(value.columns[i]) for i in picked})
        if self.columns is not None:
            raise PreprocessingError("op 'clip': 'columns' needs tabular input", found=type(value).__name__)
        data = numeric_array(self.name, value)
        if data.dtype.kind != "f":
            data = data.astype(np.float32)
        with np.errstate(over="ignore"):
            return self._clip(data)


def _cast(array: np.ndarray, dtype: np.dtype[np.generic]) -> np.ndarray:
    if array.dtype.kind not in "buif":
        raise PreprocessingError("op 'cast': expected numbers", found=str(array.dtype))
    if dtype.kind in "iu" and array.dtype.kind == "f" and array.size:
        if not np.isfinite(array).all():
            raise PreprocessingError(f"op 'cast': NaN or infinity cannot become {dtype}; add an impute step")
        info = np.iinfo(dtype.name)
        lo, hi = float(array.min()), float(array.max())
        if lo < info.min or hi > info.max:
            raise PreprocessingError(
                f"op 'cast': values out of range for {dtype}; add a clip step",
                expected=f"[{info.min}, {info.max}]",
                found=f"[{lo}, {hi}]",
            )
    elif dtype.kind in "iu" and array.dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype.name)
        lo_i, hi_i = int(array.min()), int(array.max())
        if lo_i < info.min or hi_i > info.max:
            raise PreprocessingError(
                f"op 'cast': values out of range for {dtype}",
                expected=f"[{info.min}, {info.max}]",
                found=f"[{lo_i}, {hi_i}]",
            )
    with np.errstate(over="ignore"):
        return array.astype(dtype)


@register
@dataclass(frozen=True)
class Cast(Op):
    """Convert to ``dtype``; refuses NaN/inf or out-of-range values for integer targets
    rather than wrapping them silently."""

    name: ClassVar[str] = "cast"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"

    dtype: str = "float32"

    def __post_init__(self) -> None:
        P.as_choice(self.name, "dtype", self.dtype, DTYPES)

    def apply(self, value: object) -> object:
        dtype = np.dtype(self.dtype)
        if isinstance(value, dict):
            return {k: _cast(numeric_array(self.name, v), dtype) for k, v in value.items()}
        return _cast(numeric_array(self.name, value), dtype)


@register
@dataclass(frozen=True)
class Reshape(Op):
    """Reshape each example to ``shape`` (batch axis excluded; one entry may be -1)."""

    name: ClassVar[str] = "reshape"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = P.as_int_tuple(self.name, "shape", self.shape, lo=-1, hi=P.MAX_ELEMENTS)
        if not shape or shape.count(-1) > 1 or 0 in shape:
            raise P.fail(self.name, "shape", "a non-empty list of positive sizes with at most one -1", shape)
        object.__setattr__(self, "shape", shape)

    def apply(self, value: object) -> object:
        data = numeric_array(self.name, value)
        per_example = math.prod(data.shape[1:])
        known = math.prod(s for s in self.shape if s != -1)
        if (-1 in self.shape and per_example % known) or (-1 not in self.shape and known != per_example):
            raise PreprocessingError(
                "op 'reshape': element count does not match",
                expected=f"{list(self.shape)} per example",
                found=f"shape {data.shape}",
            )
        return data.reshape((data.shape[0], *self.shape))


@register
@dataclass(frozen=True)
class ExpandDims(Op):
    """Insert an axis of size 1 at ``axis`` (NumPy numbering of the batch array, never before the batch)."""

    name: ClassVar[str] = "expand_dims"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"

    axis: int = -1

    def __post_init__(self) -> None:
        P.as_int(self.name, "axis", self.axis, -32, 32)

    def apply(self, value: object) -> object:
        data = numeric_array(self.name, value)
        ndim = data.ndim + 1
        if not -ndim <= self.axis < ndim or self.axis in (0, -ndim) or ndim > 32:
            raise PreprocessingError(
                "op 'expand_dims': axis out of range (axis 0 is the batch)",
                expected=f"1..{ndim - 1} or -1..-{ndim - 1}",
                found=self.axis,
            )
        return np.expand_dims(data, self.axis)
