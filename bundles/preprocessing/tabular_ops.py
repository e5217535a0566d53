"""Tabular ops: select_columns, impute, standard_scale, one_hot.

``impute``, ``standard_scale`` and ``one_hot`` learn parameters in :meth:`fit`. Fitting
also pins ``columns`` (null meant "every eligible column") to the column names seen, so
the device applies the learned values to exactly the columns they were learned from.
Fitted values must be finite: JSON cannot carry NaN, and a NaN mean would poison every
feature on the device.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from bundles.errors import PreprocessingError
from bundles.preprocessing import _params as P
from bundles.preprocessing.base import Op, register
from bundles.preprocessing.table import Table, table_from_raw

TABULAR = frozenset({"tabular"})
Scalar = float | str


def _pin(table: Table, picked: list[int]) -> tuple[int | str, ...]:
    return tuple(table.names[i] for i in picked)


def _finite(op: str, column: str, value: float) -> float:
    if not math.isfinite(value):
        raise PreprocessingError(
            f"op {op!r}: column {column!r} has no finite values to fit from (all missing or infinite)",
            found=value,
        )
    return value


@register
@dataclass(frozen=True)
class SelectColumns(Op):
    """Keep ``columns`` (positions or names), in the order given."""

    name: ClassVar[str] = "select_columns"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = TABULAR

    columns: tuple[int | str, ...]

    def __post_init__(self) -> None:
        cols = P.as_columns(self.name, "columns", self.columns)
        if cols is None or len(set(cols)) != len(cols):
            raise P.fail(self.name, "columns", "a non-empty list without repeats", self.columns)
        object.__setattr__(self, "columns", cols)

    def apply(self, value: object) -> object:
        table = table_from_raw(value)
        picked = table.resolve(self.name, self.columns, numeric=False)
        if len(set(picked)) != len(picked):
            raise PreprocessingError(
                "op 'select_columns': the same column is selected twice", found=list(self.columns)
            )
        return Table(tuple(table.names[i] for i in picked), tuple(table.columns[i] for i in picked))


def _most_frequent(values: list[Scalar]) -> Scalar:
    counts = Counter(values)
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)  # ties -> smallest, as scikit-learn


@register
@dataclass(frozen=True)
class Impute(Op):
    """Fill missing values (NaN / None) per column with a learned or constant value.

    ``strategy``: mean, median (numeric columns), most_frequent (any), constant
    (``fill_value``, number or string). ``values`` holds the learned fill per column.
    """

    name: ClassVar[str] = "impute"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = TABULAR

    strategy: str = "mean"
    fill_value: float | str | None = None
    columns: tuple[int | str, ...] | None = None
    values: tuple[float | str, ...] | None = None

    def __post_init__(self) -> None:
        P.as_choice(self.name, "strategy", self.strategy, ("mean", "median", "most_frequent", "constant"))
        if self.strategy == "constant":
            if isinstance(self.fill_value, str):
                P.as_str(self.name, "fill_value", self.fill_value, max_len=1024)
            else:
                object.__setattr__(self, "fill_value", P.as_float(self.name, "fill_value", self.fill_value))
        elif self.fill_value is not None:
            raise P.fail(self.name, "fill_value", "null unless strategy is 'constant'", self.fill_value)
        object.__setattr__(self, "columns", P.as_columns(self.name, "columns", self.columns))
        if self.values is not None:
            items = P.as_seq(self.name, "values", self.values)
            vals = tuple(v if isinstance(v, str) else P.as_float(self.name, "values", v) for v in items)
            if self.columns is None or len(vals) != len(self.columns):
                raise P.fail(self.name, "values", "one value per pinned column", self.values)
            object.__setattr__(self, "values", vals)

    @property
    def fitted(self) -> bool:
        return self.values is not None

    def fit(self, value: object) -> Op:
        table = table_from_raw(value)
        numeric = self.strategy in ("mean", "median") or isinstance(self.fill_value, float)
        picked = table.resolve(self.name, self.columns, numeric=numeric)
        if self.strategy == "constant" and self.columns is None and isinstance(self.fill_value, str):
            picked = [i for i in range(len(table.names)) if not table.is_numeric(i)]
        if not picked:
            raise PreprocessingError("op 'impute': no column to impute of the fill value's kind")
        learned: list[Scalar] = []
        for i in picked:
            col, cname = table.columns[i], table.names[i]
            if self.strategy == "constant":
                assert self.fill_value is not None
                learned.append(self.fill_value)
            elif self.strategy == "mean":
                learned.append(
                    _finite(
                        self.name,
                        cname,
                        float(np.mean(col[~np.isnan(col)])) if (~np.isnan(col)).any() else math.nan,
                    )
                )
            elif self.strategy == "median":
                present = col[~np.isnan(col)]
                learned.append(
                    _finite(self.name, cname, float(np.median(present)) if present.size else math.nan)
                )
            else:
                present_vals: list[Scalar] = (
                    [float(v) for v in col if math.isfinite(v)]
                    if table.is_numeric(i)
                    else [v for v in col if v is not None]
                )
                if not present_vals:
                    raise PreprocessingError(f"op 'impute': column {cname!r} has no values to fit from")
                learned.append(_most_frequent(present_vals))
        return dataclasses.replace(self, columns=_pin(table, picked), values=tuple(learned))

    def apply(self, value: object) -> object:
        self.check_fitted()
        assert self.values is not None
        table = table_from_raw(value)
        picked = table.resolve(self.name, self.columns, numeric=False)
        updates: dict[int, np.ndarray] = {}
        for i, fill in zip(picked, self.values, strict=True):
            col = table.columns[i]
            if table.is_numeric(i) != (not isinstance(fill, str)):
                raise PreprocessingError(
                    f"op 'impute': column {table.names[i]!r} and its fill value differ in kind",
                    expected=type(fill).__name__,
                    found=str(col.dtype),
                )
            out = col.copy()
            if isinstance(fill, str):
                out[[v is None for v in col]] = fill
            else:
                out[np.isnan(col)] = fill
            updates[i] = out
        return table.replace(updates)


@register
@dataclass(frozen=True)
class StandardScale(Op):
    """``(x - mean) / std`` per column with the population std; a zero std is taken as 1
    (a constant column becomes 0 rather than NaN), as scikit-learn's StandardScaler does."""

    name: ClassVar[str] = "standard_scale"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = TABULAR

    columns: tuple[int | str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", P.as_columns(self.name, "columns", self.columns))
        mean = P.optional_float_tuple(self.name, "mean", self.mean)
        std = P.optional_float_tuple(self.name, "std", self.std)
        if (mean is None) != (std is None):
            raise P.fail(self.name, "std", "mean and std both set or both null", self.std)
        if mean is not None and std is not None:
            if self.columns is None or not len(mean) == len(std) == len(self.columns):
                raise P.fail(self.name, "mean", "one mean and one std per pinned column", self.mean)
            if any(s <= 0 for s in std):
                raise P.fail(self.name, "std", "positive values", self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, value: object) -> Op:
        table = table_from_raw(value)
        picked = table.resolve(self.name, self.columns, numeric=True)
        means, stds = [], []
        for i in picked:
            col = table.columns[i]
            present = col[~np.isnan(col)]
            with np.errstate(over="ignore", invalid="ignore"):
                mean = float(np.mean(present)) if present.size else math.nan
                std = float(np.std(present)) if present.size else math.nan
            means.append(_finite(self.name, table.names[i], mean))
            stds.append(_finite(self.name, table.names[i], std) or 1.0)
        return dataclasses.replace(self, columns=_pin(table, picked), mean=tuple(means), std=tuple(stds))

    def apply(self, value: object) -> object:
        self.check_fitted()
        assert self.mean is not None and self.std is not None
        table = table_from_raw(value)
        picked = table.resolve(self.name, self.columns, numeric=True)
        with np.errstate(over="ignore", invalid="ignore"):
            return table.replace(
                {i: (table.columns[i] - m) / s for i, m, s in zip(picked, self.mean, self.std, strict=True)}
            )


def _category(op: str, value: object) -> Scalar:
    if isinstance(value, str):
        return value
    return P.as_float(op, "categories", value)


@register
@dataclass(frozen=True)
class OneHot(Op):
    """Replace each column by one 0/1 column per category seen in fit (sorted), named
    ``"<column>=<category>"``. A missing or unseen value gives all zeros
    (``handle_unknown="zeros"``) or an error (``"error"``)."""

    name: ClassVar[str] = "one_hot"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = TABULAR

    columns: tuple[int | str, ...] | None = None
    handle_unknown: str = "zeros"
    max_categories: int = 1000
    categories: tuple[tuple[float | str, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", P.as_columns(self.name, "columns", self.columns))
        P.as_choice(self.name, "handle_unknown", self.handle_unknown, ("zeros", "error"))
        P.as_int(self.name, "max_categories", self.max_categories, 1, 100_000)
        if self.categories is not None:
            cats = tuple(
                tuple(
                    _category(self.name, c)
                    for c in P.as_seq(self.name, "categories", inner, self.max_categories)
                )
                for inner in P.as_seq(self.name, "categories", self.categories)
            )
            if self.columns is None or len(cats) != len(self.columns):
                raise P.fail(self.name, "categories", "one list per pinned column", self.categories)
            for inner in cats:
                if not inner or len(set(inner)) != len(inner) or len({type(c) for c in inner}) != 1:
                    raise P.fail(
                        self.name, "categories", "non-empty lists of distinct values of one kind", inner
                    )
            object.__setattr__(self, "categories", cats)

    @property
    def fitted(self) -> bool:
        return self.categories is not None

    def fit(self, value: object) -> Op:
        table = table_from_raw(value)
        if self.columns is None:
            picked = [i for i in range(len(table.names)) if not table.is_numeric(i)]
            if not picked:
                raise PreprocessingError(
                    "op 'one_hot': no string column to encode; name the columns to encode"
                )
        else:
            picked = table.resolve(self.name, self.columns, numeric=False)
        cats: list[tuple[Scalar, ...]] = []
        for i in picked:
            col = table.columns[i]
            if table.is_numeric(i):
                seen: list[Scalar] = sorted({float(v) for v in col if math.isfinite(v)})
            else:
                seen = sorted({v for v in col if v is not None})
            if not seen or len(seen) > self.max_categories:
                raise PreprocessingError(
                    f"op 'one_hot': column {table.names[i]!r} has {len(seen)} categories",
                    expected=f"1..{self.max_categories} (raise max_categories)",
                )
            cats.append(tuple(seen))
        return dataclasses.replace(self, columns=_pin(table, picked), categories=tuple(cats))

    def apply(self, value: object) -> object:
        self.check_fitted()
        assert self.categories is not None
        table = table_from_raw(value)
        picked = table.resolve(self.name, self.columns, numeric=False)
        expand = dict(zip(picked, self.categories, strict=True))
        names: list[str] = []
        cols: list[np.ndarray] = []
        for i, (cname, col) in enumerate(zip(table.names, table.columns, strict=True)):
            if i not in expand:
                names.append(cname)
                cols.append(col)
                continue
            cats = expand[i]
            if isinstance(cats[0], str) == table.is_numeric(i):
                raise PreprocessingError(
                    f"op 'one_hot': column {cname!r} changed kind since fit",
                    expected="strings" if isinstance(cats[0], str) else "numbers",
                )
            keys = np.empty(len(cats), dtype=object if isinstance(cats[0], str) else np.float64)
            keys[:] = list(cats)
            hot = (col[:, None] == keys[None, :]).astype(np.float64)
            if self.handle_unknown == "error" and not hot.any(axis=1).all():
                row = int(np.argmin(hot.any(axis=1)))
                raise PreprocessingError(
                    f"op 'one_hot': column {cname!r} has a value not seen in fit",
                    expected=list(cats)[:10],
                    found=repr(col[row])[:40],
                )
            names.extend(f"{cname}={c}" for c in cats)
            cols.extend(hot[:, j] for j in range(len(cats)))
        if len(set(names)) != len(names):
            raise PreprocessingError("op 'one_hot': encoded column names collide with existing ones")
        return Table(tuple(names), tuple(cols))
