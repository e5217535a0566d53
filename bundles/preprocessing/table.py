"""The tabular value that flows between tabular ops.

Raw tabular batches come in three shapes (2-D array, dict of columns, list of dict
rows); ops see one: a :class:`Table` of named 1-D columns, each either numeric
(``float64``, missing = NaN) or categorical (``object`` holding ``str``, missing =
``None``). Keeping columns separate lets ``one_hot`` take strings next to numbers; the
pipeline turns the table into one ``float32`` matrix at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bundles.errors import PreprocessingError

MAX_COLUMNS = 100_000


@dataclass(frozen=True)
class Table:
    """Named columns of equal length. ``names`` are unique."""

    names: tuple[str, ...]
    columns: tuple[np.ndarray, ...]

    @property
    def n_rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def is_numeric(self, index: int) -> bool:
        return self.columns[index].dtype == np.float64

    def resolve(self, op: str, refs: Sequence[int | str] | None, *, numeric: bool) -> list[int]:
        """Column references (position or name; None = all) -> positions."""
        if refs is None:
            picked = [i for i in range(len(self.names)) if not numeric or self.is_numeric(i)]
            if numeric and not picked:
                raise PreprocessingError(
                    f"op {op!r}: the table has no numeric column", found=list(self.names)[:20]
                )
            return picked
        out: list[int] = []
        for ref in refs:
            if isinstance(ref, int):
                if ref >= len(self.names):
                    raise PreprocessingError(
                        f"op {op!r}: column index {ref} out of range",
                        expected=f"< {len(self.names)}",
                        found=ref,
                    )
                index = ref
            else:
                if ref not in self.names:
                    raise PreprocessingError(
                        f"op {op!r}: no column named {ref!r}", expected=list(self.names)[:20], found=ref
                    )
                index = self.names.index(ref)
            if numeric and not self.is_numeric(index):
                raise PreprocessingError(
                    f"op {op!r}: column {self.names[index]!r} holds strings, expected numbers; "
                    "encode it with one_hot first"
                )
            out.append(index)
        return out

    def replace(self, updates: Mapping[int, np.ndarray]) -> Table:
        cols = list(self.columns)
        for index, column in updates.items():
            cols[index] = column
        return Table(self.names, tuple(cols))

    def to_matrix(self, dtype: np.dtype[np.generic] | type = np.float32) -> np.ndarray:
        for name, column in zip(self.names, self.columns, strict=True):
            if column.dtype != np.float64:
                raise PreprocessingError(
                    f"column {name!r} holds strings; a model input must be numeric: add a one_hot step"
                )
        if not self.columns:
            raise PreprocessingError("the table has no columns left")
        return np.stack(self.columns, axis=1).astype(dtype)


def _column(name: str, values: Sequence[object]) -> np.ndarray:
    """A list of Python scalars -> numeric float64 or categorical object column."""
    has_str = has_num = False
    for v in values:
        if isinstance(v, str):
            has_str = True
        elif v is None or isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)):
            has_num = has_num or v is not None
        else:
            raise PreprocessingError(
                f"column {name!r} holds a {type(v).__name__}",
                expected="numbers, strings or None (missing)",
            )
    if has_str and has_num:
        raise PreprocessingError(f"column {name!r} mixes numbers and strings", expected="one kind per column")
    if has_str:
        col = np.empty(len(values), dtype=object)
        col[:] = list(values)
        return col
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            out[i] = math.nan if v is None else float(v)  # type: ignore[arg-type]
        except OverflowError:
            raise PreprocessingError(
                f"column {name!r}: value too large for float64", found=repr(v)[:40]
            ) from None
    return out


def _array_column(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind in "biuf":
        with np.errstate(over="ignore"):
            return array.astype(np.float64)
    if array.dtype.kind in "OU":
        return _column(name, array.tolist())
    raise PreprocessingError(
        f"column {name!r} has dtype {array.dtype}", expected="numbers (bool/int/float) or strings"
    )


def _check_rows(n: int) -> None:
    if n == 0:
        raise PreprocessingError("tabular batch is empty", expected="at least one row")


def table_from_raw(value: object) -> Table:
    """Accept a 2-D ndarray, a dict of 1-D columns, a list of dict rows, or a Table."""
    if isinstance(value, Table):
        return value
    if isinstance(value, np.ndarray):
        if value.ndim != 2:
            raise PreprocessingError(
                "tabular array must be 2-D (rows, columns)", found=f"shape {value.shape}"
            )
        _check_rows(value.shape[0])
        if value.shape[1] > MAX_COLUMNS or value.shape[1] == 0:
            raise PreprocessingError(
                "tabular array column count", expected=f"1..{MAX_COLUMNS}", found=value.shape[1]
            )
        names = tuple(str(i) for i in range(value.shape[1]))
        return Table(names, tuple(_array_column(n, value[:, i]) for i, n in enumerate(names)))
    if isinstance(value, Mapping):
        if not value or len(value) > MAX_COLUMNS:
            raise PreprocessingError("a dict of columns needs 1..100000 columns", found=len(value))
        names_l: list[str] = []
        cols: list[np.ndarray] = []
        for key, col in value.items():
            if not isinstance(key, str):
                raise PreprocessingError("column names must be strings", found=repr(key)[:40])
            if isinstance(col, np.ndarray):
                if col.ndim != 1:
                    raise PreprocessingError(f"column {key!r} must be 1-D", found=f"shape {col.shape}")
                cols.append(_array_column(key, col))
            elif isinstance(col, (list, tuple)):
                cols.append(_column(key, col))
            else:
                raise PreprocessingError(
                    f"column {key!r} must be a 1-D array or list", found=type(col).__name__
                )
            names_l.append(key)
        lengths = {len(c) for c in cols}
        if len(lengths) != 1:
            raise PreprocessingError("columns differ in length", found=sorted(lengths)[:10])
        _check_rows(lengths.pop())
        return Table(tuple(names_l), tuple(cols))
    if isinstance(value, (list, tuple)):
        _check_rows(len(value))
        order: dict[str, None] = {}
        for row in value:
            if not isinstance(row, Mapping):
                raise PreprocessingError(
                    "tabular rows must be dicts of column -> value", found=type(row).__name__
                )
            for key in row:
                if not isinstance(key, str):
                    raise PreprocessingError("column names must be strings", found=repr(key)[:40])
                order.setdefault(key, None)
            if len(order) > MAX_COLUMNS:
                raise PreprocessingError("too many columns", expected=f"<= {MAX_COLUMNS}")
        if not order:
            raise PreprocessingError("tabular rows have no columns")
        rows: list[Mapping[str, object]] = list(value)
        return Table(tuple(order), tuple(_column(k, [r.get(k) for r in rows]) for k in order))
    raise PreprocessingError(
        "tabular input has the wrong type",
        expected="2-D numpy array, dict of 1-D columns, or list of dict rows",
        found=type(value).__name__,
    )
