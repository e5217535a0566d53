"""The inference worker: a separate process that holds one bundle's preprocessing and model.

A crash in a runtime (segfault, abort, OOM kill) ends this process, not the agent; the supervisor
(:mod:`device_agent.supervisor`) notices, counts it and restarts the worker. The worker reads requests
from one pipe and writes answers to another, one frame each (4-byte length + pickle; both ends are ours).

Requests (``op``):

* ``load``: hash every file against its verified length and sha256 (the bytes loaded are the bytes that
  were verified), build the preprocessing pipeline and the runtime session.
* ``selftest``: run the golden vectors: preprocessing parity, then the variant's outputs within tolerance.
* ``predict``: JSON request body -> preprocessing -> input checks -> model -> JSON response body.
* ``stats``: return and reset the input summary statistics (drift telemetry).
* ``ping``: health check.

The worker imports numpy, the runtime and ``bundles.preprocessing`` only, never TUF or the agent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bundles.drift import DriftCounter, DriftProfile
from bundles.errors import BundleError, PreprocessingError
from bundles.golden import Golden, check_features, check_outputs, tolerances
from bundles.manifest import Manifest, TensorSpec
from bundles.preprocessing import Pipeline
from bundles.runtime import RuntimeError_, load_runner
from device_agent._frames import read_frame, write_frame


class _Resources(Mapping[str, bytes]):
    """Bundle files for the preprocessing ops (tokenizer.json, ...), read on first use."""

    def __init__(self, directory: Path, files: Mapping[str, Any]) -> None:
        self._dir, self._files = directory, files

    def __getitem__(self, key: str) -> bytes:
        if key not in self._files:
            raise KeyError(key)
        return (self._dir / key).read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class BadRequest(Exception):
    """The prediction request does not fit the model; answered with HTTP 400."""


def _drift_counter(manifest: Manifest, directory: Path) -> DriftCounter | None:
    """Counts inputs into the bundle's drift profile (bundles/drift.py), when it has one. A profile this agent
    cannot read only costs the drift statistics, never the model: it is reported to stderr and skipped."""
    if not manifest.reference_stats:
        return None
    try:
        ref = json.loads((directory / manifest.reference_stats).read_bytes())
        profile = ref.get("drift") if isinstance(ref, dict) else None
        return DriftCounter(DriftProfile.from_dict(profile)) if isinstance(profile, dict) else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"worker: drift profile of the bundle not usable, no drift counts: {exc}", file=sys.stderr)
        return None


def _check_feature(spec: TensorSpec, value: np.ndarray) -> None:
    if value.ndim != len(spec.shape):
        raise BadRequest(f"input {spec.name!r} has {value.ndim} dimensions after preprocessing; the model expects "
                         f"{len(spec.shape)} (shape {list(spec.shape)}), found shape {list(value.shape)}")
    for i, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise BadRequest(f"input {spec.name!r} has the wrong shape: expected {list(spec.shape)}, "
                             f"found {list(value.shape)} (dimension {i})")
    if np.dtype(spec.dtype) != value.dtype:
        raise BadRequest(f"input {spec.name!r} has dtype {value.dtype} after preprocessing; the model expects "
                         f"{spec.dtype}")


class Worker:
    """State of the worker process: the loaded bundle and the running input statistics."""

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self.directory: Path | None = None
        self.variant = ""
        self.runner: Any = None
        self.pipeline: Any = None
        self.ident: dict[str, Any] = {}
        self.max_dims = 128
        self._stats: dict[str, Any] | None = None
        self._drift: DriftCounter | None = None

    # ---- ops ---------------------------------------------------------------------------------------------
    def load(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        directory = Path(msg["dir"])
        for rel, (length, sha256) in sorted(msg["files"].items()) if msg.get("rehash", True) else ():
            data = (directory / rel).read_bytes()
            if len(data) != length or hashlib.sha256(data).hexdigest() != sha256:
                raise BundleError("bundle file changed after verification; refusing to load it", path=rel,
                                  expected=f"{length} bytes sha256={sha256}",
                                  found=f"{len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}")
        t_hash = time.perf_counter()
        manifest = Manifest.from_bytes((directory / "manifest.json").read_bytes())
        variant = manifest.variant(msg["variant"])
        spec = json.loads((directory / manifest.preprocessing).read_bytes())
        self.pipeline = Pipeline.from_dict(spec, _Resources(directory, msg["files"]))
        self.runner = load_runner(directory / variant.file, variant.runtime, int(msg.get("threads", 1)))
        self.manifest, self.directory, self.variant = manifest, directory, variant.id
        self.ident = dict(msg["ident"])
        self.max_dims = int(msg.get("max_input_dims", 128))
        self._stats = None
        self._drift = _drift_counter(manifest, directory)
        t_end = time.perf_counter()
        return {"hash_ms": (t_hash - t0) * 1e3, "session_ms": (t_end - t_hash) * 1e3,
                "inputs": list(self.runner.input_names), "pid": os.getpid()}

    def selftest(self) -> dict[str, Any]:
        """The golden-vector check of ``bundles.selftest.run_golden``, on the already loaded session.

        Re-stated here rather than imported: ``bundles.selftest`` imports ``bundles.verify`` and with it
        TUF and cryptography, which would add ~20 MB to every worker for nothing.
        """
        assert self.manifest is not None and self.directory is not None
        t0 = time.perf_counter()
        golden = Golden.from_bytes((self.directory / str(self.manifest.golden["file"])).read_bytes())
        features = self.pipeline.transform(golden.raw_inputs())
        check_features(golden, features, float(self.manifest.golden.get("features_atol", 1e-5)))
        feeds = {name: golden.features.get(name, features.get(name)) for name in self.runner.input_names}
        outputs = self.runner.run(feeds)
        atol, rtol = tolerances(self.manifest.golden, self.variant)
        check_outputs(golden, self.variant, outputs, atol, rtol)
        return {"golden_ms": (time.perf_counter() - t0) * 1e3, "vectors": len(golden.raw)}

    def _raw(self, doc: Any) -> Any:
        if not isinstance(doc, dict):
            raise BadRequest("the request body must be a JSON object with `inputs` (or `inputs_b64`)")
        kind = self.pipeline.input_kind
        if "inputs_b64" in doc:
            items = doc["inputs_b64"]
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise BadRequest("`inputs_b64` must be a list of base64 strings (encoded images)")
            try:
                return [base64.b64decode(x, validate=True) for x in items]
            except ValueError as exc:
                raise BadRequest(f"`inputs_b64` holds invalid base64: {exc}") from None
        if "inputs" not in doc:
            raise BadRequest("the request body lacks `inputs`", )
        raw = doc["inputs"]
        if kind in ("text", "tabular"):
            return raw
        try:
            arr = np.asarray(raw)
        except ValueError as exc:
            raise BadRequest(f"`inputs` is not a rectangular array: {exc}") from None
        if arr.dtype.kind not in "biuf":
            raise BadRequest(f"`inputs` must be numbers for this {kind} model; found values of type "
                             f"{arr.dtype.kind!r} ({arr.dtype!s})")
        return arr

    def predict(self, body: bytes, prediction_id: str) -> dict[str, Any]:
        assert self.manifest is not None
        t0 = time.perf_counter()
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not JSON: {exc}") from None
        try:
            features = self.pipeline.transform(self._raw(doc))
        except PreprocessingError as exc:
            raise BadRequest(f"preprocessing refused the input: {exc}") from None
        specs = {t.name: t for t in self.manifest.inputs}
        for name in self.runner.input_names:
            if name not in features:
                raise BadRequest(f"preprocessing produced no {name!r}; it produced {sorted(features)}")
            if name in specs:
                _check_feature(specs[name], features[name])
        try:
            outputs = self.runner.run(features)
        except RuntimeError_ as exc:
            raise BadRequest(f"the runtime refused the input: {exc}") from None
        classes = self._classes(outputs)
        self._observe(features[self.runner.input_names[0]])
        if self._drift is not None:
            self._drift.observe(features, outputs)
        answer: dict[str, Any] = {"prediction_id": prediction_id, "model": self.ident,
                                  "outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()}}
        if classes is not None:
            answer["predictions"] = classes
        return {"status": 200, "body": json.dumps(answer).encode(), "classes": classes,
                "worker_ms": (time.perf_counter() - t0) * 1e3}

    def _classes(self, outputs: Mapping[str, np.ndarray]) -> list[str] | None:
        assert self.manifest is not None
        if self.manifest.task != "classification" or not outputs:
            return None
        ints = [np.asarray(v) for v in outputs.values() if np.asarray(v).dtype.kind in "iu" and np.ndim(v) == 1]
        idx = ints[0] if ints else np.argmax(np.asarray(next(iter(outputs.values()))), axis=-1).reshape(-1)
        labels = self.manifest.labels
        return [labels[i] if labels is not None and 0 <= i < len(labels) else str(int(i)) for i in idx.tolist()]

    def _observe(self, x: np.ndarray) -> None:
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1) if x.ndim else np.asarray(x, np.float64)
        if flat.shape[1] > self.max_dims:
            flat = flat.reshape(-1, 1)
        s = self._stats
        if s is None or s["sum"].shape != flat.shape[1:]:
            s = self._stats = {"count": 0, "sum": np.zeros(flat.shape[1]), "sumsq": np.zeros(flat.shape[1]),
                               "min": np.full(flat.shape[1], np.inf), "max": np.full(flat.shape[1], -np.inf),
                               "samples": 0}
        s["count"] += flat.shape[0]
        s["samples"] += len(x)
        s["sum"] += flat.sum(axis=0)
        s["sumsq"] += np.square(flat).sum(axis=0)
        s["min"] = np.minimum(s["min"], flat.min(axis=0))
        s["max"] = np.maximum(s["max"], flat.max(axis=0))

    def stats(self) -> dict[str, Any] | None:
        s, self._stats = self._stats, None
        if s is None or not s["count"]:
            return None
        mean = s["sum"] / s["count"]
        std = np.sqrt(np.maximum(s["sumsq"] / s["count"] - mean**2, 0.0))

        def r(a: Any) -> list[float]:
            return [round(float(v), 6) for v in a]

        out = {"count": int(s["samples"]), "mean": r(mean), "std": r(std), "min": r(s["min"]), "max": r(s["max"])}
        hist = self._drift.take() if self._drift is not None else None
        if hist is not None:
            out["hist"] = hist
        return out

    # ---- loop --------------------------------------------------------------------------------------------
    def handle(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        try:
            if op == "predict":
                return self.predict(msg["body"], msg["prediction_id"])
            if op == "ping":
                return {"ok": True, "loaded": self.runner is not None}
            if op == "stats":
                return {"ok": True, "input_stats": self.stats()}
            if op == "load":
                return {"ok": True, **self.load(msg)}
            if op == "preload":
                for runtime in msg.get("runtimes", ()):
                    _preload(str(runtime))
                return {"ok": True}
            if op == "selftest":
                return {"ok": True, **self.selftest()}
            return {"ok": False, "status": 500, "error": "UnknownOp", "message": f"unknown op {op!r}"}
        except (MemoryError, RuntimeError_) as exc:
            if _out_of_memory(exc):
                _die_out_of_memory(exc)
            return {"ok": False, "status": 500, "error": type(exc).__name__, "message": str(exc)[:2000]}
        except BadRequest as exc:
            return {"ok": False, "status": 400, "error": "bad_request", "message": str(exc)}
        except BundleError as exc:
            return {"ok": False, "status": 500, "error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # report, keep serving: the agent decides what a failure means
            return {"ok": False, "status": 500, "error": type(exc).__name__, "message": f"{exc}"[:2000]}


#: A 68-byte ONNX model (one Identity op): creating a session from it sets up onnxruntime's environment and
#: thread pools ahead of the real load, as a warm process would have them.
_WARMUP_ONNX = bytes.fromhex(
    "08073a3a0a100a017812017922084964656e7469747912047761726d5a0f0a0178120a0a08080112040a020801620f0a0179120a"
    "0a08080112040a02080142040a00100d")


def _preload(runtime: str) -> None:
    """Import a runtime ahead of the first load (a standby worker is started while a bundle downloads)."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        ort.InferenceSession(_WARMUP_ONNX, opts, providers=["CPUExecutionProvider"]).run(
            None, {"x": np.ones(1, np.float32)})
    elif runtime == "litert":
        from bundles.runtime import _litert_interpreter

        _litert_interpreter()


_OOM_MARKERS = ("Failed to allocate memory", "bad_alloc", "Cannot allocate memory", "out of memory")


def _out_of_memory(exc: BaseException) -> bool:
    """Did the runtime fail to allocate (under the worker's RLIMIT_AS, or beyond the machine)?"""
    return isinstance(exc, MemoryError) or any(m in str(exc) for m in _OOM_MARKERS)


def _die_out_of_memory(exc: BaseException) -> None:
    """Out of memory is fatal for the worker, as under the kernel's OOM killer: a runtime that failed to
    allocate may hold half-built state, so the worker dies by SIGKILL and the agent restarts it, counts a
    crash and (during a self-test or trial) rolls the bundle back."""
    sys.stderr.write(f"edgepack worker: out of memory, exiting: {str(exc)[:300]}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the agent dies (kill -9), so no orphan keeps a model loaded."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    fd_in, fd_out = int(args[0]), int(args[1])
    memory_mb = int(args[2]) if len(args) > 2 else 0
    _die_with_parent()
    if os.getppid() == 1:
        return 0
    try:  # under memory pressure the kernel should kill the worker (restarted), not the agent
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("500")
    except OSError:
        pass
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent stops us by closing the pipe or SIGTERM
    worker = Worker()
    write_frame(fd_out, {"ok": True, "ready": True, "pid": os.getpid()})
    while True:
        try:
            msg = read_frame(fd_in)
        except EOFError:
            return 0
        write_frame(fd_out, worker.handle(msg))


if __name__ == "__main__":
    sys.exit(main())
