"""An in-process ``device_agent.supervisor.WorkerSupervisor``: the real worker logic, no processes.

1,000 worker processes (one per device, ~60 MB each with onnxruntime) do not fit on a small machine, so
each simulated device gets a :class:`SimWorker` instead: a handle on a real
:class:`device_agent.worker.Worker` whose preprocessing pipeline and onnxruntime session come from a
:class:`SessionCache` shared by the whole fleet, keyed by the bundle's content digest (its signed file
list) and variant. Everything a device does to its own files is still done per device: every load checks
each file of *its* slot against the verified sha256 (unless the agent says it has just verified them, as
with the real supervisor), the golden vectors run on *its* golden file, input statistics are its own.

Everything but starting a worker is the real supervisor's code (``device_agent.supervisor.SupervisorBase``):
standby, load, self-test, promotion and restarts. Crashes are injected through
:meth:`InProcessSupervisor.crash`, which takes exactly the path a dead worker process takes in the real
supervisor: the serving worker is gone (calls fail with ``code="crash"``), the crash is counted and
reported through ``on_crash`` (the agent's callback), and the worker is restarted after a capped
exponential backoff with jitter.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from device_agent.errors import WorkerError
from device_agent.store import BundleRef
from device_agent.supervisor import SupervisorBase
from device_agent.worker import Worker

_PIDS = itertools.count(100_000)
_SHARED = ("manifest", "variant", "runner", "pipeline")


def _content_key(msg: Mapping[str, Any]) -> str:
    files = "".join(f"{sha}  {rel}\n" for rel, (_, sha) in sorted(msg["files"].items()))
    return hashlib.sha256(f"{files}|{msg['variant']}|{msg.get('threads', 1)}".encode()).hexdigest()


def _check_files(directory: Path, files: Mapping[str, tuple[int, str]]) -> None:
    """What ``Worker.load`` checks before loading: the bytes loaded are the bytes that were verified."""
    from bundles.errors import BundleError

    for rel, (length, sha256) in sorted(files.items()):
        data = (directory / rel).read_bytes()
        if len(data) != length or hashlib.sha256(data).hexdigest() != sha256:
            raise BundleError("bundle file changed after verification; refusing to load it", path=rel,
                              expected=f"{length} bytes sha256={sha256}",
                              found=f"{len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}")


class SessionCache:
    """One loaded worker (pipeline + runtime session) per bundle content and variant, for the whole fleet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, Worker] = {}
        self._loading: dict[str, threading.Lock] = {}
        self.sessions = 0
        self.hits = 0

    def worker_for(self, msg: Mapping[str, Any]) -> tuple[Worker, float]:
        """A fresh per-device :class:`Worker` sharing the cached session; returns it and the ms spent loading."""
        import time

        key = _content_key(msg)
        with self._lock:
            template = self._loaded.get(key)
            gate = self._loading.setdefault(key, threading.Lock())
        session_ms = 0.0
        if template is None:
            with gate:  # one device loads, the others of the same moment wait for it
                with self._lock:
                    template = self._loaded.get(key)
                if template is None:
                    t0 = time.perf_counter()
                    template = Worker()
                    template.load({**msg, "rehash": False})  # the caller checked this device's files
                    session_ms = (time.perf_counter() - t0) * 1e3
                    with self._lock:
                        self._loaded[key] = template
                        self.sessions += 1
        with self._lock:
            self.hits += 1
        worker = Worker()
        for name in _SHARED:
            setattr(worker, name, getattr(template, name))
        worker.directory = Path(msg["dir"])
        worker.ident = dict(msg["ident"])
        worker.max_dims = int(msg.get("max_input_dims", 128))
        return worker, session_ms


class SimWorker:
    """One device's worker "process": the real :class:`Worker` request handling, in this process."""

    def __init__(self, cache: SessionCache) -> None:
        self.cache = cache
        self.pid = next(_PIDS)
        self.ref: BundleRef | None = None
        self.worker = Worker()
        self._alive = True
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self._alive

    def die(self) -> None:
        self._alive = False

    def load(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        import time

        t0 = time.perf_counter()
        try:
            if msg.get("rehash", True):
                _check_files(Path(msg["dir"]), msg["files"])
            hash_ms = (time.perf_counter() - t0) * 1e3
            self.worker, session_ms = self.cache.worker_for(msg)
        except Exception as exc:  # as Worker.handle reports a failed load
            return {"ok": False, "status": 500, "error": type(exc).__name__, "message": f"{exc}"[:2000]}
        return {"ok": True, "hash_ms": hash_ms, "session_ms": session_ms,
                "inputs": list(self.worker.runner.input_names), "pid": self.pid}

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        if not self._alive:
            raise WorkerError(f"worker died during {msg.get('op')}", exitcode=-11, code="crash")
        if msg.get("op") == "load":
            return self.load(msg)
        with self._lock:  # a real worker answers one request at a time
            return self.worker.handle(msg)

    def stop(self, timeout: float = 5.0) -> None:
        self._alive = False


class InProcessSupervisor(SupervisorBase):
    """The real supervisor logic over :class:`SimWorker` handles sharing one :class:`SessionCache`."""

    def __init__(self, bundles_dir: Path, cache: SessionCache, *, threads: int = 1, max_input_dims: int = 128,
                 restart_backoff_max_s: float = 30.0,
                 on_crash: Callable[[BundleRef | None, WorkerError], None] | None = None) -> None:
        super().__init__(bundles_dir, threads=threads, start_timeout_s=60.0,
                         restart_backoff_max_s=restart_backoff_max_s, max_input_dims=max_input_dims,
                         on_crash=on_crash)
        self.cache = cache

    def _spawn(self, runtime_hint: str | None = None) -> SimWorker:
        return SimWorker(self.cache)

    def crash(self, signal: int = 11) -> bool:
        """Kill the serving worker as a segfault would; False when nothing was serving."""
        with self._lock:
            proc = self.serving
            if not isinstance(proc, SimWorker) or not proc.alive() or self._closed:
                return False
            proc.die()
        self._exited(proc, -signal)
        return True
