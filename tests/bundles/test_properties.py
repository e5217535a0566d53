"""Random input never crashes the parsers: it yields a value or the library's own error."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundles.archive import BundleArchive
from bundles.errors import BundleError
from bundles.manifest import Manifest
from tests.support.factories import HARDWARE_IDS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)

VALID = {
    "format_version": 1, "name": "digits", "version": "1.0.0", "release_counter": 1,
    "hardware_ids": list(HARDWARE_IDS),
    "compatibility": {"platforms": ["linux-x86_64"], "runtimes": {"onnxruntime": ">=1.16"},
                      "min_agent_version": "0.1.0"},
    "io": {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}], "outputs": [],
           "labels": None, "task": "classification"},
    "preprocessing": "preprocessing.json", "golden": {"file": "golden.npz"},
    "variants": [{"id": "a", "file": "m.onnx", "format": "onnx", "runtime": "onnxruntime", "precision": "fp32"}],
    "profiles": {"rpi4": ["a"]}, "provenance": {},
}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_manifest_random_bytes(data: bytes) -> None:
    with contextlib.suppress(BundleError):
        Manifest.from_bytes(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(VALID)), json_values)
def test_manifest_one_field_replaced(field: str, value: object) -> None:
    doc = json.loads(json.dumps(VALID))
    doc[field] = value
    try:
        m = Manifest.from_dict(doc)
    except BundleError:
        return
    assert Manifest.from_bytes(m.to_bytes()) == m  # whatever parses round-trips


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_manifest_unknown_fields_survive_round_trip(extra: dict[str, object]) -> None:
    doc = {**{k: v for k, v in extra.items() if k not in VALID}, **VALID}
    m = Manifest.from_dict(doc)
    assert json.loads(m.to_bytes()) == json.loads(json.dumps(doc))


@pytest.mark.filterwarnings("ignore:Duplicate name")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), st.binary(max_size=200), st.integers(0, 0xFFFF)),
                max_size=5),
       st.binary(max_size=64))
def test_archive_reader_random_archives(tmp_path: Path, entries, junk: bytes) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            with contextlib.suppress(ValueError, UnicodeError):
                zf.writestr(info, data)
    raw = buf.getvalue()
    for blob in (raw, raw[: len(raw) // 2] + junk, junk):
        path = tmp_path / "r.edgepack"
        path.write_bytes(blob)
        try:
            with BundleArchive(path) as arc:
                for name in arc.names():
                    arc.read_bounded(name, 10_000)
        except BundleError:
            pass
