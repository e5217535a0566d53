"""Latency and peak memory of one variant, measured in a fresh child process.

Why a child process: the build process holds TensorFlow, torch and every other variant in
memory, so its RSS says nothing about one model; a fresh interpreter that imports only numpy
and the runtime does. ``peak_rss_bytes`` is the child's maximum RSS (``VmHWM``) after the
timed runs; ``model_rss_bytes`` is that peak minus the RSS after importing the runtime, i.e.
what loading and running this model added. Latency is one sample per call, one thread,
``runs`` timed calls after warm-up; p50/p95 in milliseconds. Host-dependent: these figures go
to measurements.json and the report, never into the signed manifest.

Run as ``python -m converter.measure FORMAT MODEL_PATH FEATURES_NPZ RUNS``; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_bytes() -> int:
    return _status_kb("VmRSS")


def _child(fmt: str, model_path: str, features_path: str, runs: int) -> dict[str, Any]:
    with np.load(features_path, allow_pickle=False) as z:
        feeds = {k: z[k] for k in z.files}
    if fmt == "onnx":
        import onnxruntime as ort

        base = _rss_bytes()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])

        def call() -> None:
            sess.run(None, feeds)
    else:
        from ai_edge_litert.interpreter import Interpreter

        base = _rss_bytes()
        interp = Interpreter(model_path=model_path, num_threads=1)
        ins = interp.get_input_details()
        for d, a in zip(ins, feeds.values(), strict=True):
            interp.resize_tensor_input(d["index"], list(a.shape))
        interp.allocate_tensors()

        def call() -> None:
            for d, a in zip(ins, feeds.values(), strict=True):
                interp.set_tensor(d["index"], a)
            interp.invoke()
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so the child would report the
    # build process's peak (TensorFlow and all); VmHWM belongs to the new address space.
    peak = _status_kb("VmHWM")
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "runs": runs, "peak_rss_bytes": int(peak), "model_rss_bytes": int(max(0, peak - base)),
            "threads": 1, "batch": len(next(iter(feeds.values())))}


def measure(fmt: str, model_path: Path, features_path: Path, runs: int, timeout: float = 300.0) -> dict[str, Any]:
    """Run the child process and return its measurements (raises RuntimeError with its stderr)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "converter.measure", fmt, str(model_path), str(features_path), str(runs)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "measure failed")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
