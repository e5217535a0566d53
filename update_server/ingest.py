"""MQTT: the telemetry ingester (shared subscription, manual acks after commit) and the notifier.

Threads: a reader (``mqtt_wire.WireClient``, bulk parsing; paho is too slow here) validates each message
and puts it on a bounded queue (a full queue blocks it, which stops reading and lets the broker hold the
backlog); one writer thread drains the queue in batches (``ingest_batch`` messages or ``ingest_flush_s``
seconds), writes a batch in one transaction, and only then acknowledges (PUBACK) the batch's messages.
So a crash or a database outage loses nothing:
unacknowledged messages are redelivered by the broker (same ``message_id``, de-duplicated). A malformed
or oversized message is counted, acknowledged and dropped; it never stops the writer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable

from update_server.broker.endpoint import Endpoint
from update_server.context import ServerContext
from update_server.db import is_unavailable
from update_server.mqtt_wire import Message, MqttError, WireClient
from update_server.services.telemetry import MembershipCache, Telemetry, parse_one, write_batch

log = logging.getLogger(__name__)


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
        self.queue: queue.Queue[tuple[Message, Telemetry | None]] = queue.Queue(maxsize=s.ingest_queue)
        self.membership = MembershipCache()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run_writer, name="ingest-writer", daemon=True)
        self._reader = threading.Thread(target=self._run_reader, name="ingest-reader", daemon=True)
        self._client: WireClient | None = None
        self.connected = threading.Event()

    # ---- network side --------------------------------------------------------------------------------
    def start(self) -> None:
        b = self.broker
        self._client = WireClient(b.host, b.port, self.ctx.settings.effective_mqtt_client_id,
                                  clean_start=False, session_expiry=24 * 3600, protocol=5 if self.v5 else 4,
                                  username=b.username, password=b.password, ssl_context=b.ssl_context())
        self._reader.start()
        self._writer.start()

    def stop(self) -> None:
        self._stop.set()
        self._writer.join(10)
        self._reader.join(10)
        if self._client is not None:
            self._client.close()

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
                        delay = 0.2
                        log.info("ingesting telemetry from %s:%d (%s)", self.host, self.port, self.topic)
            except (MqttError, OSError) as exc:
                self.connected.clear()
                self.ctx.counters.add("mqtt_reconnects")
                log.warning("MQTT ingest connection: %s; reconnecting in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _on_message(self, msg: Message) -> None:
        # Validate here, in the reader thread: it overlaps with the writer waiting on the database.
        s = self.ctx.settings
        item = (msg, parse_one(msg.topic, msg.payload, prefix=s.mqtt_topic_prefix, max_bytes=s.max_message_bytes,
                               counters=self.ctx.counters))
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self.ctx.counters.add("telemetry_queue_full_waits")

    # ---- writer side ---------------------------------------------------------------------------------
    def _drain(self) -> list[tuple[Message, Telemetry | None]]:
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

    def _run_writer(self) -> None:
        last_refresh = 0.0
        while not self._stop.is_set():
            batch = self._drain()
            if not batch:
                continue
            messages = [parsed for _, parsed in batch if parsed is not None]
            delay = 0.2
            while not self._stop.is_set():
                try:
                    with self.ctx.sessions() as session, session.begin():
                        if time.monotonic() - last_refresh > 0.5:
                            self.membership.refresh(session)
                            last_refresh = time.monotonic()
                        new = write_batch(session, messages, self.membership, self.ctx.clock())
                    self.ctx.counters.add("telemetry_ingested", new)
                    self.ctx.counters.add("telemetry_duplicates", len(messages) - new)
                    self.ctx.metrics.ingest_committed(messages, self.ctx.clock())
                    break
                except Exception as exc:  # keep the ingester alive whatever happens to one batch
                    if is_unavailable(exc):
                        self.ctx.counters.add("telemetry_db_retries")
                        log.warning("database unavailable while ingesting; retrying in %.1fs", delay)
                    else:
                        log.exception("telemetry batch failed; retrying")
                        self.ctx.counters.add("telemetry_batch_errors")
                    self._stop.wait(delay)
                    delay = min(delay * 2, 5.0)
            else:
                return  # stopping: leave the batch unacknowledged, the broker redelivers it
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
