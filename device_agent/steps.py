"""The update machine's steps: one handler per state, each one idempotent step returning an :class:`Outcome`.

A handler reads the persisted record it is given, acts on the device (network, files, workers) and says
what happened: the :class:`~device_agent.states.Event` (the next state is a table lookup), the typed
:class:`~device_agent.store.Change` to the record, the telemetry events to emit once that record is on
disk, and optionally when to check in next (a backoff). It never persists anything itself: the driver
(:class:`device_agent.machine.Agent`) does, before the next step runs.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Root

from bundles.verify import MANIFEST
from device_agent import AGENT_VERSION
from device_agent.clock import Clock, iso
from device_agent.config import AgentConfig
from device_agent.errors import (
    AgentError,
    InstallFailed,
    ServerError,
    StorageError,
    TransportError,
    UpdateRefused,
    WorkerError,
)
from device_agent.fetcher import cached, download_target, target_url
from device_agent.guards import LoopVerdict, Space, clock_verdict, raise_floor, retry_delay, space_verdict
from device_agent.inbox import Inbox, Note
from device_agent.server import CheckinAnswer, ServerClient
from device_agent.states import Event, State
from device_agent.store import KEEP, Attempts, BundleRef, Change, Pending, StateRecord, Store, slot_name
from device_agent.supervisor import WorkerHandle, WorkerSupervisor
from device_agent.telemetry import Telemetry, WindowStats
from device_agent.transport import Deadline, Transport
from device_agent.update import (
    ImageRepository,
    accept_assignment,
    check_assignment,
    choose_variant,
    target_file,
    translated,
)

log = logging.getLogger("edgepack-agent")

Emit = tuple[str, dict[str, Any] | None, dict[str, Any]]
"""A telemetry event ``(name, target, detail)``."""


@dataclass
class Outcome:
    event: Event
    change: Change = field(default_factory=Change)
    events: list[Emit] = field(default_factory=list)
    """Telemetry events to emit once the new record is persisted."""
    retry_in: float | None = None
    """Seconds until the next check-in (a backoff); None: the usual schedule."""


class _Superseded(Exception):
    """A check-in during a download brought an assignment of another bundle: stop this attempt."""


def platform_name() -> str:
    import platform

    return f"{platform.system().lower()}-{platform.machine()}"


class UpdateSteps:
    """The handlers of :data:`device_agent.states.TRANSITIONS`'s states, and the check-in schedule."""

    def __init__(self, config: AgentConfig, *, clock: Clock, store: Store, image: ImageRepository,
                 server: ServerClient, transport: Transport, credential: str | None, director_root: Root,
                 runtimes: dict[str, str], supervisor: WorkerSupervisor, inbox: Inbox, stop_flag: threading.Event,
                 window: WindowStats, poll_interval_s: float, telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.image = image
        self.server = server
        self.transport = transport
        self.credential = credential
        self.director_root = director_root
        self.runtimes = runtimes
        self.supervisor = supervisor
        self.inbox = inbox
        self.stop_flag = stop_flag
        self.window = window
        self.poll_interval_s = poll_interval_s
        self.telemetry = telemetry
        """Its outbox progress goes into each check-in; the answer's committed mark comes back to it."""
        self.next_checkin = 0.0
        """Monotonic time of the next check-in (0: at once)."""
        self.failures = 0
        """Consecutive failed check-ins (their backoff)."""
        self.heartbeat = clock.monotonic()
        """Last time the acting thread showed progress (systemd's watchdog reads it)."""
        self.storage_error: dict[str, Any] | None = None
        """Set by the driver while the state file cannot be written; reported at check-in instead."""
        self.timings: dict[str, float] = {}
        self._standby: WorkerHandle | None = None
        self._activation_t0: float | None = None
        self._verified_slot: str | None = None
        self.handlers = {State.IDLE: self._idle, State.DOWNLOADING: self._downloading,
                         State.VERIFYING: self._verifying, State.SELFTEST: self._selftest,
                         State.ACTIVATING: self._activating, State.TRIAL: self._trial,
                         State.COMMITTING: self._committing, State.ROLLING_BACK: self._rolling_back}

    def run(self, rec: StateRecord) -> Outcome | None:
        """The step of ``rec.state``; None when it was interrupted (stop) and nothing changed."""
        self.heartbeat = self.clock.monotonic()
        return self.handlers[rec.state](rec)

    def ready(self, rec: StateRecord) -> bool:
        """True when the step of ``rec.state`` would act at once instead of waiting."""
        now = self.clock.monotonic()
        if rec.state is State.IDLE:
            return self.next_checkin <= now or self.inbox.has("notify")
        if rec.state is State.TRIAL:
            p = rec.pending
            if p is None or p.trial_started_at is None:
                return True
            end = datetime.fromisoformat(p.trial_started_at) + timedelta(seconds=self.config.trial.period_s)
            return self.clock.now() >= end or self.inbox.has("crash")
        return True

    # ---- waiting -----------------------------------------------------------------------------------------
    def backoff(self) -> float:
        lim = self.config.limits
        delay: float = min(lim.backoff_max_s, lim.backoff_initial_s * 2.0 ** max(0, self.failures - 1))
        return delay * random.uniform(0.5, 1)

    def _pause(self) -> None:
        if self.config.debug.step_delay_s:
            self.clock.wait(self.stop_flag, self.config.debug.step_delay_s)

    def wait(self, seconds: float) -> Note | None:
        """The next note within ``seconds``, beating the heartbeat at least every second meanwhile (systemd's
        watchdog must see a waiting agent as alive, and a stuck one as stuck)."""
        deadline = self.clock.monotonic() + seconds
        while True:
            self.heartbeat = self.clock.monotonic()
            left = deadline - self.heartbeat
            if left <= 0:
                return None
            note = self.inbox.wait(min(left, 1.0))
            if note is not None:
                self.heartbeat = self.clock.monotonic()
                return note

    # ---- IDLE: check in ----------------------------------------------------------------------------------
    def _idle(self, rec: StateRecord) -> Outcome | None:
        self.inbox.drain("crash")  # the supervisor restarts a crashed worker; in IDLE a crash decides nothing
        wait = self.next_checkin - self.clock.monotonic()
        while wait > 0:
            note = self.wait(wait)
            if note is None:
                break
            if note[0] == "stop":
                return None
            if note[0] == "notify":
                log.info("server asked for a check-in")
                break
            wait = self.next_checkin - self.clock.monotonic()
        outcome = self._check_in(rec)
        self.next_checkin = self.clock.monotonic() + self.poll_interval_s
        return outcome

    def checkin_body(self, rec: StateRecord) -> dict[str, Any]:
        active = rec.active
        body: dict[str, Any] = {"agent_version": AGENT_VERSION, "platform": platform_name(),
                                "runtimes": {k: v.split(" ")[-1] for k, v in self.runtimes.items()},
                                "state": rec.state.value, "active": active.ident() if active else None,
                                "last_error": self.storage_error or rec.last_error}
        if self.telemetry is not None:
            body.update(self.telemetry.progress())
        return body

    def _send_checkin(self, rec: StateRecord) -> CheckinAnswer:
        """One check-in; a disk error on the way (the client may persist a sequence number) is a StorageError."""
        assert self.credential is not None
        try:
            answer = self.server.checkin(self.config.device_id, self.credential, self.checkin_body(rec))
            if self.telemetry is not None and answer.committed_seq is not None:
                self.telemetry.committed(answer.committed_seq)  # the server has these: off the disk
            elif self.telemetry is not None:
                self.telemetry.no_mark()
            return answer
        except OSError as exc:
            if not StorageError.matches(exc):
                raise
            raise StorageError.from_os(exc, "check-in") from exc

    def _check_in(self, rec: StateRecord) -> Outcome:
        assert self.credential is not None
        try:
            answer = self._send_checkin(rec)
        except (TransportError, ServerError, StorageError) as exc:
            self.failures += 1
            log.warning("check-in failed (%s); retrying in a while", exc)
            return Outcome(Event.RETRY, retry_in=self.backoff())
        if answer.poll_interval_s:
            self.poll_interval_s = answer.poll_interval_s
        floor = self._server_time_floor(rec, answer)
        if answer.assignment is None:
            self.failures = 0
            outcome = Outcome(Event.NO_CHANGE)
        else:
            outcome = self._consider(rec, answer.assignment)
        if floor != rec.clock_floor and outcome.change.clock_floor is KEEP:
            outcome.change = replace(outcome.change, clock_floor=floor)
        return outcome

    def _server_time_floor(self, rec: StateRecord, answer: CheckinAnswer) -> str | None:
        """``server_time`` raises the clock floor only over TLS (an authenticated answer): over plain HTTP anyone
        on the path could push the floor into the future and lock the device out of updates."""
        if not answer.server_time or not self.config.server.url.startswith("https://"):
            return rec.clock_floor
        try:
            seen = datetime.fromisoformat(answer.server_time)
        except ValueError:
            return rec.clock_floor
        return raise_floor(rec.clock_floor, seen) if seen.tzinfo is not None else rec.clock_floor

    def _refuse(self, rec: StateRecord, exc: AgentError, digest: str, event: str, target: dict[str, Any] | None,
                assignment_version: int, phase: str) -> Outcome:
        log.error("update refused (%s): %s", exc.code, exc.message)
        bundle = [target["name"], target["version"]] if target else None
        detail = {**exc.as_detail(), "phase": phase}
        return Outcome(Event.NO_CHANGE if rec.state is State.IDLE else Event.FAILED,
                       Change(refused={"digest": digest, "bundle": bundle, "assignment_version": assignment_version},
                              pending=None, last_error=detail),
                       [(event, target, detail)])

    def _consider(self, rec: StateRecord, data: bytes) -> Outcome:
        digest = hashlib.sha256(data).hexdigest()
        refused = rec.refused or {}
        if refused.get("digest") == digest:
            return Outcome(Event.NO_CHANGE)
        now = self.clock.now()
        regression = clock_verdict(now, rec.clock_floor, tolerance_s=self.config.limits.clock_tolerance_s)
        if regression is not None:
            detail = {**regression.detail(), "phase": "assignment"}
            log.error("%s", detail["message"])
            already = (rec.last_error or {}).get("error") == "clock_regression"
            return Outcome(Event.NO_CHANGE, Change(last_error=detail),
                           [] if already else [("update_refused", None, detail)])
        try:
            a = check_assignment(self.director_root, data, device_id=self.config.device_id,
                                 hardware_id=self.config.hardware_id, now=now, last_version=rec.assignment_version)
        except AgentError as exc:
            return self._refuse(rec, exc, digest, "update_refused", None, rec.assignment_version, "assignment")
        floor = self._issued_floor(rec, a.info.get("issued_at"))
        cleared = (rec.last_error or {}).get("error") == "clock_regression"  # the clock was set right since
        bundle = a.bundle
        active = rec.active
        if bundle is None or (active and (active.name, active.version) == (bundle["name"], bundle["version"])):
            self.failures = 0
            return Outcome(Event.NO_CHANGE, Change(assignment_version=a.version, clock_floor=floor,
                                                   **({"last_error": None} if cleared else {})))
        target = {"name": bundle["name"], "version": bundle["version"], "release_counter": bundle["release_counter"]}
        if refused.get("bundle") == [target["name"], target["version"]] and a.version <= int(
                refused.get("assignment_version", 0)):
            return Outcome(Event.NO_CHANGE, Change(clock_floor=floor))
        try:
            accepted = accept_assignment(a, self.image)
        except TransportError as exc:
            self.failures += 1
            log.warning("image repository unreachable (%s); retrying in a while", exc)
            return Outcome(Event.RETRY, Change(clock_floor=floor), retry_in=self.backoff())
        except StorageError as exc:  # the metadata could not be saved: the disk is full
            out = self._retry(rec, target, {**exc.as_detail(), **self._disk_figures(0), "phase": "metadata"},
                              report="disk_full", event=Event.RETRY)
            out.change = replace(out.change, clock_floor=floor)
            return out
        except AgentError as exc:
            return self._refuse(rec, exc, digest, "verification_failed", target, a.version, "verify")
        slot = slot_name(target["name"], target["version"], accepted.files)
        self.store.prune({r.slot for r in (rec.active, rec.previous) if r} | {slot})
        pending = Pending(target["name"], target["version"], int(target["release_counter"]), a.version, digest,
                          a.info.get("rollout_id"), slot, accepted.files)
        self.failures = 0
        size = sum(f.length for f in accepted.files.values())
        return Outcome(Event.ASSIGNMENT, Change(pending=pending, assignment_version=a.version, clock_floor=floor),
                       [("downloading", target, {"bytes": size, "files": len(accepted.files),
                                                  "reason": a.info.get("reason")})])

    @staticmethod
    def _issued_floor(rec: StateRecord, issued_at: Any) -> str | None:
        """The clock floor after accepting an assignment the director signed at ``issued_at``."""
        try:
            seen = datetime.fromisoformat(str(issued_at))
        except ValueError:
            return rec.clock_floor
        return raise_floor(rec.clock_floor, seen) if seen.tzinfo is not None else rec.clock_floor

    # ---- failed attempts: disk full, stalled downloads ------------------------------------------------------
    def _retry(self, rec: StateRecord, target: dict[str, Any], detail: dict[str, Any], *, report: str | None,
               event: Event) -> Outcome:
        """A transient failure of this bundle's download: count it (persisted, across restarts), back off
        exponentially, report ``install_failed`` with reason ``report`` once per bundle."""
        key = f"{target['name']}/{target['version']}"
        att = (rec.attempts if rec.attempts is not None and rec.attempts.bundle == key else Attempts(key)).failed()
        lim = self.config.limits
        delay = retry_delay(att.count, initial_s=lim.backoff_initial_s, max_s=lim.backoff_max_s)
        detail = {**detail, "attempts": att.count, "retry_in_s": round(delay, 1)}
        if report is not None:
            detail = {**detail, "error": report, "cause": detail.get("error")}
        events: list[Emit] = []
        if report is not None and report not in att.reported:
            att = att.report(report)
            events.append(("install_failed", target, detail))
        log.warning("%s: %s; attempt %d, next in %.1f s", key, detail.get("message"), att.count, delay)
        return Outcome(event, Change(pending=None, last_error=detail, attempts=att), events, retry_in=delay)

    def _disk_figures(self, needed: int) -> dict[str, Any]:
        free, total = self.store.disk()
        return {"needed_bytes": needed, "free_bytes": free, "total_bytes": total,
                "reserve_bytes": self.config.limits.disk_reserve_bytes}

    def disk_full(self, rec: StateRecord, exc: StorageError, phase: str) -> Outcome:
        """The disk refused a write during this update: delete its files (they are what fills the disk), keep
        serving, report ``disk_full``, retry after a backoff (the driver also calls this when the state file
        cannot be saved)."""
        p = rec.pending
        assert p is not None
        for d in (self.store.staging_dir(p.slot), self.store.slot_dir(p.slot)):
            shutil.rmtree(d, ignore_errors=True)
        needed = sum(f.length for f in p.files.values())
        figures = self._disk_figures(needed)
        detail = {**exc.as_detail(), **figures, "phase": phase,
                  "message": f"{exc.message}: the bundle needs {needed} bytes, {figures['free_bytes']} are free "
                             f"(after deleting its partial files); retrying with backoff until space returns"}
        return self._retry(rec, p.target(), detail, report="disk_full",
                           event=Event.RETRY if rec.state is State.DOWNLOADING else Event.FAILED)

    # ---- DOWNLOADING ---------------------------------------------------------------------------------------
    def _downloading(self, rec: StateRecord) -> Outcome:
        p = rec.pending
        assert p is not None
        threading.Thread(target=self._warm, args=(rec,), daemon=True).start()
        staging = self.store.staging_dir(p.slot)
        if self.store.slot_dir(p.slot).exists() and not staging.exists():
            return Outcome(Event.DOWNLOADED)  # moved into its slot before a restart: verification re-checks it
        lim = self.config.limits
        total = sum(f.length for f in p.files.values())  # until the manifest says which files this device needs
        deadline = Deadline(self.clock, lim.download_deadline_s, "bundle download")
        if self.next_checkin < self.clock.monotonic():  # after a restart: the next check-in is one interval away
            self.next_checkin = self.clock.monotonic() + self.poll_interval_s
        t0 = time.perf_counter()
        fetched = 0
        delay = self.config.debug.step_delay_s

        def on_chunk(n: int) -> None:
            if delay:
                self.clock.wait(self.stop_flag, delay)
            if self.stop_flag.is_set():
                raise TransportError("agent is stopping", code="stopping")
            self.heartbeat = self.clock.monotonic()
            if self.heartbeat >= self.next_checkin or self.inbox.take("notify") is not None:
                self._check_in_while_downloading(rec)

        # Per-variant download: the manifest first (hash-checked like every file), then only the files of the
        # variant this device will run plus the shared ones (bundles.verify.variant_files).
        order = [MANIFEST] if MANIFEST in p.files else []
        try:
            need: set[str] | None = None
            while order:
                rel = order.pop(0)
                info = p.files[rel]
                tf = target_file(p.name, p.version, rel, info)
                dest = staging / rel
                url = target_url(self.image.targets_url, tf, hash_prefix=self.image.consistent_snapshot)
                for attempt in range(1, lim.download_attempts + 1):
                    if cached(dest, tf):
                        break
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
                if need is None:  # the manifest just arrived: which variant, which files, do they fit
                    need = self._variant_files(p, staging)
                    total = sum(p.files[r].length for r in need)
                    if total > lim.max_bundle_bytes:
                        raise UpdateRefused("this device's files of the bundle are larger than "
                                            "limits.max_bundle_bytes", code="too_large",
                                            detail={"limit": lim.max_bundle_bytes, "bytes": total})
                    refusal = self._check_space(rec, total)
                    if refusal is not None:
                        return refusal
                    # the space check may have deleted partial files, the manifest with them: fetch it again
                    order = ([] if (staging / MANIFEST).is_file() else [MANIFEST]) + sorted(need - {MANIFEST})
        except _Superseded as sup:
            log.info("the server assigned something else during the download (%s); considering it", sup)
            return Outcome(Event.RETRY, Change(pending=None), retry_in=0.0)
        except StorageError as exc:
            return self.disk_full(rec, exc, "download")
        except TransportError as exc:
            if exc.code == "stopping":
                return Outcome(Event.RETRY, Change(pending=None), retry_in=0.0)
            have = self.store.bytes_in(staging)
            detail = {**exc.as_detail(), "phase": "download", "bytes_have": have, "bytes_total": total,
                      "deadline_s": lim.download_deadline_s}
            same = rec.attempts is not None and rec.attempts.bundle == f"{p.name}/{p.version}"
            att = rec.attempts.count if rec.attempts is not None and same else 0
            stalled = att + 1 >= lim.download_stalled_after
            if stalled:
                detail["message"] = (f"{att + 1} download attempts failed, {have} of {total} bytes so far (last: "
                                     f"{exc.code}: {exc.message}); partial files are kept and resumed")
            return self._retry(rec, p.target(), detail, report="download_stalled" if stalled else None,
                               event=Event.RETRY)
        except UpdateRefused as exc:
            return self._fail_update(rec, exc, "verification_failed", "download")
        except InstallFailed as exc:
            return self._fail_update(rec, exc, "install_failed", "download")
        self.timings["download_s"] = time.perf_counter() - t0
        detail = {"bytes": fetched, "seconds": round(self.timings["download_s"], 3)}
        return Outcome(Event.DOWNLOADED, Change(attempts=None), [("downloaded", p.target(), detail)])

    def _check_space(self, rec: StateRecord, total: int) -> Outcome | None:
        """Refuse to start a download that cannot fit: for now (retry later) or for good (refuse the update)."""
        p = rec.pending
        assert p is not None
        staging = self.store.staging_dir(p.slot)
        kept = sum(self.store.bytes_in(self.store.slot_dir(r.slot)) for r in (rec.active, rec.previous) if r)
        for _ in range(2):
            have = self.store.bytes_in(staging)
            free, fs_total = self.store.disk()
            verdict = space_verdict(needed=max(0, total - have), free=free, total=fs_total, kept=kept + have,
                                    reserve=self.config.limits.disk_reserve_bytes)
            if verdict is Space.FITS:
                return None
            if not have:
                break
            shutil.rmtree(staging, ignore_errors=True)  # partial files of an earlier attempt: free them, look again
        figures = self._disk_figures(total)
        if verdict is Space.NEVER:
            exc = InstallFailed(
                f"{p.name} {p.version} needs {total} bytes, more than the state directory's file system "
                f"({fs_total} bytes) can hold next to the bundles kept ({kept} bytes) and the reserve "
                f"({self.config.limits.disk_reserve_bytes} bytes); it will not be retried: give the device more "
                "space and assign it again", code="disk_full", detail={**figures, "permanent": True})
            return self._fail_update(rec, exc, "install_failed", "download")
        exc2 = StorageError(f"not enough free space in {self.store.dir}", code="disk_full")
        detail = {**exc2.as_detail(), **figures, "phase": "download",
                  "message": f"not enough free space in {self.store.dir}: the bundle needs {total} bytes plus a "
                             f"reserve of {figures['reserve_bytes']}, {figures['free_bytes']} are free; retrying "
                             "with backoff until space returns"}
        return self._retry(rec, p.target(), detail, report="disk_full", event=Event.RETRY)

    def _check_in_while_downloading(self, rec: StateRecord) -> None:
        """A download must not starve check-ins: the server still hears from the device (state, last error),
        and a different assignment ends this attempt so the agent considers it at once."""
        p = rec.pending
        assert p is not None and self.credential is not None
        self.next_checkin = self.clock.monotonic() + self.poll_interval_s
        try:
            answer = self._send_checkin(rec)
        except (TransportError, ServerError, StorageError) as exc:
            log.warning("check-in during the download failed (%s)", exc)
            return
        if answer.poll_interval_s:
            self.poll_interval_s = answer.poll_interval_s
        if answer.assignment is None or hashlib.sha256(answer.assignment).hexdigest() == p.assignment_digest:
            return
        try:
            a = check_assignment(self.director_root, answer.assignment, device_id=self.config.device_id,
                                 hardware_id=self.config.hardware_id, now=self.clock.now(),
                                 last_version=rec.assignment_version)
        except AgentError as exc:
            log.warning("check-in during the download: assignment not accepted (%s); downloading on", exc)
            return
        if a.bundle is None or (a.bundle.get("name"), a.bundle.get("version")) != (p.name, p.version):
            raise _Superseded(f"now {a.bundle and a.bundle.get('version')}, was {p.version}")

    def _variant_files(self, p: Pending, directory: Path) -> set[str]:
        """Read the (hash-verified) manifest, choose this device's variant, return the files it needs."""
        from bundles.verify import variant_files, verified_manifest

        with translated(f"{p.name} {p.version}"):
            manifest = verified_manifest(directory, self.image.targets, p.name, p.version)
            variant, _ = choose_variant(manifest, self.config.hardware_id, self.runtimes)
            return variant_files(manifest, p.files, variant.id)

    def _warm(self, rec: StateRecord) -> None:
        active = rec.active
        hint = active.runtime if active is not None else next(iter(self.runtimes), None)
        try:
            self.supervisor.warm(hint)
        except WorkerError as exc:
            log.warning("could not pre-start a worker: %s", exc)

    def _files_gone(self, rec: StateRecord, phase: str) -> Outcome:
        """The update's downloaded files are not there (deleted to free a full disk before the record said so):
        not the bundle's fault, so it is downloaded again after a backoff instead of being refused."""
        p = rec.pending
        assert p is not None
        detail = {"error": "files_missing", "phase": phase,
                  "message": f"the downloaded files of {p.name} {p.version} are gone; downloading them again"}
        return self._retry(rec, p.target(), detail, report=None, event=Event.FAILED)

    def _fail_update(self, rec: StateRecord, exc: AgentError, event: str, phase: str) -> Outcome:
        """Refuse the pending update: delete its files, remember the assignment, report ``event``."""
        p = rec.pending
        assert p is not None
        for d in (self.store.staging_dir(p.slot), self.store.slot_dir(p.slot)):
            shutil.rmtree(d, ignore_errors=True)
        return self._refuse(rec, exc, p.assignment_digest, event, p.target(), p.assignment_version, phase)

    # ---- VERIFYING -------------------------------------------------------------------------------------------
    def _verifying(self, rec: StateRecord) -> Outcome:
        from bundles.verify import variant_files, verified_manifest, verify_directory

        p = rec.pending
        assert p is not None
        t0 = self._activation_t0 = time.perf_counter()
        staging, slot_dir = self.store.staging_dir(p.slot), self.store.slot_dir(p.slot)
        src = staging if staging.exists() else slot_dir
        if not src.exists():
            return self._files_gone(rec, "verify")
        for leftover in src.rglob("*.part"):
            leftover.unlink()
        try:
            with translated(f"{p.name} {p.version}"):
                manifest = verified_manifest(src, self.image.targets, p.name, p.version)
                variant, why = choose_variant(manifest, self.config.hardware_id, self.runtimes)
                vb = verify_directory(src, self.image.targets, p.name, p.version, trust=self.image.trust,
                                      hardware_id=self.config.hardware_id, agent_version=AGENT_VERSION,
                                      variant=variant.id)
            # full verification of the whole bundle, whatever this device downloaded of it
            signed = {rel: (t.length, t.hashes.get("sha256")) for rel, t in vb.files.items()}
            if signed != {rel: (f.length, f.sha256) for rel, f in p.files.items()}:
                raise UpdateRefused("the verified files differ from the assignment's (mix-and-match?)",
                                    code="AssignmentError")
            held = {rel: p.files[rel] for rel in variant_files(vb.manifest, p.files, variant.id)}
        except AgentError as exc:
            return self._fail_update(rec, exc, "verification_failed" if isinstance(exc, UpdateRefused)
                                     else "install_failed", "verify")
        if src is staging:
            shutil.rmtree(slot_dir, ignore_errors=True)
            staging.rename(slot_dir)
        self._verified_slot = p.slot
        log.info("variant for %s %s: %s", p.name, p.version, why)
        self.timings["verify_s"] = time.perf_counter() - t0
        # from here on the bundle is the files this device holds: the worker re-hashes exactly these
        return Outcome(Event.VERIFIED, Change(pending=replace(p, variant=variant.id, runtime=variant.runtime,
                                                              files=held)),
                       [("verified", p.target(), {"variant": variant.id, "runtime": variant.runtime, "why": why})])

    # ---- SELFTEST --------------------------------------------------------------------------------------------
    def _load_and_test(self, ref: BundleRef) -> WorkerHandle:
        t0 = time.perf_counter()
        # Files this process verified moments ago are not hashed twice; after a restart they are.
        proc, load = self.supervisor.prepare(ref, rehash=self._verified_slot != ref.slot)
        self._pause()
        result = self.supervisor.selftest(proc)
        self.timings.update(load_hash_ms=load["hash_ms"], session_ms=load["session_ms"],
                            golden_ms=result["golden_ms"], selftest_s=time.perf_counter() - t0)
        return proc

    def _selftest(self, rec: StateRecord) -> Outcome:
        p = rec.pending
        assert p is not None
        if not self.store.slot_dir(p.slot).exists():
            return self._files_gone(rec, "selftest")
        try:
            self._standby = self._load_and_test(p.to_ref())
        except WorkerError as exc:
            events: list[Emit] = []
            if exc.code == "crash":
                self.window.crash()
                events.append(("crash", p.target(), {**exc.as_detail(), "phase": "selftest"}))
            out = self._fail_update(rec, exc, "selftest_failed", "selftest")
            out.events[:0] = events
            return out
        return Outcome(Event.SELFTEST_PASSED, events=[("selftest_passed", p.target(), {
            k: round(v, 3) for k, v in self.timings.items() if k in ("session_ms", "golden_ms", "load_hash_ms")})])

    # ---- ACTIVATING --------------------------------------------------------------------------------------------
    def _activating(self, rec: StateRecord) -> Outcome:
        p = rec.pending
        assert p is not None
        ref = p.to_ref()
        proc, self._standby = self._standby, None
        self.inbox.drain("crash")  # crashes of the worker being replaced are not the new bundle's
        try:
            if proc is None or not proc.alive():
                proc = self._load_and_test(ref)  # after a restart: the self-test runs again
            self.supervisor.promote(proc)
        except WorkerError as exc:
            # Roll back to what served before this activation (the record still names it ``active``).
            return Outcome(Event.FAILED, Change(previous=rec.active,
                                                last_error={**exc.as_detail(), "phase": "activation"}))
        old = rec.active
        now = iso(self.clock.now())
        if self._activation_t0 is not None:  # verification start -> new bundle serving (this process only)
            self.timings["activation_s"] = time.perf_counter() - self._activation_t0
            self._activation_t0 = None
        timings = {k: round(v, 4) for k, v in self.timings.items()}
        trial = replace(p, trial_started_at=now, boots={k: v for k, v in p.boots.items() if k != State.TRIAL.value})
        return Outcome(Event.ACTIVATED, Change(active=ref, previous=old, rollout_id=p.rollout_id, pending=trial),
                       [("activated", p.target(), {"from": old.ident() if old else None, "variant": ref.variant,
                                                   "trial_s": self.config.trial.period_s, "timings": timings})])

    # ---- TRIAL -------------------------------------------------------------------------------------------------
    def _trial(self, rec: StateRecord) -> Outcome | None:
        p = rec.pending
        assert p is not None and p.trial_started_at is not None
        cfg = self.config.trial
        end = datetime.fromisoformat(p.trial_started_at) + timedelta(seconds=cfg.period_s)
        crashes = 0
        next_health = self.clock.monotonic() + cfg.health_interval_s
        while True:
            self.heartbeat = self.clock.monotonic()
            left = (end - self.clock.now()).total_seconds()
            if left <= 0:
                return Outcome(Event.TRIAL_PASSED)
            note = self.wait(min(left, max(0.05, next_health - self.clock.monotonic())))
            if note is not None and note[0] == "stop":
                return None
            if note is not None and note[0] == "crash":
                crashes += 1
                if crashes > cfg.max_crashes:
                    return self._trial_failed("crash", {**note[1], "crashes": crashes})
            if self.clock.monotonic() >= next_health:
                next_health = self.clock.monotonic() + cfg.health_interval_s
                if not self.supervisor.ping(timeout=max(1.0, cfg.health_interval_s)):
                    return self._trial_failed("health", {"message": "the worker failed its health check"})

    def _trial_failed(self, reason: str, detail: dict[str, Any]) -> Outcome:
        log.error("trial of the new bundle failed (%s): %s", reason, detail)
        return Outcome(Event.TRIAL_FAILED, Change(last_error={"error": f"trial_{reason}", "phase": "trial", **detail}))

    # ---- boot loops --------------------------------------------------------------------------------------------
    def abandon(self, rec: StateRecord, verdict: LoopVerdict) -> Outcome:
        """Give up an update whose step kept killing the agent: the step is not run again.

        Before activation the update is refused (its files deleted, ``install_failed``); from activation on
        the agent rolls back to the bundle that served before (``rolled_back``); a looping commit or rollback
        finishes its record change without its side effects (the next boot deletes the leftovers)."""
        p = rec.pending
        assert p is not None
        state = verdict.state
        message = (f"the agent restarted {verdict.boots} times in state {state.value} of this update "
                   f"(limit {verdict.limit}); the update is abandoned and the last good model kept")
        detail = {"error": verdict.reason, "message": message, "phase": state.value, "state": state.value,
                  "boots": verdict.boots, "limit": verdict.limit}
        log.error("%s", message)
        if state in (State.DOWNLOADING, State.VERIFYING, State.SELFTEST):
            exc = InstallFailed(message, code=verdict.reason,
                                detail={"state": state.value, "boots": verdict.boots, "limit": verdict.limit})
            return self._fail_update(rec, exc, "install_failed", state.value)
        if state is State.ACTIVATING:
            return Outcome(Event.FAILED, Change(previous=rec.active, last_error=detail))
        if state is State.TRIAL:
            return self._trial_failed("restarts", {"boots": verdict.boots, "limit": verdict.limit})
        if state is State.COMMITTING:
            target = p.target()
            return Outcome(Event.COMMITTED, Change(previous=None, pending=None, last_error=None),
                           [("committed", target, {"variant": rec.active.variant if rec.active else None})])
        return self._rolling_back(rec, act=False, reason=detail)

    # ---- COMMITTING / ROLLING_BACK -----------------------------------------------------------------------------
    def _committing(self, rec: StateRecord) -> Outcome:
        assert rec.active is not None
        self.store.prune({rec.active.slot})
        target = rec.pending.target() if rec.pending else rec.active.ident()
        return Outcome(Event.COMMITTED, Change(previous=None, pending=None, last_error=None),
                       [("committed", target, {"variant": rec.active.variant})])

    def _rolling_back(self, rec: StateRecord, *, act: bool = True, reason: dict[str, Any] | None = None) -> Outcome:
        p = rec.pending
        failed = p.to_ref() if p is not None and p.variant else rec.active
        back = rec.previous
        if act:
            try:
                self.supervisor.serve(back)
            except WorkerError as exc:
                log.error("the previous bundle does not load either (%s); serving nothing", exc)
                self.supervisor.serve(None)
                back = None
            self.store.prune({back.slot} if back else set())
        reason = reason or rec.last_error or {"error": "rollback"}
        target = p.target() if p is not None else (failed.ident() if failed else None)
        refused = {"digest": p.assignment_digest if p else "", "assignment_version": p.assignment_version if p else 0,
                   "bundle": [p.name, p.version] if p else None}
        return Outcome(Event.ROLLED_BACK, Change(active=back, previous=None, pending=None, refused=refused,
                                                 rollout_id=rec.rollout_id if back is not None else None),
                       [("rolled_back", target, {**reason, "to": back.ident() if back else None})])
