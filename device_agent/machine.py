"""The agent: one object per device, driving the update state machine and serving predictions.

``Agent`` is the composition root and the driver. It builds the collaborators once (clock, HTTP transport,
telemetry publisher and worker supervisor are injected; nothing is global, so a process can hold many
agents: the fleet simulator), and it runs the loop: :meth:`Agent.step` asks the current state's handler
(:class:`device_agent.steps.UpdateSteps`) for one idempotent step, looks the next state up in
:data:`device_agent.states.TRANSITIONS`, persists the new record atomically *before* the next step runs,
then emits the step's telemetry events. Serving (predictions, feedback, windows, crash reports) is
:class:`device_agent.serving.Serving`; it never changes the record.

One thread acts (:meth:`Agent.run`); MQTT callbacks, the worker monitor and the local API only put notes
in the :class:`~device_agent.inbox.Inbox` or read. A scheduler that steps many agents itself asks
:meth:`Agent.ready` whether a step would act at once.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from tuf.api.metadata import Metadata, Root

from device_agent import AGENT_VERSION
from device_agent.clock import Clock, SystemClock
from device_agent.config import AgentConfig
from device_agent.connection import http_transport, mqtt_publisher
from device_agent.errors import ConfigError, StorageError
from device_agent.guards import loop_verdict, retry_delay
from device_agent.inbox import Inbox
from device_agent.outbox import Outbox
from device_agent.reporting import Reporter
from device_agent.server import ServerClient
from device_agent.serving import Serving
from device_agent.states import UPDATE_STATES, Event, State, next_state
from device_agent.steps import Outcome, UpdateSteps
from device_agent.store import Pending, StateRecord, Store
from device_agent.supervisor import Supervisor, WorkerSupervisor
from device_agent.telemetry import Publisher, Telemetry, Totals, WindowStats
from device_agent.transport import Transport
from device_agent.update import ImageRepository, installed_runtimes, translated

log = logging.getLogger("edgepack-agent")


class Agent:
    """One device. Build, :meth:`boot`, then :meth:`run` (blocking) or :meth:`step` (tests, simulation)."""

    def __init__(self, config: AgentConfig, *, clock: Clock | None = None, transport: Transport | None = None,
                 publisher: Publisher | str | None = "mqtt", supervisor: WorkerSupervisor | None = None,
                 runtimes: dict[str, str] | None = None) -> None:
        self._config = config
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
                                     max_metadata_bytes=config.limits.max_metadata_bytes, progress=self._beat)
        with translated("director root"):
            director_root = Metadata[Root].from_bytes(config.path(config.trust.director_root).read_bytes()).signed
        self.stop_flag = threading.Event()
        self.inbox = Inbox(self.clock, self.stop_flag)
        if publisher == "mqtt":
            publisher = mqtt_publisher(config, self.enrollment)
        self.telemetry = Telemetry(config.device_id, Outbox(self.store.outbox,
                                                            max_messages=config.limits.outbox_max_messages,
                                                            max_bytes=config.limits.outbox_max_bytes),
                                   publisher if not isinstance(publisher, str) else None, self.clock,
                                   context=self._context, publish_timeout_s=config.mqtt.publish_timeout_s,
                                   resend_s=config.mqtt.resend_s,
                                   on_notify=lambda payload: self.inbox.put("notify", payload))
        self.supervisor: WorkerSupervisor = supervisor or Supervisor(
            self.store.bundles, threads=config.worker.threads, memory_limit_mb=config.worker.memory_limit_mb,
            start_timeout_s=config.worker.start_timeout_s, restart_backoff_max_s=config.worker.restart_backoff_max_s,
            max_input_dims=config.telemetry.max_input_dims)
        self.reporter = Reporter(self.telemetry)
        self.serving = Serving(config, clock=self.clock, supervisor=self.supervisor, reporter=self.reporter,
                               inbox=self.inbox, stop_flag=self.stop_flag, record=lambda: self.record)
        self.supervisor.on_crash = self.serving.on_crash
        self.updates = UpdateSteps(
            config, clock=self.clock, store=self.store, image=self.image, server=self.server,
            transport=self.transport, credential=self.credential, director_root=director_root,
            runtimes=self.runtimes, supervisor=self.supervisor, inbox=self.inbox, stop_flag=self.stop_flag,
            window=self.serving.window, telemetry=self.telemetry,
            poll_interval_s=float(self.enrollment.get("poll_interval_s") or config.server.poll_interval_s))
        self._hold_until = 0.0
        """While the state file cannot be written: no step before this (monotonic)."""
        self._storage_failures = 0
        self._storage_reported = False

    # ---- setup -------------------------------------------------------------------------------------------
    @property
    def config(self) -> AgentConfig:
        return self._config

    @config.setter
    def config(self, value: AgentConfig) -> None:
        """A new configuration applies from the next step on (tests change trial settings this way)."""
        self._config = self.updates.config = self.serving.config = value

    @property
    def window(self) -> WindowStats:
        return self.serving.window

    def _beat(self) -> None:
        self.updates.heartbeat = self.clock.monotonic()

    @property
    def heartbeat(self) -> float:
        """Monotonic time the acting thread last showed progress (read by the systemd watchdog thread)."""
        return self.updates.heartbeat

    @property
    def timings(self) -> dict[str, float]:
        return self.updates.timings

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
        """Resume after a (re)start: count the boot, serve a verified bundle, then continue the persisted step.

        The boot is counted in the persisted record first, before anything that could kill the agent runs:
        a step that kills it on every boot is then caught by the loop guard (:meth:`step`)."""
        if self.credential is None:
            raise ConfigError(f"device {self.config.device_id} is not enrolled: no credential at "
                              f"{self.config.path(self.config.server.credential_file)}; run `edgepack-agent enroll`")
        rec = self.record
        booted = rec.evolve(state=next_state(rec.state, Event.BOOT))
        if rec.state in UPDATE_STATES and rec.pending is not None:
            booted = booted.evolve(pending=rec.pending.booted(rec.state))
        self._save(booted)
        keep = {r.slot for r in (rec.active, rec.previous) if r} | ({rec.pending.slot} if rec.pending else set())
        removed = self.store.prune(keep)
        if removed:
            log.info("removed leftovers of interrupted updates: %s", removed)
        self.telemetry.start()
        self.serving.serve_at_boot(self.record)
        serving = self.record.serving()
        log.info("agent %s booted in state %s, serving %s", self.config.device_id, self.record.state.value,
                 serving.ident() if serving else None)
        self.serving.start_windows()
        self._pause()

    def _save(self, record: StateRecord) -> bool:
        """Persist ``record``; when the disk refuses, keep it in memory, report, and say False."""
        try:
            self._persist(record)
        except StorageError as exc:
            self._cannot_save(exc, record.state)
            self.record = record
            return False
        return True

    def run(self) -> None:
        """Act until :meth:`stop`. Call :meth:`boot` first."""
        while not self.stop_flag.is_set():
            self.step()

    def stop(self) -> None:
        self.stop_flag.set()
        self.inbox.put("stop")

    def close(self) -> None:
        self.stop()
        self.supervisor.close()
        self.telemetry.stop(flush_s=2.0)

    def _persist(self, record: StateRecord) -> None:
        self.store.save(record)
        self.record = record
        if self._storage_failures:
            log.info("the state directory accepts writes again")
            self._storage_failures = 0
            self._storage_reported = False
            self.updates.storage_error = None
        self.reporter.flush()

    # ---- stepping ----------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when :meth:`step` would act at once: in IDLE the check-in is due or a notice is queued, in
        TRIAL the period is over or a crash is queued; every other state always. For schedulers that step
        many agents from a few threads (the fleet simulator)."""
        if self._hold_until > self.clock.monotonic():
            return False
        return self.updates.ready(self.record)

    def drain(self, kind: str) -> int:
        """Drop queued notes of ``kind`` (``notify``, ``crash``); returns how many."""
        return self.inbox.drain(kind)

    def check_in_now(self) -> None:
        self.inbox.put("notify", b"{}")

    def step(self) -> State:
        """Run the current state's step, persist the next state, emit its events."""
        rec = self.record
        state = rec.state
        hold = self._hold_until - self.clock.monotonic()
        if hold > 0:  # the state file could not be written: wait, then run the (idempotent) step again
            self.updates.heartbeat = self.clock.monotonic()
            self.clock.wait(self.stop_flag, min(hold, 1.0))
            return state
        verdict = None
        if rec.pending is not None:
            verdict = loop_verdict(state, rec.pending.boots, limit=self.config.limits.boot_loop_limit,
                                   trial_limit=self.config.trial.max_restarts)
        outcome = self.updates.abandon(rec, verdict) if verdict is not None else self.updates.run(rec)
        if outcome is None:
            return state
        return self._apply(rec, outcome)

    def _apply(self, rec: StateRecord, outcome: Outcome) -> State:
        state = rec.state
        new = next_state(state, outcome.event)
        before = rec.pending or outcome.change.get("pending", rec)
        rollout = before.rollout_id if isinstance(before, Pending) else None
        try:
            self._persist(outcome.change.apply(rec, new))
        except StorageError as exc:
            return self._persist_failed(rec, outcome, exc)
        if new is not state:
            log.info("state %s --%s--> %s", state.value, outcome.event.value, new.value)
        if outcome.retry_in is not None:
            self.updates.next_checkin = self.clock.monotonic() + outcome.retry_in
        elif new is State.IDLE and state is not State.IDLE:
            self.updates.next_checkin = 0.0  # report the outcome at once
        for name, target, detail in outcome.events:
            self.reporter.event(name, target=target, detail=detail, rollout_id=rollout)
        self._pause()
        return new

    def _persist_failed(self, rec: StateRecord, outcome: Outcome, exc: StorageError) -> State:
        """The disk refused the new record: the old one stays on disk and in memory (so the step runs again).

        An update that has not been activated yet gives way first: its files are deleted (they are likely
        what filled the disk), it is reported as ``install_failed`` (``disk_full``) and retried after a
        backoff. Otherwise the agent keeps serving, reports the error at check-in and tries again later."""
        if rec.pending is not None and rec.state in (State.DOWNLOADING, State.VERIFYING, State.SELFTEST):
            freed = self.updates.disk_full(rec, exc, "persist")
            gave_way = freed.change.apply(rec, next_state(rec.state, freed.event))
            try:
                self._persist(gave_way)
            except StorageError as again:
                exc = again
                self.record = gave_way  # its files are gone: go on from IDLE in memory (a restart re-checks them)
            else:
                return self._after_freeing(rec, freed)
        self._cannot_save(exc, self.record.state)
        target = next((t for _, t, _ in outcome.events if t), None) or (rec.pending.target() if rec.pending else None)
        if target is not None and not self._storage_reported:  # an install is failing: the rollout gate must know
            self._storage_reported = True
            assert self.updates.storage_error is not None
            self.reporter.event("install_failed", target=target, detail={**self.updates.storage_error})
        return rec.state

    def _after_freeing(self, rec: StateRecord, freed: Outcome) -> State:
        self.updates.storage_error = None
        self._storage_failures = 0
        assert freed.retry_in is not None
        self.updates.next_checkin = self.clock.monotonic() + freed.retry_in
        rollout = rec.pending.rollout_id if rec.pending else None
        for name, target, detail in freed.events:
            self.reporter.event(name, target=target, detail=detail, rollout_id=rollout)
        log.info("state %s --%s--> %s (disk full)", rec.state.value, freed.event.value, self.record.state.value)
        return self.record.state

    def _cannot_save(self, exc: StorageError, state: State) -> None:
        self._storage_failures += 1
        lim = self.config.limits
        delay = retry_delay(self._storage_failures, initial_s=lim.backoff_initial_s, max_s=lim.backoff_max_s)
        free, total = self.store.disk()
        self.updates.storage_error = {**exc.as_detail(), "phase": "persist", "state": state.value,
                                      "free_bytes": free, "total_bytes": total,
                                      "message": f"{exc.message}; the last saved state is kept and the last good "
                                                 f"model keeps serving; trying again in {delay:.0f} s"}
        log.error("cannot save the state (%s); still serving; trying again in %.1f s", exc.message, delay)
        now = self.clock.monotonic()
        if state is State.IDLE:
            self.updates.next_checkin = now + delay  # the check-in reports the error meanwhile
        else:
            self._hold_until = now + delay

    def _pause(self) -> None:
        if self.config.debug.step_delay_s:
            self.clock.wait(self.stop_flag, self.config.debug.step_delay_s)

    # ---- serving (the local API's backend) ---------------------------------------------------------------
    def emit_window(self) -> dict[str, Any] | None:
        return self.serving.emit_window()

    def predict(self, body: bytes) -> tuple[int, bytes]:
        """Run one prediction request (JSON body); returns HTTP status and JSON body."""
        return self.serving.predict(body)

    def feedback(self, body: bytes) -> tuple[int, bytes]:
        """The true label(s) for a prediction id: the source of the accuracy telemetry."""
        return self.serving.feedback(body)

    def metric_totals(self) -> tuple[Totals, int]:
        """Cumulative serving counters and telemetry dropped by a full outbox (for ``GET /metrics``)."""
        return self.window.snapshot_totals(), self.telemetry.outbox.dropped

    def status(self) -> dict[str, Any]:
        rec = self.record
        serving = rec.serving()
        return {"device_id": self.config.device_id, "state": rec.state.value,
                "serving": serving.ident() if serving else None,
                "previous": rec.previous.ident() if rec.previous else None,
                "pending": rec.pending.target() if rec.pending else None,
                "last_error": self.updates.storage_error or rec.last_error,
                "worker": self.supervisor.status(), "outbox": len(self.telemetry.outbox),
                "telemetry": {"committed_seq": self.telemetry.committed_seq, "seq": self.telemetry.outbox.seq,
                              "resent": self.telemetry.resent, "end_to_end": self.telemetry.end_to_end},
                "runtimes": self.runtimes}

