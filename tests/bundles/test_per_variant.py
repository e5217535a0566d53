"""Per-variant verification: a device holds only its variant's model plus the shared files, fully verified.

The full-verification and mix-and-match defences hold per variant: the manifest is trusted only after its
signed hash matched, the directory must hold exactly that variant's files, each matching its signed hash
under this bundle's name and version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bundles.errors import DigestMismatchError, ManifestError, MissingFileError, UnsignedFileError
from bundles.keys import KeyStore
from bundles.selftest import run_golden
from bundles.trust import TrustStore
from bundles.verify import variant_files, verify_archive, verify_directory


def _matmul_classifier() -> bytes:
    """Logistic regression on digits as plain ONNX ops (MatMul, Add, Softmax, ArgMax): quantizable."""
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression

    from tests.support.factories import digits_data

    images, labels = digits_data()
    lr = LogisticRegression(max_iter=300, random_state=0).fit(images.reshape(len(images), -1)[:1200] / 16.0,
                                                               labels[:1200])
    w = numpy_helper.from_array(lr.coef_.T.astype(np.float32), "w")
    b = numpy_helper.from_array(lr.intercept_.astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["input", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "lr", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])],
                              initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())


def _two_variant_bundle(ks: KeyStore, out: Path, version: str, rc: int, n_golden: int) -> Path:
    """The digits bundle with an fp32 and a dynamic-int8 variant (real onnxruntime quantization)."""
    import json
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bundles.assemble import assemble_bundle
    from bundles.golden import Golden
    from bundles.preprocessing import Pipeline
    from tests.support.factories import digits_data, digits_pipeline_spec

    fp32 = _matmul_classifier()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a.onnx").write_bytes(fp32)
        quantize_dynamic(str(Path(tmp) / "a.onnx"), str(Path(tmp) / "b.onnx"), weight_type=QuantType.QInt8)
        int8 = (Path(tmp) / "b.onnx").read_bytes()
    spec = digits_pipeline_spec()
    images, _ = digits_data()
    raw = images[1500:1500 + n_golden]
    feats = Pipeline.from_dict(spec).transform(raw)
    outs = {}
    for vid, model in (("onnx-fp32", fp32), ("onnx-int8-dynamic", int8)):
        label, probs = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feats)
        outs[vid] = {"label": label, "probabilities": probs}
    manifest = {
        "format_version": 1, "name": "digits", "version": version, "release_counter": rc,
        "hardware_ids": ["x86-kiosk"],
        "compatibility": {"platforms": ["linux-x86_64"], "runtimes": {"onnxruntime": ">=1.16"},
                          "min_agent_version": "0.1.0"},
        "io": {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
               "outputs": [{"name": "label", "dtype": "int64", "shape": [None]},
                           {"name": "probabilities", "dtype": "float32", "shape": [None, 10]}],
               "labels": None, "task": "classification"},
        "preprocessing": "preprocessing.json",
        "golden": {"file": "golden.npz", "features_atol": 1e-6,
                   "variants": {"onnx-fp32": {"atol": 1e-5, "rtol": 1e-4},
                                "onnx-int8-dynamic": {"atol": 5e-2, "rtol": 5e-2}}},
        "variants": [{"id": "onnx-int8-dynamic", "file": "models/int8.onnx", "format": "onnx",
                      "runtime": "onnxruntime", "precision": "int8"},
                     {"id": "onnx-fp32", "file": "models/fp32.onnx", "format": "onnx",
                      "runtime": "onnxruntime", "precision": "fp32"}],
        "profiles": {"x86-kiosk": ["onnx-int8-dynamic", "onnx-fp32"]},
    }
    files = {"models/fp32.onnx": fp32, "models/int8.onnx": int8,
             "preprocessing.json": json.dumps(spec, sort_keys=True).encode(),
             "golden.npz": Golden(raw=raw, features=dict(feats), outputs=outs).to_bytes()}
    return assemble_bundle(out, keystore=ks, manifest=manifest, files=files).path


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("pervariant")
    ks = KeyStore.init(base / "keys")
    a = _two_variant_bundle(ks, base / "a.edgepack", "1.0.0", 1, n_golden=6)
    b = _two_variant_bundle(ks, base / "b.edgepack", "1.1.0", 2, n_golden=5)
    trust = TrustStore.from_root_file(base / "keys" / "trust" / "root.json")
    full_a = verify_archive(a, trust, base / "full-a")
    full_b = verify_archive(b, trust, base / "full-b")
    return {"base": base, "trust": trust, "a": full_a, "b": full_b}


def _device_dir(two: dict, tmp_path: Path, variant: str, source: str = "a") -> Path:
    full = two[source]
    dest = tmp_path / "device"
    for rel in variant_files(full.manifest, full.files, variant):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(full.path(rel), dest / rel)
    return dest


def _verify(two: dict, directory: Path, variant: str, version: str = "1.0.0"):  # type: ignore[no-untyped-def]
    return verify_directory(directory, two["trust"].targets, "digits", version, trust=two["trust"],
                            hardware_id="x86-kiosk", variant=variant)


def test_a_device_holds_only_its_variant_and_it_verifies_and_selftests(two: dict, tmp_path: Path) -> None:
    full = two["a"]
    need = variant_files(full.manifest, full.files, "onnx-int8-dynamic")
    assert "models/fp32.onnx" not in need and "models/int8.onnx" in need
    assert {"manifest.json", "preprocessing.json", "golden.npz"} <= need
    device = _device_dir(two, tmp_path, "onnx-int8-dynamic")
    vb = _verify(two, device, "onnx-int8-dynamic")
    assert vb.variant == "onnx-int8-dynamic" and vb.content_digest == full.content_digest
    outputs = run_golden(vb, "onnx-int8-dynamic")  # real onnxruntime on the golden vectors
    assert np.asarray(outputs["probabilities"]).shape == (6, 10)
    total = sum(full.files[r].length for r in full.files)
    assert sum(full.files[r].length for r in need) < total - full.files["models/fp32.onnx"].length + 1


def test_another_variants_model_in_the_directory_is_refused(two: dict, tmp_path: Path) -> None:
    device = _device_dir(two, tmp_path, "onnx-int8-dynamic")
    shutil.copyfile(two["a"].path("models/fp32.onnx"), device / "models" / "fp32.onnx")
    with pytest.raises(UnsignedFileError, match="another variant"):
        _verify(two, device, "onnx-int8-dynamic")


def test_missing_shared_file_altered_model_and_unknown_variant_are_refused(two: dict, tmp_path: Path) -> None:
    device = _device_dir(two, tmp_path, "onnx-fp32")
    (device / "golden.npz").unlink()
    with pytest.raises(MissingFileError):
        _verify(two, device, "onnx-fp32")
    device2 = _device_dir(two, tmp_path / "x", "onnx-fp32")
    data = bytearray((device2 / "models" / "fp32.onnx").read_bytes())
    data[-10] ^= 1
    (device2 / "models" / "fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        _verify(two, device2, "onnx-fp32")
    with pytest.raises(ManifestError):
        _verify(two, _device_dir(two, tmp_path / "y", "onnx-fp32"), "onnx-fp16")


def test_mix_and_match_across_versions_is_refused_per_variant(two: dict, tmp_path: Path) -> None:
    """The 1.0.0 manifest with 1.1.0's int8 model, or a 1.1.0 manifest in a 1.0.0 directory: refused."""
    device = _device_dir(two, tmp_path, "onnx-int8-dynamic")
    shutil.copyfile(two["b"].path("golden.npz"), device / "golden.npz")  # other version's shared file
    with pytest.raises(DigestMismatchError, match="golden"):
        _verify(two, device, "onnx-int8-dynamic")
    device2 = _device_dir(two, tmp_path / "m", "onnx-int8-dynamic")
    shutil.copyfile(two["b"].path("manifest.json"), device2 / "manifest.json")
    with pytest.raises(DigestMismatchError, match="manifest"):
        _verify(two, device2, "onnx-int8-dynamic")  # read only after its own hash is checked
