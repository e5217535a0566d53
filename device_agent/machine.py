"""The agent: one object per device, driving the update state machine and serving predictions.

``Agent`` is instantiable many times in one process (fleet simulation): clock, HTTP transport, telemetry
publisher and worker supervisor are injected; nothing is global. One thread acts (:meth:`Agent.run`);
MQTT callbacks, the worker monitor and the local API only enqueue events or read.

Each state's handler performs one idempotent step and returns an :class:`Outcome`; :meth:`Agent.step`
looks the next state up in :data:`device_agent.states.TRANSITIONS` and persists the new record
atomically *before* the next step runs. Lifecycle events are emitted after the record that justifies
them is on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from tuf.api.metadata import Metadata, Root

from device_agent import AGENT_VERSION
from device_agent.clock import Clock, SystemClock, iso
from device_agent.config import AgentConfig
from device_agent.connection import http_transport, mqtt_publisher
from device_agent.errors import AgentError, ConfigError, ServerError, TransportError, UpdateRefused, WorkerError
from device_agent.fetcher import cached, download_target, target_url
from device_agent.outbox import Outbox
from device_agent.server import ServerClient
from device_agent.states import Event, State, next_state
from device_agent.store import BundleRef, Pending, StateRecord, Store, slot_name
from device_agent.supervisor import Supervisor
from device_agent.telemetry import Publisher, Telemetry, WindowStats
from device_agent.transport import Deadline, Transport
from device_agent.update import (
    ImageRepository,
    accept_assignment,
    check_assignment,
    choose_variant,
    installed_runtimes,
    target_file,
    translated,
)

log = logging.getLogger("edgepack-agent")


@dataclass
class Outcome:
    event: Event
    changes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = field(default_factory=list)
    """Telemetry events ``(name, target, detail)`` to emit once the new record is persisted."""


def _platform() -> str:
    import platform

    return f"{platform.system().lower()}-{platform.machine()}"


class Agent:
    """One device. Build, :meth:`boot`, then :meth:`run` (blocking) or :meth:`step` (tests, simulation)."""

    def __init__(self, config: AgentConfig, *, clock: Clock | None = None, transport: Transport | None = None,
                 publisher: Publisher | str | None = "mqtt", supervisor: Supervisor | None = None,
                 runtimes: dict[str, str] | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.transport: Transport = transport or http_transport(config, f"edgepack-agent/{AGENT_VERSION}")
        self.store = Store(config.state_dir)
        self.record = self.store.load()
        self.runtimes = runtimes if runtimes is not None else installed_runtimes()
        self.enrollment = self._read_json(self.store.dir / "enrollment.json")
        self.credential = self._credential()
        self.server = ServerClient(config.server.url, self.transport, timeout_s=config.server.request_timeout_s)
        image_url = self.enrollment.get("image_repo_url") or config.server.url.rstrip("/") + "/tuf/image/"
        self.image = ImageRepository(self.store.tuf, self.store.trust, image_url, config.path(config.trust.image_root),
                                     self.transport, self.clock, socket_timeout_s=config.limits.socket_timeout_s,
                                     deadline_s=config.limits.download_deadline_s,
                                     max_metadata_bytes=config.limits.max_metadata_bytes)
        with translated("director root"):
            self.director_root = Metadata[Root].from_bytes(
                config.path(config.trust.director_root).read_bytes()).signed
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stop_flag = threading.Event()
        self.window = WindowStats(self.clock.now())
        if publisher == "mqtt":
            publisher = mqtt_publisher(config, self.enrollment)
        self.telemetry = Telemetry(config.device_id, Outbox(self.store.outbox,
                                                            max_messages=config.limits.outbox_max_messages,
                                                            max_bytes=config.limits.outbox_max_bytes),
                                   publisher if not isinstance(publisher, str) else None, self.clock,
                                   context=self._context, publish_timeout_s=config.mqtt.publish_timeout_s,
                                   on_notify=lambda payload: self.events.put(("notify", payload)))
        self.supervisor = supervisor or Supervisor(
            self.store.bundles, threads=config.worker.threads, memory_limit_mb=config.worker.memory_limit_mb,
            start_timeout_s=config.worker.start_timeout_s, restart_backoff_max_s=config.worker.restart_backoff_max_s,
            max_input_dims=config.telemetry.max_input_dims)
        self.supervisor.on_crash = self._on_crash
        self.poll_interval_s = float(self.enrollment.get("poll_interval_s") or config.server.poll_interval_s)
        self.failures = 0
        self._standby: Any = None
        self._predictions: OrderedDict[str, tuple[list[str] | None, str]] = OrderedDict()
        self._pred_lock = threading.Lock()
        self.timings: dict[str, float] = {}
        self.handlers = {State.IDLE: self._idle, State.DOWNLOADING: self._downloading,
                         State.VERIFYING: self._verifying, State.SELFTEST: self._selftest,
                         State.ACTIVATING: self._activating, State.TRIAL: self._trial,
                         State.COMMITTING: self._committing, State.ROLLING_BACK: self._rolling_back}
        self._window_thread: threading.Thread | None = None
        self._activation_t0: float | None = None
        self._verified_slot: str | None = None
        self._next_checkin = 0.0

    # ---- setup -------------------------------------------------------------------------------------------
    @staticmethod
    def _read_json(path: Any) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_bytes())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _credential(self) -> str | None:
        if self.config.server.credential:
            return self.config.server.credential
        path = self.config.path(self.config.server.credential_file)
        try:
            return path.read_text().strip() or None
        except OSError:
            return None

    def _context(self) -> tuple[dict[str, Any] | None, str | None]:
        serving = self.record.serving()
        return (serving.ident() if serving else None), self.record.rollout_id

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def boot(self) -> None:
        """Resume after a (re)start: serve a verified bundle, then continue the persisted step."""
        if self.credential is None:
            raise ConfigError(f"device {self.config.device_id} is not enrolled: no credential at "
                              f"{self.config.path(self.config.server.credential_file)}; run `edgepack-agent enroll`")
        rec = self.record
        keep = {r.slot for r in (rec.active, rec.previous) if r} | ({rec.pending.slot} if rec.pending else set())
        removed = self.store.prune(keep)
        if removed:
            log.info("removed leftovers of interrupted updates: %s", removed)
        self.telemetry.start()
        self._serve_at_boot()
        if rec.state is State.TRIAL and rec.pending is not None:
            self._persist(rec.evolve(pending=replace(rec.pending, trial_boots=rec.pending.trial_boots + 1)))
        self._persist(self.record.evolve(state=next_state(self.record.state, Event.BOOT)))
        log.info("agent %s booted in state %s, serving %s", self.config.device_id, self.record.state.value,
                 self.record.serving() and self.record.serving().ident())  # type: ignore[union-attr]
        self._window_thread = threading.Thread(target=self._windows, name="windows", daemon=True)
        self._window_thread.start()

    def _serve_at_boot(self) -> None:
        rec = self.record
        for ref in (rec.serving(), rec.previous if rec.serving() is rec.active else rec.active):
            if ref is None:
                continue
            try:
                self.supervisor.serve(ref)
                return
            except WorkerError as exc:
                log.error("cannot serve %s %s at boot: %s", ref.name, ref.version, exc)
                self.telemetry.event("install_failed", target=ref.ident(), detail={**exc.as_detail(),
                                                                                    "phase": "boot"})
        if rec.serving() is not None:
            log.error("no verified bundle can be served")

    def run(self) -> None:
        """Act until :meth:`stop`. Call :meth:`boot` first."""
        while not self.stop_flag.is_set():
            self.step()

    def stop(self) -> None:
        self.stop_flag.set()
        self.events.put(("stop", None))

    def close(self) -> None:
        self.stop()
        self.supervisor.close()
        self.telemetry.stop(flush_s=2.0)

    def _persist(self, record: StateRecord) -> None:
        self.store.save(record)
        self.record = record

    def _pause(self) -> None:
        if self.config.debug.step_delay_s:
            self.clock.wait(self.stop_flag, self.config.debug.step_delay_s)

    def step(self) -> State:
        """Run the current state's step, persist the next state, emit its events."""
        state = self.record.state
        outcome = self.handlers[state]()
        if outcome is None:
            return state
        new = next_state(state, outcome.event)
        before = self.record.pending or outcome.changes.get("pending")
        rollout = before.rollout_id if isinstance(before, Pending) else None
        self._persist(self.record.evolve(state=new, **outcome.changes))
        if new is not state:
            log.info("state %s --%s--> %s", state.value, outcome.event.value, new.value)
        if outcome.event is Event.RETRY:
            self._next_checkin = self.clock.monotonic() + self._backoff()
        elif new is State.IDLE and state is not State.IDLE:
            self._next_checkin = 0.0  # report the outcome at once
        for name, target, detail in outcome.events:
            self.telemetry.event(name, target=target, detail=detail, rollout_id=rollout)
        self._pause()
        return new

    # ---- waiting -----------------------------------------------------------------------------------------
    def _backoff(self) -> float:
        lim = self.config.limits
        delay: float = min(lim.backoff_max_s, lim.backoff_initial_s * 2.0 ** max(0, self.failures - 1))
        return delay * random.uniform(0.5, 1)

    def _wait_event(self, seconds: float) -> tuple[str, Any] | None:
        """Next queued event within ``seconds`` (short slices; the stop flag ends the wait)."""
        deadline = self.clock.monotonic() + seconds
        while not self.stop_flag.is_set():
            left = deadline - self.clock.monotonic()
            if left <= 0:
                return None
            try:
                return self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
        return ("stop", None)

    def _drain(self, kind: str) -> None:
        kept = []
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            if ev[0] != kind:
                kept.append(ev)
        for ev in kept:
            self.events.put(ev)

    # ---- IDLE: check in ----------------------------------------------------------------------------------
    def check_in_now(self) -> None:
        self.events.put(("notify", b"{}"))

    def _idle(self) -> Outcome | None:
        wait = self._next_checkin - self.clock.monotonic()
        while wait > 0:
            ev = self._wait_event(wait)
            if ev is None:
                break
            if ev[0] == "stop":
                return None
            if ev[0] == "notify":
                log.info("server asked for a check-in")
                break
            wait = self._next_checkin - self.clock.monotonic()
        outcome = self._check_in()
        self._next_checkin = self.clock.monotonic() + self.poll_interval_s
        return outcome

    def _checkin_body(self) -> dict[str, Any]:
        active = self.record.active
        return {"agent_version": AGENT_VERSION, "platform": _platform(),
                "runtimes": {k: v.split(" ")[-1] for k, v in self.runtimes.items()},
                "state": self.record.state.value, "active": active.ident() if active else None,
                "last_error": self.record.last_error}

    def _check_in(self) -> Outcome:
        assert self.credential is not None
        try:
            answer = self.server.checkin(self.config.device_id, self.credential, self._checkin_body())
        except (TransportError, ServerError) as exc:
            self.failures += 1
            log.warning("check-in failed (%s); retrying in a while", exc)
            return Outcome(Event.RETRY)
        if answer.poll_interval_s:
            self.poll_interval_s = answer.poll_interval_s
        if answer.assignment is None:
            self.failures = 0
            return Outcome(Event.NO_CHANGE)
        return self._consider(answer.assignment)

    def _refuse(self, exc: AgentError, digest: str, event: str, target: dict[str, Any] | None,
                assignment_version: int, phase: str) -> Outcome:
        log.error("update refused (%s): %s", exc.code, exc.message)
        bundle = [target["name"], target["version"]] if target else None
        detail = {**exc.as_detail(), "phase": phase}
        return Outcome(Event.NO_CHANGE if self.record.state is State.IDLE else Event.FAILED,
                       {"refused": {"digest": digest, "bundle": bundle, "assignment_version": assignment_version},
                        "pending": None, "last_error": detail},
                       [(event, target, detail)])

    def _consider(self, data: bytes) -> Outcome:
        digest = hashlib.sha256(data).hexdigest()
        refused = self.record.refused or {}
        if refused.get("digest") == digest:
            return Outcome(Event.NO_CHANGE)
        rec = self.record
        try:
            a = check_assignment(self.director_root, data, device_id=self.config.device_id,
                                 hardware_id=self.config.hardware_id, now=self.clock.now(),
                                 last_version=rec.assignment_version)
        except AgentError as exc:
            return self._refuse(exc, digest, "update_refused", None, rec.assignment_version, "assignment")
        bundle = a.bundle
        active = rec.active
        if bundle is None or (active and (active.name, active.version) == (bundle["name"], bundle["version"])):
            self.failures = 0
            return Outcome(Event.NO_CHANGE, {"assignment_version": a.version})
        target = {"name": bundle["name"], "version": bundle["version"], "release_counter": bundle["release_counter"]}
        if refused.get("bundle") == [target["name"], target["version"]] and a.version <= int(
                refused.get("assignment_version", 0)):
            return Outcome(Event.NO_CHANGE)
        try:
            accepted = accept_assignment(a, self.image)
        except TransportError as exc:
            self.failures += 1
            log.warning("image repository unreachable (%s); retrying in a while", exc)
            return Outcome(Event.RETRY)
        except AgentError as exc:
            return self._refuse(exc, digest, "verification_failed", target, a.version, "verify")
        slot = slot_name(target["name"], target["version"], accepted.files)
        self.store.prune({r.slot for r in (rec.active, rec.previous) if r} | {slot})
        pending = Pending(target["name"], target["version"], int(target["release_counter"]), a.version, digest,
                          a.info.get("rollout_id"), slot, accepted.files)
        self.failures = 0
        size = sum(f.length for f in accepted.files.values())
        return Outcome(Event.ASSIGNMENT, {"pending": pending, "assignment_version": a.version},
                       [("downloading", target, {"bytes": size, "files": len(accepted.files),
                                                  "reason": a.info.get("reason")})])

    # ---- DOWNLOADING ---------------------------------------------------------------------------------------
    def _downloading(self) -> Outcome:
        p = self.record.pending
        assert p is not None
        threading.Thread(target=self._warm, daemon=True).start()
        staging = self.store.staging_dir(p.slot)
        if self.store.slot_dir(p.slot).exists() and not staging.exists():
            return Outcome(Event.DOWNLOADED)  # moved into its slot before a restart: verification re-checks it
        lim = self.config.limits
        if sum(f.length for f in p.files.values()) > lim.max_bundle_bytes:
            exc = UpdateRefused("bundle is larger than limits.max_bundle_bytes", code="too_large",
                                detail={"limit": lim.max_bundle_bytes})
            return self._fail_update(exc, "verification_failed", "download")
        deadline = Deadline(self.clock, lim.download_deadline_s, "bundle download")
        t0 = time.perf_counter()
        fetched = 0
        delay = self.config.debug.step_delay_s

        def on_chunk(n: int) -> None:
            if delay:
                self.clock.wait(self.stop_flag, delay)
            if self.stop_flag.is_set():
                raise TransportError("agent is stopping", code="stopping")

        try:
            for rel, info in sorted(p.files.items()):
                tf = target_file(p.name, p.version, rel, info)
                dest = staging / rel
                if cached(dest, tf):
                    continue
                url = target_url(self.image.targets_url, tf, hash_prefix=self.image.consistent_snapshot)
                for attempt in range(1, lim.download_attempts + 1):
                    try:
                        with translated(f"download of {rel}"):
                            download_target(self.transport, url, dest, tf, deadline,
                                            socket_timeout_s=lim.socket_timeout_s,
                                            chunk_bytes=self.config.debug.download_chunk_bytes, on_chunk=on_chunk)
                        fetched += info.length
                        break
                    except UpdateRefused as exc:
                        log.warning("download of %s was corrupt (attempt %d/%d): %s", rel, attempt,
                                    lim.download_attempts, exc)
                        if attempt == lim.download_attempts:
                            raise
        except TransportError as exc:
            self.failures += 1
            log.warning("download interrupted (%s); it resumes after a backoff", exc)
            return Outcome(Event.RETRY, {"pending": None, "last_error": {**exc.as_detail(), "phase": "download"}})
        except UpdateRefused as exc:
            return self._fail_update(exc, "verification_failed", "download")
        self.timings["download_s"] = time.perf_counter() - t0
        detail = {"bytes": fetched, "seconds": round(self.timings["download_s"], 3)}
        return Outcome(Event.DOWNLOADED, {}, [("downloaded", p.target(), detail)])

    def _warm(self) -> None:
        active = self.record.active
        hint = active.runtime if active is not None else next(iter(self.runtimes), None)
        try:
            self.supervisor.warm(hint)
        except WorkerError as exc:
            log.warning("could not pre-start a worker: %s", exc)

    def _fail_update(self, exc: AgentError, event: str, phase: str) -> Outcome:
        p = self.record.pending
        assert p is not None
        for d in (self.store.staging_dir(p.slot), self.store.slot_dir(p.slot)):
            shutil.rmtree(d, ignore_errors=True)
        return self._refuse(exc, p.assignment_digest, event, p.target(), p.assignment_version, phase)

    # ---- VERIFYING -------------------------------------------------------------------------------------------
    def _verifying(self) -> Outcome:
        from bundles.verify import verify_directory

        p = self.record.pending
        assert p is not None
        t0 = self._activation_t0 = time.perf_counter()
        staging, slot_dir = self.store.staging_dir(p.slot), self.store.slot_dir(p.slot)
        src = staging if staging.exists() else slot_dir
        for leftover in src.rglob("*.part"):
            leftover.unlink()
        try:
            with translated(f"{p.name} {p.version}"):
                vb = verify_directory(src, self.image.targets, p.name, p.version, trust=self.image.trust,
                                      hardware_id=self.config.hardware_id, agent_version=AGENT_VERSION)
            signed = {rel: (t.length, t.hashes.get("sha256")) for rel, t in vb.files.items()}
            if signed != {rel: (f.length, f.sha256) for rel, f in p.files.items()}:
                raise UpdateRefused("the verified files differ from the assignment's (mix-and-match?)",
                                    code="AssignmentError")
            variant, why = choose_variant(vb.manifest, self.config.hardware_id, self.runtimes)
        except AgentError as exc:
            return self._fail_update(exc, "verification_failed" if isinstance(exc, UpdateRefused)
                                     else "install_failed", "verify")
        if src is staging:
            shutil.rmtree(slot_dir, ignore_errors=True)
            staging.rename(slot_dir)
        self._verified_slot = p.slot
        log.info("variant for %s %s: %s", p.name, p.version, why)
        self.timings["verify_s"] = time.perf_counter() - t0
        return Outcome(Event.VERIFIED, {"pending": replace(p, variant=variant.id, runtime=variant.runtime)},
                       [("verified", p.target(), {"variant": variant.id, "runtime": variant.runtime, "why": why})])

    # ---- SELFTEST --------------------------------------------------------------------------------------------
    def _load_and_test(self, ref: BundleRef, phase: str) -> Any:
        t0 = time.perf_counter()
        # Files this process verified moments ago are not hashed twice; after a restart they are.
        proc, load = self.supervisor.prepare(ref, rehash=self._verified_slot != ref.slot)
        self._pause()
        result = self.supervisor.selftest(proc)
        self.timings.update(load_hash_ms=load["hash_ms"], session_ms=load["session_ms"],
                            golden_ms=result["golden_ms"], selftest_s=time.perf_counter() - t0)
        return proc

    def _selftest(self) -> Outcome:
        p = self.record.pending
        assert p is not None
        try:
            self._standby = self._load_and_test(p.to_ref(), "selftest")
        except WorkerError as exc:
            events: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []
            if exc.code == "crash":
                self.window.crash()
                events.append(("crash", p.target(), {**exc.as_detail(), "phase": "selftest"}))
            out = self._fail_update(exc, "selftest_failed", "selftest")
            out.events[:0] = events
            return out
        return Outcome(Event.SELFTEST_PASSED, {}, [("selftest_passed", p.target(), {
            k: round(v, 3) for k, v in self.timings.items() if k in ("session_ms", "golden_ms", "load_hash_ms")})])

    # ---- ACTIVATING --------------------------------------------------------------------------------------------
    def _activating(self) -> Outcome:
        p = self.record.pending
        assert p is not None
        ref = p.to_ref()
        proc, self._standby = self._standby, None
        self._drain("crash")  # crashes of the worker being replaced are not the new bundle's
        try:
            if proc is None or not proc.alive():
                proc = self._load_and_test(ref, "activation")  # after a restart: the self-test runs again
            self.supervisor.promote(proc)
        except WorkerError as exc:
            return Outcome(Event.FAILED, {"last_error": {**exc.as_detail(), "phase": "activation"}})
        old = self.record.active
        now = iso(self.clock.now())
        if self._activation_t0 is not None:  # verification start -> new bundle serving (this process only)
            self.timings["activation_s"] = time.perf_counter() - self._activation_t0
            self._activation_t0 = None
        timings = {k: round(v, 4) for k, v in self.timings.items()}
        return Outcome(Event.ACTIVATED, {"active": ref, "previous": old, "rollout_id": p.rollout_id,
                                         "pending": replace(p, trial_started_at=now, trial_boots=0)},
                       [("activated", p.target(), {"from": old.ident() if old else None, "variant": ref.variant,
                                                   "trial_s": self.config.trial.period_s, "timings": timings})])

    # ---- TRIAL -------------------------------------------------------------------------------------------------
    def _trial(self) -> Outcome | None:
        p = self.record.pending
        assert p is not None and p.trial_started_at is not None
        cfg = self.config.trial
        if p.trial_boots > cfg.max_restarts:
            return self._trial_failed("restarts", {"boots": p.trial_boots, "limit": cfg.max_restarts})
        end = datetime.fromisoformat(p.trial_started_at) + timedelta(seconds=cfg.period_s)
        crashes = 0
        next_health = self.clock.monotonic() + cfg.health_interval_s
        while True:
            left = (end - self.clock.now()).total_seconds()
            if left <= 0:
                return Outcome(Event.TRIAL_PASSED)
            ev = self._wait_event(min(left, max(0.05, next_health - self.clock.monotonic())))
            if ev is not None and ev[0] == "stop":
                return None
            if ev is not None and ev[0] == "crash":
                crashes += 1
                if crashes > cfg.max_crashes:
                    return self._trial_failed("crash", {**ev[1], "crashes": crashes})
            if self.clock.monotonic() >= next_health:
                next_health = self.clock.monotonic() + cfg.health_interval_s
                if not self.supervisor.ping(timeout=max(1.0, cfg.health_interval_s)):
                    return self._trial_failed("health", {"message": "the worker failed its health check"})

    def _trial_failed(self, reason: str, detail: dict[str, Any]) -> Outcome:
        log.error("trial of the new bundle failed (%s): %s", reason, detail)
        return Outcome(Event.TRIAL_FAILED, {"last_error": {"error": f"trial_{reason}", "phase": "trial", **detail}})

    # ---- COMMITTING / ROLLING_BACK -----------------------------------------------------------------------------
    def _committing(self) -> Outcome:
        rec = self.record
        assert rec.active is not None
        self.store.prune({rec.active.slot})
        target = rec.pending.target() if rec.pending else rec.active.ident()
        return Outcome(Event.COMMITTED, {"previous": None, "pending": None, "last_error": None},
                       [("committed", target, {"variant": rec.active.variant})])

    def _rolling_back(self) -> Outcome:
        rec = self.record
        p = rec.pending
        failed = p.to_ref() if p is not None and p.variant else rec.active
        back = rec.previous
        try:
            self.supervisor.serve(back)
        except WorkerError as exc:
            log.error("the previous bundle does not load either (%s); serving nothing", exc)
            self.supervisor.serve(None)
            back = None
        keep = {back.slot} if back else set()
        self.store.prune(keep)
        reason = rec.last_error or {"error": "rollback"}
        target = p.target() if p is not None else (failed.ident() if failed else None)
        refused = {"digest": p.assignment_digest if p else "", "assignment_version": p.assignment_version if p else 0,
                   "bundle": [p.name, p.version] if p else None}
        return Outcome(Event.ROLLED_BACK, {"active": back, "previous": None, "pending": None, "refused": refused,
                                           "rollout_id": rec.rollout_id if back is not None else None},
                       [("rolled_back", target, {**reason, "to": back.ident() if back else None})])

    # ---- crashes and windows -------------------------------------------------------------------------------------
    def _on_crash(self, ref: BundleRef | None, err: WorkerError) -> None:
        """Called from the worker's monitor thread: count, report, hand the decision to the acting thread."""
        self.window.crash()
        phase = "trial" if self.record.state is State.TRIAL else "serving"
        self.telemetry.event("crash", target=ref.ident() if ref else None, detail={**err.as_detail(), "phase": phase})
        self.events.put(("crash", dict(err.detail)))

    def _windows(self) -> None:
        while not self.clock.wait(self.stop_flag, self.config.telemetry.window_s):
            self.emit_window()

    def emit_window(self) -> dict[str, Any] | None:
        window = self.window.take(self.clock.now())
        if self.record.serving() is None and not window["requests"]:
            return None
        try:
            stats = self.supervisor.call({"op": "stats"}, 10.0).get("input_stats")
        except WorkerError:
            stats = None
        if stats:
            window["input_stats"] = stats
        return self.telemetry.window(window)

    # ---- local API ---------------------------------------------------------------------------------------------
    def predict(self, body: bytes) -> tuple[int, bytes]:
        """Run one prediction request (JSON body); returns HTTP status and JSON body."""
        pid = uuid.uuid4().hex
        t0 = time.perf_counter()
        try:
            ans = self.supervisor.call({"op": "predict", "body": body, "prediction_id": pid},
                                       self.config.api.prediction_timeout_s)
        except WorkerError as exc:
            self.window.request((time.perf_counter() - t0) * 1e3, False, None)
            status = 503
            return status, _error("model_unavailable", exc.message + "; the last good model is being restarted"
                                  if exc.code != "no_model" else exc.message)
        latency = (time.perf_counter() - t0) * 1e3
        status = int(ans.get("status", 500))
        if status != 200:
            self.window.request(latency, False, None)
            return status, _error(str(ans.get("error")), str(ans.get("message")))
        classes = ans.get("classes")
        self.window.request(latency, True, classes)
        serving = self.supervisor.serving
        version = serving.ref.version if serving is not None and serving.ref is not None else ""
        with self._pred_lock:
            self._predictions[pid] = (classes, version)
            while len(self._predictions) > self.config.api.feedback_memory:
                self._predictions.popitem(last=False)
        return 200, ans["body"]

    def feedback(self, body: bytes) -> tuple[int, bytes]:
        """The true label(s) for a prediction id: the source of the accuracy telemetry."""
        try:
            doc = json.loads(body)
            pid, label = doc["prediction_id"], doc["label"]
        except (ValueError, KeyError, TypeError):
            return 400, _error("bad_request", 'feedback must be {"prediction_id": "...", "label": ...} '
                                              "(a list of labels for a batch)")
        with self._pred_lock:
            known = self._predictions.pop(str(pid), None)
        if known is None:
            return 404, _error("unknown_prediction",
                               f"no recent prediction {pid!r} (only the last {self.config.api.feedback_memory} "
                               "are kept; each takes one feedback)")
        classes, version = known
        labels = [str(x) for x in label] if isinstance(label, list) else [str(label)]
        if classes is None or len(labels) != len(classes):
            return 400, _error("bad_request", f"expected {len(classes) if classes else 'no'} label(s) for this "
                                              f"prediction, got {len(labels)}")
        correct = [a == b for a, b in zip(labels, classes, strict=True)]
        for c in correct:
            self.window.feedback_given(c)
        return 200, json.dumps({"prediction_id": pid, "correct": correct, "model_version": version}).encode()

    def status(self) -> dict[str, Any]:
        rec = self.record
        serving = rec.serving()
        return {"device_id": self.config.device_id, "state": rec.state.value,
                "serving": serving.ident() if serving else None,
                "previous": rec.previous.ident() if rec.previous else None,
                "pending": rec.pending.target() if rec.pending else None, "last_error": rec.last_error,
                "worker": self.supervisor.status(), "outbox": len(self.telemetry.outbox),
                "runtimes": self.runtimes}


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()
