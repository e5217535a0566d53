"""Run a built variant on a batch of features with its runtime (onnxruntime or LiteRT).

One thread per session: outputs are then bit-reproducible across runs on one host, which the
golden vectors and the deterministic bundle digest rely on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converter.onnx_variants import ort_session


def run_onnx(model: bytes, features: dict[str, np.ndarray], chunk: int = 256) -> list[np.ndarray]:
    """All outputs of an ONNX model, batched in chunks."""
    sess = ort_session(model)
    names = [i.name for i in sess.get_inputs()]
    n = len(features[names[0]])
    parts: list[list[np.ndarray]] = []
    for i in range(0, n, chunk):
        parts.append(sess.run(None, {k: features[k][i : i + chunk] for k in names}))
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def _litert(model: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model, num_threads=1)


def run_tflite(model: bytes, features: dict[str, np.ndarray], chunk: int = 256) -> list[np.ndarray]:
    """All outputs of a TFLite model; inputs are matched by position to the feature order."""
    interp = _litert(model)
    ins = interp.get_input_details()
    arrays = list(features.values())
    if len(ins) != len(arrays):
        raise ValueError(f"TFLite model has {len(ins)} inputs, features {len(arrays)}")
    n = len(arrays[0])
    parts: list[list[np.ndarray]] = []
    for i in range(0, n, chunk):
        batch = [a[i : i + chunk] for a in arrays]
        for d, a in zip(ins, batch, strict=True):
            interp.resize_tensor_input(d["index"], list(a.shape))
        interp.allocate_tensors()
        for d, a in zip(ins, batch, strict=True):
            interp.set_tensor(d["index"], np.ascontiguousarray(a, dtype=d["dtype"]))
        interp.invoke()
        parts.append([interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()])
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def run_variant(fmt: str, model: bytes, features: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Dispatch on the variant's format."""
    return run_onnx(model, features) if fmt == "onnx" else run_tflite(model, features)
