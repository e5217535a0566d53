"""The spec: every op round-trips through JSON with identical features; unknown ops, op
versions and opsets are refused with a message that says which edgepack to upgrade to."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from bundles.errors import FormatError, PreprocessingError, UnsupportedError
from bundles.preprocessing import (
    OPSET_VERSION,
    Cast,
    CenterCrop,
    Clip,
    Decode,
    ExpandDims,
    Impute,
    Layout,
    Normalize,
    OneHot,
    Pipeline,
    Reshape,
    Resize,
    Scale,
    SelectColumns,
    StandardScale,
    Tokenize,
    registered_ops,
)
from edgepack import __version__

DIGITS = load_digits()


def _image_pipeline() -> Pipeline:
    return Pipeline(
        [
            Decode(channels=3),
            Resize(size=(12, 10), method="bilinear"),
            CenterCrop(size=(10, 8)),
            Scale(multiply=1 / 16, offset=-0.5),
            Clip(min=-0.4, max=0.4),
            Normalize(mean=(0.1, 0.0, -0.1), std=(0.5, 0.25, 1.0)),
            Layout(source="NHWC", target="NCHW"),
            Reshape(shape=(3, -1)),
            ExpandDims(axis=1),
            Cast(dtype="float16"),
        ]
    )


def _tabular_pipeline() -> Pipeline:
    return Pipeline(
        [
            SelectColumns(columns=tuple(range(0, 64, 3))),
            Impute(strategy="median"),
            StandardScale(),
            Clip(min=-3.0, max=3.0),
            OneHot(columns=(1,)),
        ],
        input_kind="tabular",
    )


def _same_features(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key])


def test_every_registered_op_is_covered_and_round_trips() -> None:
    image = _image_pipeline()
    tab = _tabular_pipeline().fit(DIGITS.data[:500])
    names = {s.name for s in image.steps} | {s.name for s in tab.steps} | {"tokenize"}
    assert names == set(registered_ops())
    for p, raw in ((image, DIGITS.images[:20]), (tab, DIGITS.data[500:520])):
        spec = json.loads(json.dumps(p.to_dict(), allow_nan=False))
        assert spec["opset"] == OPSET_VERSION
        assert all(step["since"] == "0.1.0" and step["version"] == 1 for step in spec["steps"])
        p2 = Pipeline.from_dict(spec, p.resources())
        assert p2 == p and p2.to_dict() == spec
        _same_features(p.transform(raw), p2.transform(raw))
    out = image.transform(DIGITS.images[:20])["input"]
    assert out.shape == (20, 1, 3, 80) and out.dtype == np.float16


def test_fit_learns_from_training_data_only() -> None:
    p = Pipeline([StandardScale()], input_kind="tabular")
    a = p.fit(DIGITS.data[:100])
    b = p.fit(DIGITS.data[100:200])
    assert a != b and a.steps[0].fitted and not p.steps[0].fitted  # fit returns a new pipeline
    refit = Pipeline.from_dict(json.loads(json.dumps(a.to_dict())))
    _same_features(refit.transform(DIGITS.data[300:310]), a.transform(DIGITS.data[300:310]))


def _spec(steps: list[dict[str, Any]], opset: int = 1) -> dict[str, Any]:
    return {"opset": opset, "input": {"kind": "image"}, "steps": steps, "output": "input"}


def test_unknown_op_names_the_version_to_upgrade_to() -> None:
    step = {"op": "foo", "version": 2, "since": "0.3.0", "params": {}}
    with pytest.raises(UnsupportedError) as info:
        Pipeline.from_dict(_spec([step]))
    assert str(info.value).startswith(
        f"op 'foo' v2 needs edgepack >= 0.3.0; this is {__version__}: upgrade the agent"
    )
    assert isinstance(info.value, FormatError)


def test_newer_version_of_known_op_refused() -> None:
    step = {"op": "resize", "version": 2, "since": "0.4.1", "params": {"size": [2, 2]}}
    with pytest.raises(
        UnsupportedError, match=r"op 'resize' v2 needs edgepack >= 0\.4\.1; this is .*upgrade"
    ):
        Pipeline.from_dict(_spec([step]))
    no_since = {"op": "resize", "version": 9, "params": {}}
    with pytest.raises(UnsupportedError, match="needs a newer edgepack"):
        Pipeline.from_dict(_spec([no_since]))


def test_newer_opset_refused_before_reading_steps() -> None:
    with pytest.raises(
        UnsupportedError, match=f"opset {OPSET_VERSION + 1} needs a newer edgepack.*upgrade the agent"
    ):
        Pipeline.from_dict(_spec([{"garbage": True}], opset=OPSET_VERSION + 1))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "JSON object"),
        ({"opset": 1, "input": {"kind": "audio"}, "steps": [], "output": "input"}, "kind"),
        ({"opset": "1", "input": {"kind": "image"}, "steps": [], "output": "input"}, "positive integer"),
        ({**_spec([]), "extra": 1}, "unknown key"),
        (
            _spec([{"op": "resize", "version": 1, "params": {"size": [2, 2], "antialias": True}}]),
            "unknown parameter",
        ),
        (_spec([{"op": "resize", "version": 1, "params": {}}]), "missing parameter"),
        (_spec([{"op": "resize", "version": 1, "params": {"size": [2, "2"]}}]), "expected: an integer"),
        (_spec([{"op": "resize", "version": 1, "params": {"size": [99999, 2]}}]), r"\[1, 16384\]"),
        (_spec([{"op": "resize", "version": True, "params": {"size": [2, 2]}}]), "positive integer"),
        (_spec([{"op": "normalize", "version": 1, "params": {"mean": [0], "std": [0]}}]), "non-zero"),
        (_spec([{"op": "impute", "version": 1, "params": {}}]), "does not fit the ops"),
        ({**_spec([]), "output": ""}, "output"),
    ],
)
def test_malformed_specs_refused_with_reason(spec: Any, message: str) -> None:
    with pytest.raises(PreprocessingError, match=message):
        Pipeline.from_dict(spec)


def test_kind_mismatch_and_mixed_kinds_refused() -> None:
    with pytest.raises(PreprocessingError, match="different input kinds"):
        Pipeline([Resize(size=(2, 2)), StandardScale()])
    with pytest.raises(PreprocessingError, match="does not fit"):
        Pipeline([Resize(size=(2, 2))], input_kind="text")
    tok = Tokenize(tokenizer_json=b"{}", max_length=4)
    assert Pipeline([tok], output={"a": "input_ids"}).input_kind == "text"
    assert Pipeline([Scale()]).input_kind == "image"
    assert Pipeline([Scale()], input_kind="tabular").input_kind == "tabular"
