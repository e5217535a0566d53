"""Keras -> ONNX: Keras' own export (tf2onnx) against the hand-written translator edgepack had before.

The figures of docs/adr/0003-keras-export-through-tf2onnx.md. The old translator
(``converter/keras_onnx.py``) was removed; this script loads it from the git history
(``git show <commit>:converter/keras_onnx.py``) so the comparison stays reproducible.

For each model: does it convert, max |ONNX - Keras| on 64 random inputs, export time (median of
3), file size, node count after ``quant_pre_process`` and single-sample latency (median of
interleaved rounds, onnxruntime, one thread).

    python bench/bench_keras_export.py [--commit fcd5ab7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _old_translator(commit: str) -> Any:
    src = subprocess.run(["git", "show", f"{commit}:converter/keras_onnx.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "keras_onnx_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("keras_onnx_old", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def models(keras: Any) -> dict[str, tuple[Any, tuple[int, ...]]]:
    sys.path.insert(0, str(REPO / "examples" / "digits"))
    import recipe  # type: ignore[import-not-found]
    import tensorflow as tf

    L = keras.layers
    out: dict[str, tuple[Any, tuple[int, ...]]] = {"digits CNN (example)": (recipe.train(), (8, 8, 1))}
    keras.utils.set_random_seed(1)
    table = keras.Sequential([
        keras.Input((12, 12, 3)), L.Rescaling(1 / 4.0, offset=-0.5),
        L.Conv2D(8, 3, strides=2, padding="same", activation="relu"), L.BatchNormalization(),
        L.DepthwiseConv2D(3, padding="same", depth_multiplier=2), L.ReLU(), L.AveragePooling2D(2, padding="same"),
        L.Conv2D(6, 1, padding="valid"), L.MaxPooling2D(2), L.Reshape((6,)), L.Dense(16, activation="tanh"),
        L.Dropout(0.3), L.Dense(5), L.Softmax()])
    out["layer table (old test model)"] = (table, (12, 12, 3))
    out["LSTM"] = (keras.Sequential([keras.Input((10, 4)), L.LSTM(8), L.Dense(3)]), (10, 4))
    out["Conv1D causal"] = (keras.Sequential([keras.Input((16, 2)), L.Conv1D(4, 3, padding="causal"),
                                              L.GlobalAveragePooling1D(), L.Dense(2)]), (16, 2))
    out["Lambda(sin)"] = (keras.Sequential([keras.Input((64,)), L.Dense(32, activation="relu"),
                                            L.Lambda(lambda t: keras.ops.sin(t)), L.Dense(10)]), (64,))
    out["Lambda(lgamma)"] = (keras.Sequential([keras.Input((64,)), L.Dense(8, activation="relu"),
                                               L.Lambda(lambda t: tf.math.lgamma(t + 1.0)), L.Dense(3)]), (64,))
    inp = keras.Input((20,))
    h = L.Dense(16, activation="relu")(inp)
    out["two outputs (functional)"] = (keras.Model(inp, [L.Dense(3)(h), L.Dense(1)(h)]), (20,))
    return out


def _timed(fn: Callable[[], bytes]) -> tuple[bytes | None, float, str]:
    times, data, err = [], None, ""
    for _ in range(3):
        t0 = time.perf_counter()
        try:
            data = fn()
        except Exception as exc:
            return None, 0.0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        times.append(time.perf_counter() - t0)
    return data, statistics.median(times), err


def _latency(models_bytes: dict[str, bytes], x: np.ndarray, rounds: int = 15, calls: int = 200) -> dict[str, float]:
    from converter.onnx_variants import ort_session

    sess = {k: ort_session(v) for k, v in models_bytes.items()}
    name = {k: s.get_inputs()[0].name for k, s in sess.items()}
    per: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(rounds):
        for k, s in sess.items():
            t: list[float] = []
            for _ in range(calls):
                t0 = time.perf_counter()
                s.run(None, {name[k]: x})
                t.append(time.perf_counter() - t0)
            per[k].append(statistics.median(t) * 1e3)
    return {k: statistics.median(v) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default="fcd5ab7", help="commit that still has converter/keras_onnx.py")
    args = ap.parse_args()
    from converter.keras_export import keras_to_onnx
    from converter.onnx_variants import ort_session, preprocess
    from converter.sources import prepare_tensorflow

    prepare_tensorflow()
    import keras
    import onnx

    old = _old_translator(args.commit)
    rows = ["| model | translator: converts / max abs diff / export s / bytes / nodes | Keras export (tf2onnx): "
            "converts / max abs diff / export s / bytes / nodes | p50 ms translator / tf2onnx |", "|---|---|---|---|"]
    for label, (model, shape) in models(keras).items():
        x = np.random.default_rng(0).uniform(0, 1, (64, *shape)).astype(np.float32)
        want = model(x, training=False)
        want = np.asarray(want[0] if isinstance(want, (list, tuple)) else want)
        n_out = len(model.outputs)
        cells, built = [], {}
        for kind, fn in (("translator", lambda m=model: old.keras_to_onnx(m, input_name="x", output_name="y")),
                         ("tf2onnx", lambda m=model, n=n_out: keras_to_onnx(
                             m, input_names=["x"], output_names=[f"y{i}" for i in range(n)]))):
            data, secs, err = _timed(fn)
            if data is None:
                cells.append(f"no ({err})")
                continue
            got = ort_session(data).run(None, {"x": x})[0]
            diff = float(np.max(np.abs(got - want)))
            with tempfile.TemporaryDirectory() as tmp:
                pre = preprocess(data, Path(tmp))
            built[kind] = pre
            nodes = len(onnx.load_from_string(pre).graph.node)
            cells.append(f"yes / {diff:.1e} / {secs:.3f} / {len(data):,} / {nodes}")
        lat = _latency(built, x[:1]) if built else {}
        lat_cell = " / ".join(f"{lat[k]:.4f}" if k in lat else "-" for k in ("translator", "tf2onnx"))
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {lat_cell} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
