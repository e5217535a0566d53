"""Checks that turn untrusted parameter values into typed ones.

A spec arrives from a bundle as JSON, and an op can also be built in Python with any
value, so every op validates its fields in ``__post_init__`` through these helpers.
They accept ``object`` and return a precise type or raise :class:`PreprocessingError`
naming the op, the parameter, what was expected and what was found. ``bool`` is never
accepted where a number is expected (``True`` is an ``int`` in Python, but a spec that
says ``"size": true`` is a mistake).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bundles.errors import PreprocessingError

#: Largest image side an op accepts as a parameter (pixels). Keeps a hostile spec
#: from asking for a multi-gigabyte allocation.
MAX_SIDE = 16384
#: Largest number of elements a shape parameter may describe per example.
MAX_ELEMENTS = 1 << 28


def _found(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(op: str, param: str, expected: str, value: object) -> PreprocessingError:
    """Build the error for a bad parameter value."""
    return PreprocessingError(f"op {op!r}: bad parameter {param!r}", expected=expected, found=_found(value))


def as_int(op: str, param: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(op, param, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise fail(op, param, f"an integer in [{lo}, {hi}]", value)
    return value


def as_float(op: str, param: str, value: object, *, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(op, param, "a number", value)
    try:
        number = float(value)
    except OverflowError:
        raise fail(op, param, "a number that fits a float64", value) from None
    if finite and not math.isfinite(number):
        raise fail(op, param, "a finite number", value)
    return number


def as_bool(op: str, param: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise fail(op, param, "true or false", value)
    return value


def as_choice(op: str, param: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise fail(op, param, f"one of {list(choices)}", value)
    return value


def as_str(op: str, param: str, value: object, *, max_len: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise fail(op, param, f"a non-empty string of at most {max_len} characters", value)
    return value


def as_seq(op: str, param: str, value: object, max_len: int = 1_000_000) -> tuple[object, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > max_len:
        raise fail(op, param, f"a list of at most {max_len} items", value)
    return tuple(value)


def as_int_tuple(
    op: str,
    param: str,
    value: object,
    *,
    length: int | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> tuple[int, ...]:
    items = as_seq(op, param, value, max_len=64)
    if length is not None and len(items) != length:
        raise fail(op, param, f"a list of {length} integers", value)
    return tuple(as_int(op, param, item, lo, hi) for item in items)


def as_float_tuple(op: str, param: str, value: object, *, min_len: int = 1) -> tuple[float, ...]:
    items = as_seq(op, param, value, max_len=4096)
    if len(items) < min_len:
        raise fail(op, param, f"a list of at least {min_len} numbers", value)
    return tuple(as_float(op, param, item) for item in items)


def as_columns(op: str, param: str, value: object) -> tuple[int | str, ...] | None:
    """Column references: ``None`` (all), or a list of positions (int) or names (str)."""
    if value is None:
        return None
    items = as_seq(op, param, value, max_len=100_000)
    if not items:
        raise fail(op, param, "null (all columns) or a non-empty list of column indices or names", value)
    out: list[int | str] = []
    for item in items:
        is_name = isinstance(item, str) and bool(item)
        if is_name or (isinstance(item, int) and not isinstance(item, bool) and item >= 0):
            out.append(item)  # type: ignore[arg-type]
        else:
            raise fail(op, param, "column indices (int >= 0) or names (non-empty str)", item)
    return tuple(out)


def optional_float_tuple(op: str, param: str, value: object) -> tuple[float, ...] | None:
    """Fitted parameters are ``None`` until :meth:`fit` runs."""
    if value is None:
        return None
    return as_float_tuple(op, param, value, min_len=0)
