"""Assemble, sign, verify, read back, run the golden vectors through preprocessing and onnxruntime."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from bundles._util import utcnow
from bundles.assemble import assemble_bundle
from bundles.errors import FormatError, KeyStoreError, ManifestError
from bundles.golden import GoldenMismatchError
from bundles.inspect import inspect_bundle
from bundles.keys import KeyStore
from bundles.selftest import load_golden, load_pipeline, run_golden
from bundles.trust import TrustStore
from bundles.verify import verify_archive, verify_directory
from tests.support.factories import digits_data, make_digits_bundle


def test_round_trip_verifies_reads_back_and_passes_golden(signed, tmp_path: Path) -> None:
    ks, v1, _ = signed
    trust = TrustStore.from_root_file(ks.root_path)
    vb = verify_archive(v1.path, trust, tmp_path / "x")
    assert (vb.name, vb.version, vb.release_counter) == ("digits", "1.0.0", 1)
    assert vb.content_digest == v1.content_digest
    assert sorted(p.name for p in (tmp_path / "x").rglob("*") if p.is_file()) == sorted(
        Path(f).name for f in vb.files)
    # The preprocessing read back from the bundle gives the golden features for real digits images.
    pipeline = load_pipeline(vb)
    golden = load_golden(vb)
    np.testing.assert_array_equal(pipeline.transform(golden.raw_inputs())["input"], golden.features["input"])
    outputs = run_golden(vb, "onnx-fp32")
    _, labels = digits_data()
    assert np.mean(outputs["label"] == labels[1500:1508]) >= 0.75  # a real classifier, not noise


def test_golden_check_catches_a_different_model(signed, tmp_path: Path) -> None:
    ks, v1, _ = signed
    vb = verify_archive(v1.path, TrustStore.from_root_file(ks.root_path), tmp_path / "x")
    from bundles.runtime import load_runner
    from tests.support.factories import digits_onnx

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(digits_onnx("bad"))
    with pytest.raises(GoldenMismatchError):
        run_golden(vb, "onnx-fp32", runner=load_runner(bad, "onnxruntime"))


def test_same_inputs_give_the_same_content_digest(tmp_path: Path) -> None:
    a = make_digits_bundle(KeyStore.init(tmp_path / "ka"), tmp_path / "a.edgepack")
    b = make_digits_bundle(KeyStore.init(tmp_path / "kb"), tmp_path / "b.edgepack")
    assert a.content_digest == b.content_digest


def test_versions_are_immutable_and_release_counters_grow(signed, tmp_path: Path) -> None:
    ks, v1, _ = signed
    again = make_digits_bundle(ks, tmp_path / "again.edgepack", version="1.0.0", release_counter=1)
    assert again.content_digest == v1.content_digest  # re-signing identical content is allowed
    (tmp_path / "again.edgepack").unlink()
    with pytest.raises(KeyStoreError, match=r"already signed in .* with different content"):
        make_digits_bundle(ks, tmp_path / "x.edgepack", version="1.0.0", release_counter=1, n_golden=3)
    with pytest.raises(KeyStoreError, match="release counter must grow"):
        make_digits_bundle(ks, tmp_path / "y.edgepack", version="1.2.0", release_counter=2)
    assert not list(tmp_path.glob("*.edgepack*")), "a refused build leaves no file behind"


def test_missing_referenced_file_and_bad_manifest_are_refused(signed, tmp_path: Path) -> None:
    ks, v1, _ = signed
    vb = verify_archive(v1.path, TrustStore.from_root_file(ks.root_path), tmp_path / "x")
    manifest = vb.manifest.to_dict()
    files = {rel: vb.path(rel) for rel in vb.files if rel not in ("manifest.json", "golden.npz")}
    with pytest.raises(FormatError, match="references files that were not given"):
        assemble_bundle(tmp_path / "o.edgepack", keystore=ks, manifest=manifest, files=files)
    with pytest.raises(ManifestError, match="release_counter"):
        assemble_bundle(tmp_path / "o.edgepack", keystore=ks, manifest={**manifest, "release_counter": "3"},
                        files=files)
    assert not (tmp_path / "o.edgepack").exists()


def test_verify_directory_of_downloaded_targets(signed, tmp_path: Path) -> None:
    ks, v1, _ = signed
    verify_archive(v1.path, TrustStore.from_root_file(ks.root_path), tmp_path / "x")
    vb = verify_directory(tmp_path / "x", ks.targets(), "digits", "1.0.0", hardware_id="rpi4")
    assert vb.content_digest == v1.content_digest
    (tmp_path / "x" / "extra.py").write_text("print('hi')")
    from bundles.errors import UnsignedFileError

    with pytest.raises(UnsignedFileError):
        verify_directory(tmp_path / "x", ks.targets(), "digits", "1.0.0")


def test_inspect_shows_manifest_files_and_signers(signed) -> None:
    _, v1, _ = signed
    report = inspect_bundle(v1.path)
    assert report["manifest"]["name"] == "digits"
    assert {f["path"] for f in report["files"]} >= {"manifest.json", "models/digits.fp32.onnx"}
    assert report["content_digest"] == v1.content_digest
    json.dumps(report)


def test_trust_survives_restart_and_keeps_floors(signed, tmp_path: Path) -> None:
    ks, v1, _ = signed
    state = tmp_path / "state"
    trust = TrustStore.open(state, initial_root=ks.root_path)
    verify_archive(v1.path, trust, tmp_path / "x", now=utcnow() + timedelta(seconds=1))
    trust.save()
    again = TrustStore.open(state)
    assert again.targets is not None and again.targets.signed.version == trust.targets.signed.version
