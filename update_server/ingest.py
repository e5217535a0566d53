"""MQTT: the telemetry ingester (shared subscription, manual acks after commit) and the notifier.

Threads: a reader (``mqtt_wire.WireClient``, bulk parsing; paho is too slow here) validates each message
and puts it on a bounded queue (a full queue blocks it, which stops reading and lets the broker hold the
backlog); one writer thread drains the queue in batches (``ingest_batch`` messages or ``ingest_flush_s``
seconds), writes a batch in one transaction, and only then acknowledges (PUBACK) the batch's messages.
So a crash or a database outage loses nothing:
unacknowledged messages are redelivered by the broker (same ``message_id``, de-duplicated).

Poison never stops ingestion: a message that fails validation (malformed, oversized, a count past the
schema's bounds, more requests than its window allows at ``max_request_rate``) is counted by reason,
acknowledged and dropped in the reader; a message that passes validation but fails the write is found by
bisecting its batch (:meth:`Ingester._store`), counted as ``write_failed`` and dropped, while the rest of the
batch is written. Only a database outage (``db.is_unavailable``) retries the whole batch unacknowledged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from update_server.broker.endpoint import Endpoint
from update_server.context import ServerContext
from update_server.db import is_unavailable
from update_server.mqtt_wire import Message, MqttError, WireClient
from update_server.services.telemetry import MembershipCache, Telemetry, Unstorable, parse_one, write_batch

log = logging.getLogger(__name__)


class WorkerSlot:
    """Which of the ``workers`` ingest client ids this process uses: the first slot whose lock file
    (``<data_dir>/ingest-slots/slot-<i>.lock``) it can lock (``flock``, released when the process dies).

    A persistent session is only useful if the same client id comes back after a restart. A process id in
    the client id (as before) left every restart's sessions behind, each taking its share of the telemetry
    for a day with nobody to read it; slots give the workers of a restarted server the same ids again."""

    def __init__(self, index: int, fd: int) -> None:
        self.index, self._fd = index, fd

    @classmethod
    def claim(cls, directory: Path, count: int) -> WorkerSlot | None:
        import fcntl
        import os

        directory.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            fd = os.open(directory / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            return cls(i, fd)
        return None

    def release(self) -> None:
        import os

        os.close(self._fd)


@dataclass(frozen=True)
class IngestHealth:
    """What /readyz reports about the ingester (see :meth:`Ingester.health`)."""

    connected: bool
    reader_alive: bool
    writer_alive: bool
    queued: int
    last_commit_age_s: float | None
    """Seconds since the last batch was committed; None before the first."""
    oldest_batch_s: float | None
    """How long the writer has held the batch it is writing; None when idle."""
    problem: str | None
    """Why the ingester is not healthy, for an operator; None when it is."""

    def as_dict(self) -> dict[str, object]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class Ingester:
    """Consumes telemetry from the broker into the database. ``start()``/``stop()`` from the lifespan."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.broker = Endpoint.for_server(s, account="ingest")
        self.host, self.port = self.broker.host, self.broker.port
        self.v5 = s.mqtt_protocol != "3.1.1"
        plain = f"{s.mqtt_topic_prefix}/+/telemetry/#"
        self.topic = f"$share/{s.mqtt_share_group}/{plain}" if self.v5 else plain
        self.queue: queue.Queue[tuple[Message, Telemetry | Unstorable | None]] = queue.Queue(maxsize=s.ingest_queue)
        self.membership = MembershipCache()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run_writer, name="ingest-writer", daemon=True)
        self._reader = threading.Thread(target=self._run_reader, name="ingest-reader", daemon=True)
        self._client: WireClient | None = None
        self.connected = threading.Event()
        self._last_commit: float | None = None
        self._batch_since: float | None = None
        self._last_error = ""
        self._slot: WorkerSlot | None = None
        self._ephemeral = False

    # ---- health --------------------------------------------------------------------------------------
    def health(self) -> IngestHealth:
        """Connected to the broker, both threads alive, and the writer not stuck on one batch for longer
        than ``ingest_stuck_s`` (a database that refuses every write, a writer blocked)."""
        now = time.monotonic()
        since = self._batch_since
        held = None if since is None else now - since
        age = None if self._last_commit is None else now - self._last_commit
        problem = None
        if not self._writer.is_alive():
            problem = "the ingest writer thread is not running"
        elif not self._reader.is_alive():
            problem = "the ingest reader thread is not running"
        elif not self.connected.is_set():
            problem = (f"the ingester is not connected to the broker at {self.host}:{self.port}"
                       + (f" ({self._last_error})" if self._last_error else ""))
        elif held is not None and held > self.ctx.settings.ingest_stuck_s:
            problem = (f"a telemetry batch has waited {held:.0f} s to be written (ingest_stuck_s="
                       f"{self.ctx.settings.ingest_stuck_s:g})" + (f": {self._last_error}" if self._last_error else ""))
        return IngestHealth(self.connected.is_set(), self._reader.is_alive(), self._writer.is_alive(),
                            self.queue.qsize(), age, held, problem)

    # ---- network side --------------------------------------------------------------------------------
    def _client_id(self) -> str:
        s = self.ctx.settings
        if s.workers <= 1:
            return s.ingest_client_ids()[0]
        self._slot = WorkerSlot.claim(s.data_dir / "ingest-slots", s.workers)
        if self._slot is None:  # more processes than workers (should not happen): an id for this process only
            self._ephemeral = True
            log.warning("no free ingest slot of %d; this process's broker session ends when it stops", s.workers)
            return s.effective_mqtt_client_id
        return s.ingest_client_ids()[self._slot.index]

    def start(self) -> None:
        b = self.broker
        self._client = WireClient(b.host, b.port, self._client_id(),
                                  clean_start=False, session_expiry=self.ctx.settings.mqtt_session_expiry_s,
                                  protocol=5 if self.v5 else 4, username=b.username, password=b.password,
                                  ssl_context=b.ssl_context())
        self._reader.start()
        self._writer.start()

    def stop(self, *, release: bool = False) -> None:
        """Stop both threads. The broker keeps the session (and queues telemetry for it) for
        ``mqtt_session_expiry_s``, so a restart resumes where this one stopped; ``release=True`` ends the
        session instead (a start that failed, a replica taken out of service): otherwise it would keep
        taking its share of the group's telemetry with nobody to read it."""
        self._stop.set()
        self._writer.join(10)
        self._reader.join(10)
        if self._client is not None:
            self._client.close()
            if release or self._ephemeral:
                try:
                    self._client.release_session()
                    log.info("ended the broker session %s", self._client.client_id)
                except (MqttError, OSError) as exc:
                    log.warning("could not end the broker session %s (%s): it takes a share of the telemetry "
                                "until it expires (mqtt_session_expiry_s); see docs/runbook.md",
                                self._client.client_id, exc)
        if self._slot is not None:
            self._slot.release()

    def _run_reader(self) -> None:
        client = self._client
        assert client is not None
        delay = 0.2
        while not self._stop.is_set():
            try:
                client.connect()
                client.subscribe(self.topic, qos=1)
                while not self._stop.is_set():
                    client.read(self._on_message)
                    if client.subscribed.is_set() and not self.connected.is_set():
                        self.connected.set()
                        self._last_error = ""
                        delay = 0.2
                        log.info("ingesting telemetry from %s:%d (%s)", self.host, self.port, self.topic)
            except Exception as exc:  # the reader reconnects whatever broke; it never dies
                self.connected.clear()
                self._last_error = str(exc)
                self.ctx.counters.add("mqtt_reconnects")
                if isinstance(exc, (MqttError, OSError)):
                    log.warning("MQTT ingest connection: %s; reconnecting in %.1fs", exc, delay)
                else:
                    log.exception("MQTT ingest reader failed; reconnecting in %.1fs", delay)
                client.close()
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _on_message(self, msg: Message) -> None:
        # Validate here, in the reader thread: it overlaps with the writer waiting on the database.
        s = self.ctx.settings
        try:
            parsed = parse_one(msg.topic, msg.payload, prefix=s.mqtt_topic_prefix, max_bytes=s.max_message_bytes,
                               counters=self.ctx.counters, max_rate=s.max_request_rate)
        except Exception:  # a validator bug must cost one message, not the connection
            log.exception("telemetry on %s could not be validated; dropped", msg.topic)
            self.ctx.counters.add("telemetry_dropped_invalid")
            parsed = None
        item = (msg, parsed)
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self.ctx.counters.add("telemetry_queue_full_waits")

    # ---- writer side ---------------------------------------------------------------------------------
    def _drain(self) -> list[tuple[Message, Telemetry | Unstorable | None]]:
        s = self.ctx.settings
        try:
            batch = [self.queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + s.ingest_flush_s
        while len(batch) < s.ingest_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=max(remaining, 0)) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _commit(self, messages: list[Telemetry], skipped: list[Unstorable] | None = None) -> int:
        with self.ctx.sessions() as session, session.begin():
            return write_batch(session, messages, self.membership, self.ctx.clock(), skipped or [])

    def _store(self, messages: list[Telemetry]) -> tuple[int, list[Telemetry]]:
        """Write ``messages``; returns (new, written). A write that fails for a reason other than the database
        being unavailable is retried on each half (bisection) until the messages that fail alone are found:
        those are dropped and counted (``telemetry_dropped_write_failed``), the rest are written. Raises
        only when the database is unavailable (the caller retries the whole batch, acknowledging nothing)."""
        try:
            return self._commit(messages), messages
        except Exception as exc:
            if is_unavailable(exc):
                raise
            if len(messages) == 1:
                self.ctx.counters.add("telemetry_dropped_write_failed")
                log.error("telemetry %s from %s could not be written and is dropped: %s", messages[0].message_id,
                          messages[0].device_id, exc)
                if messages[0].seq > 0:  # its seq is done: the device must not send it again forever
                    self._skip([Unstorable(messages[0].device_id, messages[0].seq)])
                return 0, []
            self._last_error = f"a batch write failed ({type(exc).__name__}); isolating the messages that fail"
            mid = len(messages) // 2
            new_a, ok_a = self._store(messages[:mid])
            new_b, ok_b = self._store(messages[mid:])
            return new_a + new_b, ok_a + ok_b

    def _skip(self, skipped: list[Unstorable]) -> None:
        """Record the seqs of rejected messages as done (the devices' marks move past them). Raises only when
        the database is unavailable; any other failure is logged: the device then sends them again later."""
        try:
            self._commit([], skipped)
        except Exception as exc:
            if is_unavailable(exc):
                raise
            log.exception("could not record the seqs of %d rejected messages as done", len(skipped))

    def _run_writer(self) -> None:
        while not self._stop.is_set():
            try:
                self._write_one_batch()
            except Exception:  # the writer must never die (it would stop ingestion for the whole fleet)
                log.exception("ingest writer step failed; carrying on")
                self._stop.wait(1.0)

    def _write_one_batch(self) -> None:
        batch = self._drain()
        if not batch:
            return
        self._batch_since = time.monotonic()
        messages = [parsed for _, parsed in batch if isinstance(parsed, Telemetry)]
        skipped = [parsed for _, parsed in batch if isinstance(parsed, Unstorable)]
        delay = 0.2
        while not self._stop.is_set():
            try:
                new, written = self._store(messages)
                if skipped:
                    self._skip(skipped)
                self.ctx.counters.add("telemetry_ingested", new)
                self.ctx.counters.add("telemetry_duplicates", len(written) - new)
                self.ctx.metrics.ingest_committed(written, self.ctx.clock())
                if len(written) < len(messages):
                    self.ctx.counters.add("telemetry_batch_errors")
                break
            except Exception as exc:  # only an unavailable database gets here: retry the whole batch
                self.ctx.counters.add("telemetry_db_retries")
                self._last_error = f"database unavailable: {exc}"[:300]
                log.warning("database unavailable while ingesting; retrying in %.1fs", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
        else:
            return  # stopping: leave the batch unacknowledged, the broker redelivers it
        self._last_commit, self._batch_since, self._last_error = time.monotonic(), None, ""
        try:
            if self._client is not None:
                self._client.ack(m for m, _ in batch)
        except MqttError:
            pass  # the connection broke: the broker redelivers these, de-duplication drops them


class Notifier:
    """Publishes check-in-now notices (QoS 1, not retained) to devices whose assignment changed."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.broker = Endpoint.for_server(ctx.settings, account="notify")
        self._client: object | None = None

    def start(self) -> None:
        client = self.broker.paho_client(f"{self.ctx.settings.effective_mqtt_client_id}-notify-{uuid.uuid4().hex[:6]}",
                                         v5=self.ctx.settings.mqtt_protocol != "3.1.1")
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(1000)
        client.reconnect_delay_set(0.2, 10)
        client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        client.loop_start()
        self._client = client

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()  # type: ignore[attr-defined]
            self._client.loop_stop()  # type: ignore[attr-defined]

    def __call__(self, devices: Iterable[str]) -> None:
        import json

        if self._client is None:
            return
        prefix = self.ctx.settings.mqtt_topic_prefix
        n = 0
        for device_id in devices:
            payload = json.dumps({"schema": "edgepack.notify.v1", "type": "checkin", "reason": "assignment_changed",
                                  "message_id": uuid.uuid4().hex})
            self._client.publish(f"{prefix}/{device_id}/notify", payload, qos=1)  # type: ignore[attr-defined]
            n += 1
        self.ctx.counters.add("notices_sent", n)
