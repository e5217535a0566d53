"""Supervising inference workers: start, load, self-test, serve, restart after a crash, stop.

* :class:`WorkerSupervisor` is what the agent needs (a Protocol); :class:`WorkerHandle` is one worker.
* :class:`SupervisorBase` is the logic every implementation shares: the standby, loading and self-test,
  promotion, and the restart of a crashed serving worker with capped exponential backoff and jitter. Only
  how a worker is started differs (:meth:`SupervisorBase._spawn`).
* :class:`Supervisor` runs each worker as a child process (:mod:`device_agent.worker`) with two pipes.
  A monitor thread waits for each process; when a serving worker dies unexpectedly the supervisor reports
  the crash (exit code or signal) through ``on_crash`` and restarts it, so the agent keeps serving; the
  agent decides what the crash means (during a trial: roll back). The fleet simulator's
  ``edgepack.fleet.supervisor.InProcessSupervisor`` runs the same worker code in-process.

A *standby* worker is started ahead of a self-test (interpreter and runtime already imported), loads the
new bundle, runs its golden vectors and, if the bundle is activated, becomes the serving worker: the
activation never waits for a process start.
"""

from __future__ import annotations

import logging
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from device_agent._frames import read_frame, write_frame
from device_agent.errors import WorkerError
from device_agent.store import BundleRef

log = logging.getLogger(__name__)


def _spawner() -> ThreadPoolExecutor:
    """The one thread that starts workers. Linux sends a worker's parent-death signal when the *thread* that
    forked it exits, so workers must be forked by a thread that lives as long as the agent."""
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-spawner")
        return _SPAWNER


_SPAWNER: ThreadPoolExecutor | None = None
_SPAWNER_LOCK = threading.Lock()


class WorkerProcess:
    """One worker process. :meth:`call` is thread-safe (one request at a time)."""

    def __init__(self, *, memory_limit_mb: int = 0, on_exit: Callable[[WorkerProcess, int], None] | None = None,
                 python: str = sys.executable) -> None:
        self._lock = threading.Lock()
        self._stopping = False
        self.on_exit = on_exit
        self.ref: BundleRef | None = None
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        argv = [python, "-m", "device_agent.worker", str(req_r), str(resp_w), str(memory_limit_mb)]
        self.proc = _spawner().submit(subprocess.Popen, argv, pass_fds=(req_r, resp_w), stdin=subprocess.DEVNULL,
                                      close_fds=True).result()
        os.close(req_r)
        os.close(resp_w)
        self._w, self._r = req_w, resp_r
        self.started = time.monotonic()
        threading.Thread(target=self._monitor, name=f"worker-{self.proc.pid}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _monitor(self) -> None:
        code = self.proc.wait()
        if not self._stopping and self.on_exit is not None:
            self.on_exit(self, code)

    def wait_ready(self, timeout: float) -> None:
        self._read(timeout, "start")

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        with self._lock:
            if self._w < 0:
                raise WorkerError("worker was stopped", code="worker_stopped")
            try:
                write_frame(self._w, msg)
            except OSError as exc:
                raise self._died(f"worker is gone ({exc})") from exc
            return self._read(timeout, str(msg.get("op")))

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            ready, _, _ = select.select([self._r], [], [], timeout)
        except (OSError, ValueError) as exc:
            raise self._died(f"worker is gone during {what} ({exc})") from exc
        if not ready:
            self.kill()
            raise WorkerError(f"worker did not answer {what} within {timeout:.0f} s; killed it", code="worker_hung")
        try:
            answer: dict[str, Any] = read_frame(self._r)
            return answer
        except (EOFError, OSError) as exc:
            raise self._died(f"worker died during {what}") from exc

    def _died(self, message: str) -> WorkerError:
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        return WorkerError(message, exitcode=code, code="crash")

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop on purpose: close the request pipe (the worker exits), SIGKILL if it lingers."""
        self._stopping = True
        with self._lock:  # never close a pipe in the middle of a call (its fd number could be reused)
            if self._w >= 0:
                os.close(self._w)
                self._w = -1
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with self._lock:
            if self._r >= 0:
                os.close(self._r)
                self._r = -1


class WorkerHandle(Protocol):
    """One inference worker, loaded with ``ref`` once :meth:`WorkerSupervisor.prepare` returned it."""

    ref: BundleRef | None

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request, answered as :meth:`device_agent.worker.Worker.handle` answers; raises WorkerError."""
        ...

    def stop(self, timeout: float = 5.0) -> None: ...


class WorkerSupervisor(Protocol):
    """What the agent needs from whoever runs its inference workers.

    Implemented by :class:`Supervisor` (one child process per worker) and by the fleet simulator's
    ``InProcessSupervisor`` (the same worker code in this process). The agent sets ``on_crash``; the
    supervisor calls it from its own thread when the serving worker died and restarts that worker itself.
    """

    on_crash: Callable[[BundleRef | None, WorkerError], None] | None

    @property
    def serving(self) -> WorkerHandle | None: ...

    def warm(self, runtime_hint: str | None = None) -> None:
        """Start a standby worker now (a later self-test then does not wait for a start)."""
        ...

    def prepare(self, ref: BundleRef, *, rehash: bool = True) -> tuple[WorkerHandle, dict[str, Any]]:
        """Load ``ref`` in a standby worker; returns it and the load timings (``hash_ms``, ``session_ms``)."""
        ...

    def selftest(self, proc: WorkerHandle) -> dict[str, Any]: ...

    def promote(self, proc: WorkerHandle) -> None: ...

    def serve(self, ref: BundleRef | None) -> None: ...

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]: ...

    def ping(self, timeout: float = 5.0) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class SupervisorBase:
    """Owns the serving worker and the standby; restarts a crashed serving worker by itself.

    Subclasses say how a worker starts (:meth:`_spawn`) and call :meth:`_exited` when one died.
    """

    def __init__(self, bundles_dir: Path, *, threads: int = 1, start_timeout_s: float = 60.0,
                 restart_backoff_max_s: float = 30.0, max_input_dims: int = 128,
                 on_crash: Callable[[BundleRef | None, WorkerError], None] | None = None) -> None:
        self.bundles_dir = bundles_dir
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.max_input_dims = max_input_dims
        self.on_crash = on_crash
        self._lock = threading.RLock()
        self._warm_lock = threading.Lock()
        self.serving: WorkerHandle | None = None
        self.standby: WorkerHandle | None = None
        self.loading: WorkerHandle | None = None
        """The worker loading or self-testing a new bundle right now."""
        self.crashes = 0
        self.restarts = 0
        self._consecutive = 0
        self._closed = False

    # ---- processes -------------------------------------------------------------------------------------
    def _spawn(self, runtime_hint: str | None = None) -> WorkerHandle:
        raise NotImplementedError

    def warm(self, runtime_hint: str | None = None) -> None:
        """Start a standby worker now, so a later self-test does not wait for interpreter and imports."""
        with self._warm_lock:
            if self.standby is None or not self.standby.alive():
                proc = self._spawn(runtime_hint)
                with self._lock:
                    self.standby = proc

    def _load(self, proc: WorkerHandle, ref: BundleRef, rehash: bool = True) -> dict[str, Any]:
        msg = {"op": "load", "dir": str(self.bundles_dir / ref.slot), "variant": ref.variant, "rehash": rehash,
               "files": {rel: (f.length, f.sha256) for rel, f in ref.files.items()}, "threads": self.threads,
               "ident": ref.ident(), "max_input_dims": self.max_input_dims}
        answer = proc.call(msg, self.start_timeout_s)
        if not answer.get("ok"):
            raise WorkerError(f"worker cannot load {ref.name} {ref.version}: {answer.get('message')}",
                              code=str(answer.get("error")))
        proc.ref = ref
        return answer

    def prepare(self, ref: BundleRef, *, rehash: bool = True) -> tuple[WorkerHandle, dict[str, Any]]:
        """Load ``ref`` in the standby worker (started now if needed); returns it and the load timings.

        ``rehash=False`` only right after this process verified the files itself (activation); every other
        load (boot, restart, rollback) hashes each file against its verified sha256 first."""
        with self._warm_lock, self._lock:  # a standby being started right now is worth waiting for
            proc = self.standby if self.standby is not None and self.standby.alive() else None
            self.standby = None
        proc = proc or self._spawn()
        self.loading = proc
        try:
            return proc, self._load(proc, ref, rehash)
        except BaseException:
            self.loading = None
            proc.stop()
            raise

    def selftest(self, proc: WorkerHandle) -> dict[str, Any]:
        try:
            answer = proc.call({"op": "selftest"}, self.start_timeout_s)
        except WorkerError:
            self.loading = None
            proc.stop()
            raise
        if not answer.get("ok"):
            self.loading = None
            proc.stop()
            raise WorkerError(f"golden vectors failed: {answer.get('message')}", code=str(answer.get("error")))
        return answer

    def promote(self, proc: WorkerHandle) -> None:
        """Make a loaded worker the serving one; the old one is stopped."""
        with self._lock:
            old, self.serving = self.serving, proc
            self._consecutive = 0
            if self.loading is proc:
                self.loading = None
        if old is not None and old is not proc:  # off the critical path: the new worker already serves
            threading.Thread(target=old.stop, name="worker-stop", daemon=True).start()

    def serve(self, ref: BundleRef | None) -> None:
        """Serve ``ref`` in a fresh worker (boot, rollback); ``None`` stops serving."""
        if ref is None:
            with self._lock:
                old, self.serving = self.serving, None
            if old is not None:
                old.stop()
            return
        proc, _ = self.prepare(ref)
        self.promote(proc)

    # ---- crashes -----------------------------------------------------------------------------------------
    def _exited(self, proc: WorkerHandle, code: int) -> None:
        """``proc`` died (exit ``code``, negative for a signal): report it if it was serving, restart it."""
        with self._lock:
            if proc is self.standby:
                self.standby = None
            if proc is not self.serving or self._closed:
                return
            self.crashes += 1
            self._consecutive += 1
            attempt = self._consecutive
        err = WorkerError(f"inference worker {proc.pid} died", exitcode=code, code="crash")
        log.warning("worker %s serving %s died: %s", proc.pid, proc.ref and proc.ref.version, err.detail)
        if self.on_crash is not None:
            self.on_crash(proc.ref, err)
        delay = min(self.restart_backoff_max_s, 0.2 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        timer = threading.Timer(delay, self._restart, args=(proc, code))
        timer.daemon = True
        timer.start()

    def _restart(self, dead: WorkerHandle, code: int) -> None:
        with self._lock:
            if self.serving is not dead or self._closed or dead.ref is None:
                return  # replaced meanwhile (rollback, new activation) or shutting down
        try:
            proc, _ = self.prepare(dead.ref)
        except WorkerError as exc:
            log.error("restarting the worker failed: %s", exc)
            with self._lock:
                if self.serving is dead:
                    self._exited(dead, code)
            return
        with self._lock:
            if self.serving is not dead:
                proc.stop()
                return
            self.serving = proc
            self.restarts += 1
        dead.stop()
        log.info("worker restarted as pid %s", proc.pid)

    # ---- requests ----------------------------------------------------------------------------------------
    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self.serving
        if proc is None:
            raise WorkerError("no model is being served yet", code="no_model")
        return proc.call(msg, timeout)

    def ping(self, timeout: float = 5.0) -> bool:
        try:
            return bool(self.call({"op": "ping"}, timeout).get("ok"))
        except WorkerError:
            return False

    def status(self) -> dict[str, Any]:
        s, st, ld = self.serving, self.standby, self.loading
        return {"pid": s.pid if s else None, "alive": bool(s and s.alive()), "standby_pid": st.pid if st else None,
                "loading_pid": ld.pid if ld else None,
                "crashes": self.crashes, "restarts": self.restarts}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs = [p for p in (self.serving, self.standby, self.loading) if p is not None]
            self.serving = self.standby = self.loading = None
        for p in procs:
            p.stop()


class Supervisor(SupervisorBase):
    """Workers as child processes (:class:`WorkerProcess`)."""

    def __init__(self, bundles_dir: Path, *, threads: int = 1, memory_limit_mb: int = 0,
                 start_timeout_s: float = 60.0, restart_backoff_max_s: float = 30.0, max_input_dims: int = 128,
                 on_crash: Callable[[BundleRef | None, WorkerError], None] | None = None) -> None:
        super().__init__(bundles_dir, threads=threads, start_timeout_s=start_timeout_s,
                         restart_backoff_max_s=restart_backoff_max_s, max_input_dims=max_input_dims,
                         on_crash=on_crash)
        self.memory_limit_mb = memory_limit_mb

    def _spawn(self, runtime_hint: str | None = None) -> WorkerProcess:
        proc = WorkerProcess(memory_limit_mb=self.memory_limit_mb, on_exit=self._exited)
        proc.wait_ready(self.start_timeout_s)
        if runtime_hint:
            proc.call({"op": "preload", "runtimes": [runtime_hint]}, self.start_timeout_s)
        return proc
