"""Model inputs from files: a .keras file (ONNX + TFLite variants) and a TF SavedModel (TFLite only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.converter.conftest import run_build, variant, write_project

# One worker for the module (pytest-xdist --dist loadgroup): the Keras model is trained once, not per worker.
pytestmark = pytest.mark.xdist_group("keras-saved-models")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from converter.sources import prepare_tensorflow

    prepare_tensorflow()
    import keras
    from sklearn.datasets import load_digits

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))[:1200]
    model = keras.Sequential([keras.Input((64,), name="x"), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(d.images[order].reshape(-1, 64) / 16.0, d.target[order], epochs=5, verbose=0)
    root = tmp_path_factory.mktemp("models")
    model.save(root / "mlp.keras")
    model.export(str(root / "saved"), format="tf_saved_model", verbose=False)
    return {"keras": root / "mlp.keras", "savedmodel": root / "saved"}


def test_keras_file_builds_onnx_and_tflite(saved_models: dict[str, Path], tmp_path: Path, quiet_console) -> None:
    spec = write_project(tmp_path / "p", variants='["onnx-fp32", "onnx-int8", "tflite-int8"]', budget=0.02)
    report = run_build(spec, quiet_console, {
        "model.factory": "", "model.path": str(saved_models["keras"]), "model.format": "auto",
        "model.output_names": ["probabilities"], "targets.profiles": ["rpi4", "x86-kiosk"]})
    assert report["status"] == "ok", report["errors"]
    assert {v["id"]: v["status"] for v in report["variants"]} == {
        "onnx-fp32": "shipped", "onnx-int8": "shipped", "tflite-int8": "shipped"}
    assert report["manifest"]["provenance"]["input_model_sha256"]


def test_savedmodel_builds_tflite_and_says_why_not_onnx(saved_models: dict[str, Path], tmp_path: Path,
                                                        quiet_console) -> None:
    spec = write_project(tmp_path / "p", variants='["onnx-fp32", "tflite-fp32", "tflite-int8"]', budget=0.02)
    report = run_build(spec, quiet_console, {
        "model.factory": "", "model.path": str(saved_models["savedmodel"]), "model.format": "auto",
        "model.output_names": ["probabilities"], "targets.profiles": ["rpi4"]})
    assert report["status"] == "ok", report["errors"]
    onnx = variant(report, "onnx-fp32")
    assert onnx["status"] == "failed" and "SavedModel" in onnx["error"]["message"]
    assert ".keras" in onnx["error"]["fix"]
    assert report["profiles"]["rpi4"]["ship"] == ["tflite-int8", "tflite-fp32"]
