"""Real artefacts for tests: key directories, a real digits model, signed bundles.

Everything is real: the model is trained on scikit-learn's bundled digits data and converted with
skl2onnx; bundles are assembled and signed with the offline key store; golden vectors are computed by
running the real preprocessing and onnxruntime. Helpers here are used by the bundle, server and agent tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundles.assemble import BundleInfo, assemble_bundle
from bundles.golden import Golden
from bundles.keys import KeyStore

HARDWARE_IDS = ("x86-kiosk", "rpi4", "rpi5")


@functools.cache
def digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@functools.cache
def digits_onnx(quality: str = "good") -> bytes:
    """A logistic-regression digits classifier as ONNX: input (N, 64) float32 -> label, probabilities.

    ``quality="bad"`` trains on shuffled labels: a valid model with near-chance accuracy, for rollouts
    that must halt on the accuracy gate.
    """
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    images, labels = digits_data()
    x = images.reshape(len(images), -1)[:1200] / 16.0
    y = labels[:1200]
    if quality == "bad":
        y = np.random.default_rng(0).permutation(y)
    model = LogisticRegression(max_iter=300, random_state=0).fit(x, y)
    onx = to_onnx(model, initial_types=[("input", FloatTensorType([None, 64]))],
                  options={"zipmap": False}, target_opset=17)
    return bytes(onx.SerializeToString())


@functools.cache
def reference_profile() -> dict[str, Any]:
    """The drift profile of the digits bundles (bundles/drift.py): deciles of each of the 64 scaled pixels of the
    held-out images, as the converter would write it into reference_stats.json."""
    from bundles.drift import build_profile

    images, _ = digits_data()
    test_x = images[1200:].reshape(-1, 64) / 16.0
    return build_profile({"input": test_x}, {}, first_input="input", task="classification").to_dict()


def digits_pipeline_spec() -> dict[str, Any]:
    from bundles.preprocessing import Pipeline
    from bundles.preprocessing.array_ops import Cast, Reshape, Scale

    pipeline = Pipeline(steps=[Cast(dtype="float32"), Scale(multiply=1 / 16.0), Reshape(shape=(64,))],
                        output="input")
    return pipeline.to_dict()


def make_digits_bundle(
    keystore: KeyStore,
    out: Path,
    *,
    version: str = "1.0.0",
    release_counter: int = 1,
    quality: str = "good",
    hardware_ids: Sequence[str] = HARDWARE_IDS,
    n_golden: int = 8,
    min_agent_version: str = "0.1.0",
    extra_files: dict[str, bytes] | None = None,
    name: str = "digits",
) -> BundleInfo:
    """Assemble and sign a real digits bundle with one ONNX fp32 variant and its golden vectors (plus
    ``extra_files``, signed like the others: e.g. padding for a large bundle). Another ``name`` is another model,
    with release counters of its own (a key store refuses a counter that does not grow per model)."""
    import onnxruntime as ort

    from bundles.preprocessing import Pipeline

    model = digits_onnx(quality)
    spec = digits_pipeline_spec()
    images, labels = digits_data()
    raw = images[1500:1500 + n_golden]
    features = Pipeline.from_dict(spec).transform(raw)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    label, probs = session.run(None, {"input": features["input"]})
    golden = Golden(raw=raw, features={"input": features["input"]},
                    outputs={"onnx-fp32": {"label": label, "probabilities": probs}})
    test_x = images[1200:].reshape(-1, 64) / 16.0
    acc = float(np.mean(session.run(None, {"input": test_x.astype(np.float32)})[0] == labels[1200:]))
    manifest = {
        "format_version": 1,
        "name": name,
        "version": version,
        "release_counter": release_counter,
        "hardware_ids": list(hardware_ids),
        "compatibility": {"platforms": ["linux-x86_64", "linux-aarch64"],
                          "runtimes": {"onnxruntime": ">=1.16"}, "min_agent_version": min_agent_version},
        "io": {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
               "outputs": [{"name": "label", "dtype": "int64", "shape": [None]},
                           {"name": "probabilities", "dtype": "float32", "shape": [None, 10]}],
               "labels": [str(i) for i in range(10)], "task": "classification"},
        "preprocessing": "preprocessing.json",
        "golden": {"file": "golden.npz", "features_atol": 1e-6,
                   "variants": {"onnx-fp32": {"atol": 1e-5, "rtol": 1e-4}}},
        "reference_stats": "reference_stats.json",
        "variants": [{"id": "onnx-fp32", "file": "models/digits.fp32.onnx", "format": "onnx",
                      "runtime": "onnxruntime", "precision": "fp32", "size_bytes": len(model),
                      "metric": {"name": "accuracy", "value": round(acc, 4), "delta": 0.0}}],
        "profiles": {hw: ["onnx-fp32"] for hw in hardware_ids},
        "provenance": {"edgepack_version": "0.1.0", "input_model_sha256": hashlib.sha256(model).hexdigest()},
    }
    stats = {"count": len(test_x), "mean": test_x.mean(axis=0).round(6).tolist(),
             "std": test_x.std(axis=0).round(6).tolist(), "drift": reference_profile()}
    files = {
        "models/digits.fp32.onnx": model,
        "preprocessing.json": json.dumps(spec, sort_keys=True).encode(),
        "golden.npz": golden.to_bytes(),
        "reference_stats.json": json.dumps(stats, sort_keys=True).encode(),
        **(extra_files or {}),
    }
    return assemble_bundle(out, keystore=keystore, manifest=manifest, files=files)
