"""Tabular ops against scikit-learn's SimpleImputer / StandardScaler / OneHotEncoder on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from bundles.errors import PreprocessingError
from bundles.preprocessing import Clip, Impute, OneHot, Pipeline, SelectColumns, StandardScale


@pytest.fixture(scope="module")
def holed() -> np.ndarray:
    """Digits features with ~10% of the values knocked out (NaN), deterministically."""
    data = load_digits().data[:400].copy()
    rng = np.random.default_rng(7)
    data[rng.random(data.shape) < 0.1] = np.nan
    data[:, 5] = np.where(np.arange(400) % 2, np.nan, data[:, 5])  # a column with many holes
    return data


@pytest.mark.parametrize("strategy", ["mean", "median", "most_frequent", "constant"])
def test_impute_matches_sklearn(holed: np.ndarray, strategy: str) -> None:
    cols = [c for c in range(64) if not np.isnan(holed[:, c]).all()]  # sklearn drops all-NaN columns
    data = holed[:, cols]
    fill = 3.5 if strategy == "constant" else None
    ours = Pipeline([Impute(strategy=strategy, fill_value=fill)], input_kind="tabular").fit(data)
    ref = SimpleImputer(strategy=strategy, fill_value=fill).fit(data)
    test = holed[300:, cols]
    np.testing.assert_allclose(
        ours.transform(test)["input"], ref.transform(test).astype(np.float32), rtol=1e-6
    )


def test_standard_scale_matches_sklearn_zero_std_safe() -> None:
    data = load_digits().data  # column 0 is constant zero: std 0
    p = Pipeline([StandardScale()], input_kind="tabular").fit(data[:1000])
    ref = StandardScaler().fit(data[:1000])
    np.testing.assert_allclose(
        p.transform(data[1000:])["input"], ref.transform(data[1000:]), rtol=1e-5, atol=1e-5
    )
    assert np.isfinite(p.transform(data[1000:])["input"]).all()


def test_one_hot_matches_sklearn_on_rows() -> None:
    colours = ["red", "green", "blue", "red", "green"] * 4
    sizes = [1, 2, 3, 2] * 5
    rows = [{"colour": colours[i], "size": float(sizes[i]), "n": float(i)} for i in range(20)]
    p = Pipeline([OneHot(columns=["colour", "size"])], input_kind="tabular").fit(rows)
    enc = OneHotEncoder(handle_unknown="ignore", sparse_output=False).fit(
        np.array([[r["colour"], r["size"]] for r in rows], dtype=object)
    )
    new = [{"colour": "blue", "size": 3.0, "n": 1.0}, {"colour": "purple", "size": 2.0, "n": 2.0}]
    ours = p.transform(new)["input"]
    ref = enc.transform(np.array([[r["colour"], r["size"]] for r in new], dtype=object))
    np.testing.assert_array_equal(ours[:, :-1], ref.astype(np.float32))  # unknown "purple" -> zeros
    np.testing.assert_array_equal(ours[:, -1], [1.0, 2.0])
    strict = Pipeline([OneHot(columns=["colour"], handle_unknown="error")], input_kind="tabular").fit(rows)
    with pytest.raises(PreprocessingError, match="not seen in fit"):
        strict.transform(new)


def test_three_input_shapes_give_identical_features() -> None:
    data = load_digits().data[:50, :6]
    names = [f"f{i}" for i in range(6)]
    columns = {n: data[:, i] for i, n in enumerate(names)}
    rows = [dict(zip(names, map(float, r), strict=True)) for r in data]
    by_name = Pipeline([SelectColumns(columns=("f4", "f1")), StandardScale()]).fit(columns)
    out_cols = by_name.transform(columns)["input"]
    np.testing.assert_array_equal(by_name.transform(rows)["input"], out_cols)
    by_index = Pipeline([SelectColumns(columns=(4, 1)), StandardScale()]).fit(data)
    np.testing.assert_array_equal(by_index.transform(data)["input"], out_cols)
    expect = (data[:, [4, 1]] - data[:, [4, 1]].mean(0)) / np.where(
        data[:, [4, 1]].std(0) == 0, 1, data[:, [4, 1]].std(0)
    )
    np.testing.assert_allclose(out_cols, expect, rtol=1e-5, atol=1e-6)


def test_mixed_pipeline_round_trip_identical() -> None:
    rows = [
        {"age": 30.0, "city": "Oslo", "score": 0.5},
        {"age": None, "city": "Rome", "score": 9.0},
        {"age": 50.0, "city": None, "score": -3.0},
        {"age": 41.0, "city": "Oslo", "score": 1.5},
    ]
    p = Pipeline(
        [
            Impute(strategy="median", columns=("age",)),
            Impute(strategy="most_frequent", columns=("city",)),
            Clip(min=0.0, max=5.0, columns=("score",)),
            StandardScale(columns=("age", "score")),
            OneHot(columns=("city",)),
        ]
    ).fit(rows)
    spec = json.loads(json.dumps(p.to_dict(), allow_nan=False))
    p2 = Pipeline.from_dict(spec)
    assert p2 == p
    np.testing.assert_array_equal(p2.transform(rows)["input"], p.transform(rows)["input"])
    out = p.transform(rows)["input"]
    assert out.shape == (4, 4)  # age, city=Oslo, city=Rome, score: one_hot expands in place
    np.testing.assert_array_equal(out[:, 1:3], [[1, 0], [0, 1], [1, 0], [1, 0]])  # None city -> Oslo (mode)
    ages = np.array([30.0, 41.0, 50.0, 41.0])  # the None took the median of the others
    np.testing.assert_allclose(out[:, 0], (ages - ages.mean()) / ages.std(), rtol=1e-6)
    scores = np.array([0.5, 5.0, 0.0, 1.5])  # clipped to [0, 5]
    np.testing.assert_allclose(out[:, 3], (scores - scores.mean()) / scores.std(), rtol=1e-6)


def test_unfitted_and_bad_inputs_refused() -> None:
    with pytest.raises(PreprocessingError, match="not fitted"):
        Pipeline([StandardScale()], input_kind="tabular").transform(np.ones((2, 2)))
    p = Pipeline([StandardScale()], input_kind="tabular").fit(np.arange(6.0).reshape(3, 2))
    with pytest.raises(PreprocessingError, match="2-D"):
        p.transform(np.ones(3))
    with pytest.raises(PreprocessingError, match="differ in length"):
        p.transform({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(PreprocessingError, match="mixes numbers and strings"):
        p.transform([{"a": 1.0}, {"a": "x"}])
    with pytest.raises(PreprocessingError, match="no column named"):
        p.transform({"a": [1.0], "b": [2.0]})
    with pytest.raises(PreprocessingError, match="holds strings"):
        Pipeline([SelectColumns(columns=("c",))]).transform([{"c": "x"}])
    with pytest.raises(PreprocessingError, match="no finite values"):
        Pipeline([StandardScale()], input_kind="tabular").fit(np.full((3, 1), np.nan))
