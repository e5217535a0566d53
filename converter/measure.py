"""Latency and peak memory of the variants, measured in interleaved rounds, each in its own process.

Why a child process per variant: the build process holds TensorFlow, torch and every other variant in
memory, so its RSS says nothing about one model; a fresh interpreter that imports only numpy and the
runtime does. ``peak_rss_bytes`` is the child's maximum RSS (``VmHWM``) after the timed runs;
``model_rss_bytes`` is that peak minus the RSS after importing the runtime, i.e. what loading and
running this model added.

Why interleaved rounds: on a shared host the background load changes by the second, so two variants
timed one after the other are timed under different conditions (two identical builds once printed a
3.10x and a 1.70x speed-up for the same variant). All children stay alive; each round runs a batch of
calls in every child, in a rotated order, so every variant sees the same conditions within a round.
The report gives the median over all calls (p50/p95), the median of each round (``round_p50_ms``) and
the spread of those round medians; a speed-up is the median of the per-round ratios, with their range,
so a ratio compares two variants measured in the same seconds. Host-dependent: these figures go to
measurements.json and the report, never into the signed manifest.

Child protocol (``python -m converter.measure serve FORMAT MODEL_PATH FEATURES_NPZ``): it prints
``ready`` once loaded and warmed up; each ``run N`` line is answered with a JSON list of N call times in
milliseconds; ``quit`` is answered with a JSON object of memory figures, then the child exits.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _load(fmt: str, model_path: str, features_path: str) -> tuple[Callable[[], None], int, int]:
    with np.load(features_path, allow_pickle=False) as z:
        feeds = {k: z[k] for k in z.files}
    batch = len(next(iter(feeds.values())))
    if fmt == "onnx":
        import onnxruntime as ort

        base = _status_kb("VmRSS")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])

        def call() -> None:
            sess.run(None, feeds)
        return call, base, batch
    from ai_edge_litert.interpreter import Interpreter

    base = _status_kb("VmRSS")
    interp = Interpreter(model_path=model_path, num_threads=1)
    ins = interp.get_input_details()
    for d, a in zip(ins, feeds.values(), strict=True):
        interp.resize_tensor_input(d["index"], list(a.shape))
    interp.allocate_tensors()

    def call_tfl() -> None:
        for d, a in zip(ins, feeds.values(), strict=True):
            interp.set_tensor(d["index"], a)
        interp.invoke()
    return call_tfl, base, batch


def serve(fmt: str, model_path: str, features_path: str) -> None:
    """The child: load, warm up, then answer ``run N`` / ``quit`` on stdin/stdout."""
    call, base, batch = _load(fmt, model_path, features_path)
    for _ in range(3):
        call()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            times = []
            for _ in range(int(cmd[1])):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1000.0)
            print(json.dumps(times), flush=True)
        elif cmd[0] == "quit":
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so the child would report the
            # build process's peak (TensorFlow and all); VmHWM belongs to the new address space.
            peak = _status_kb("VmHWM")
            print(json.dumps({"peak_rss_bytes": peak, "model_rss_bytes": max(0, peak - base), "batch": batch}),
                  flush=True)
            return


class _Child:
    def __init__(self, fmt: str, model_path: Path, features_path: Path, timeout: float) -> None:
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "converter.measure", "serve", fmt, str(model_path), str(features_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._expect_line()

    def _expect_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.wait(timeout=self.timeout)
            raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else "measure child died")
        return line

    def ask(self, cmd: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect_line())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=self.timeout)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _summary(times: list[float], rounds: list[float], mem: dict[str, Any]) -> dict[str, Any]:
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "runs": len(times), "rounds": len(rounds), "round_p50_ms": [round(r, 6) for r in rounds],
            "spread_ms": [round(min(rounds), 6), round(max(rounds), 6)], "threads": 1, **mem}


def measure_interleaved(models: dict[str, tuple[str, Path]], features_path: Path, runs: int, rounds: int,
                        timeout: float = 300.0) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Time every model in interleaved rounds; returns (figures by id, errors by id).

    ``runs`` calls per model in all, split over ``rounds`` rounds (at least one call a round). A model
    whose child fails to start or dies is reported in the errors and left out of later rounds.
    """
    rounds = max(1, min(rounds, runs))
    per_round = max(1, runs // rounds)
    children: dict[str, _Child] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    medians: dict[str, list[float]] = {}
    try:
        for vid, (fmt, path) in models.items():
            try:
                children[vid] = _Child(fmt, path, features_path, timeout)
                times[vid], medians[vid] = [], []
            except Exception as exc:
                errors[vid] = str(exc)[:300]
        order = list(children)
        for r in range(rounds):
            shift = r % max(1, len(order))
            for vid in order[shift:] + order[:shift]:
                if vid in errors:
                    continue
                try:
                    got = [float(t) for t in children[vid].ask(f"run {per_round}")]
                except Exception as exc:
                    errors[vid] = str(exc)[:300]
                    continue
                times[vid] += got
                medians[vid].append(statistics.median(got))
        out: dict[str, dict[str, Any]] = {}
        for vid in order:
            if vid in errors:
                continue
            try:
                mem = children[vid].ask("quit")
            except Exception as exc:
                errors[vid] = str(exc)[:300]
                continue
            out[vid] = _summary(times[vid], medians[vid], mem)
        return out, errors
    finally:
        for child in children.values():
            child.close()


def paired_ratio(base: dict[str, Any] | None, other: dict[str, Any] | None) -> dict[str, float] | None:
    """Speed-up of ``other`` over ``base`` from their round medians, round by round.

    Returns the median of the per-round ratios and their min and max, or None when either side has
    no rounds or the rounds do not pair up.
    """
    if not base or not other:
        return None
    a, b = base.get("round_p50_ms") or [], other.get("round_p50_ms") or []
    if not a or len(a) != len(b) or min(b) <= 0:
        return None
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"x": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit("usage: python -m converter.measure serve FORMAT MODEL_PATH FEATURES_NPZ")
