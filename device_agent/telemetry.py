"""Telemetry: lifecycle events and periodic windows, sent over MQTT (QoS 1) from the persisted outbox.

* :class:`WindowStats` accumulates one window of serving figures (requests, errors, crashes, latency
  histogram, feedback accuracy, predicted classes); the worker adds the input summary statistics.
* :class:`Telemetry` builds the protocol envelope, puts every message in the :class:`~device_agent.outbox.Outbox`
  first, and one sender thread publishes from it. A message leaves the outbox only when the server's committed
  high-water mark (``telemetry.committed_seq`` in the check-in answer, :meth:`Telemetry.committed`) covers
  its seq; the broker's acknowledgement (PUBACK) only frees a slot of the in-flight window.
* :class:`MqttPublisher` is the real :class:`Publisher` (paho-mqtt, MQTT 5, clean start false, session
  expiry one day; TLS pinned to a CA and the device's broker account, see ``connection.py``). Its callbacks
  only enqueue; the sender thread acts.

A message without PUBACK for ``publish_timeout_s`` is published again; a message that a committed mark
received at least ``resend_s`` after sending it does not cover is published again too (a broker restarted
without persistence, or at its ``max_queued_messages``, dropped it). No mark, no re-send: while the server is
unreachable the broker's queue is not filled with copies. Both keep the ``message_id`` and
``seq``: the server stores each once.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlparse

from device_agent.clock import Clock, iso
from device_agent.outbox import Entry, Outbox

log = logging.getLogger(__name__)
SCHEMA = "edgepack.telemetry.v1"
MAX_PAYLOAD = 64 * 1024
LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MAX_LATENCY_SAMPLES = 10_000
MAX_INFLIGHT = 50
"""Messages published and not yet acknowledged by the broker (PUBACK), at most."""


def topic_prefix(device_id: str) -> str:
    return f"edgepack/v1/devices/{device_id}"


class Publisher(Protocol):
    """Where telemetry goes. ``publish`` returns a message handle (an int) or None when disconnected; the
    publisher calls ``on_ack(handle)`` once the broker acknowledged it, ``on_connect()`` after each
    (re)connection and ``on_notify(payload)`` for a message on the device's notify topic."""

    on_ack: Callable[[int], None]
    on_connect: Callable[[], None]
    on_notify: Callable[[bytes], None]

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def connected(self) -> bool: ...
    def publish(self, topic: str, payload: bytes) -> int | None: ...


class MqttPublisher:
    """paho-mqtt client: MQTT 5, QoS 1, clean start false, session expiry 1 day, automatic reconnect."""

    def __init__(self, url: str, device_id: str, *, username: str | None = None, password: str | None = None,
                 keepalive_s: int = 30, protocol: str = "5", ca_file: str | None = None,
                 client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"broker URL must be mqtt://host:port, found {url!r}")
        self.host, self.port = u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883)
        self.device_id = device_id
        self.keepalive_s = keepalive_s
        self.on_ack: Callable[[int], None] = lambda mid: None
        self.on_connect: Callable[[], None] = lambda: None
        self.on_notify: Callable[[bytes], None] = lambda payload: None
        self._mqtt = mqtt
        self._connected = threading.Event()
        self.v5 = protocol == "5"
        # A stable client id: the broker keeps this device's session (and QoS 1 queue) across reconnects.
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]  # paho re-export
                                  client_id=client_id or f"edgepack-dev-{device_id}",
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else False)
        if u.scheme == "mqtts":  # the broker's certificate must verify against the pinned CA, host name included
            self.client.tls_set(ca_certs=ca_file)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(50)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        client.subscribe(f"{topic_prefix(self.device_id)}/notify", qos=1)
        self._connected.set()
        self.on_connect()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.on_ack(mid)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.on_notify(bytes(msg.payload))

    def start(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if not self.v5:  # MQTT 3.1.1: the persistent session comes from clean_session=False
            self.client.connect_async(self.host, self.port, self.keepalive_s)
            self.client.loop_start()
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho is untyped here
        props.SessionExpiryInterval = 86_400
        self.client.connect_async(self.host, self.port, self.keepalive_s, clean_start=False, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes) -> int | None:
        if not self._connected.is_set():
            return None
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)


class Totals:
    """Cumulative serving counters (requests, errors, latency buckets, crashes, feedback) since start."""

    def __init__(self) -> None:
        self.requests = self.errors = self.crashes = self.feedback = self.feedback_correct = 0
        self.latency_sum_ms = 0.0
        self.counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)

    def request(self, bucket: int, latency_ms: float, ok: bool) -> None:
        self.requests += 1
        self.errors += int(not ok)
        self.counts[bucket] += 1
        self.latency_sum_ms += latency_ms

    def copy(self) -> Totals:
        t = Totals()
        t.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()})
        return t


class WindowStats:
    """One window of serving figures. Thread-safe; :meth:`take` returns the window and starts a new one."""

    def __init__(self, now: datetime) -> None:
        self._lock = threading.Lock()
        self.totals = Totals()
        """Since the agent started, never reset: what the optional local ``GET /metrics`` exposes."""
        self._reset(now)

    def _reset(self, now: datetime) -> None:
        self.start = now
        self.requests = self.errors = self.crashes = 0
        self.counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.samples: list[float] = []
        self.seen = 0
        self.feedback = [0, 0]
        self.classes: dict[str, int] = {}

    def request(self, latency_ms: float, ok: bool, classes: list[str] | None) -> None:
        with self._lock:
            self.requests += 1
            if not ok:
                self.errors += 1
            i = next((i for i, b in enumerate(LATENCY_BOUNDS_MS) if latency_ms <= b), len(LATENCY_BOUNDS_MS))
            self.counts[i] += 1
            self.totals.request(i, latency_ms, ok)
            self.seen += 1
            if len(self.samples) < MAX_LATENCY_SAMPLES:
                self.samples.append(latency_ms)
            else:  # reservoir sampling keeps the percentiles unbiased under load
                j = random.randrange(self.seen)
                if j < MAX_LATENCY_SAMPLES:
                    self.samples[j] = latency_ms
            for c in classes or ():
                self.classes[c] = self.classes.get(c, 0) + 1

    def crash(self) -> None:
        with self._lock:
            self.crashes += 1
            self.totals.crashes += 1

    def feedback_given(self, correct: bool) -> None:
        with self._lock:
            self.feedback[0] += 1
            self.feedback[1] += int(correct)
            self.totals.feedback += 1
            self.totals.feedback_correct += int(correct)

    def snapshot_totals(self) -> Totals:
        with self._lock:
            return self.totals.copy()

    def take(self, now: datetime) -> dict[str, Any]:
        with self._lock:
            s = sorted(self.samples)
            def pct(q: float) -> float | None:
                return round(s[min(len(s) - 1, int(q * len(s)))], 3) if s else None

            window = {"start": iso(self.start), "end": iso(now), "requests": self.requests, "errors": self.errors,
                      "crashes": self.crashes,
                      "latency_ms": {"bounds": list(LATENCY_BOUNDS_MS), "counts": list(self.counts),
                                     "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)},
                      "feedback": {"count": self.feedback[0], "correct": self.feedback[1]},
                      "predicted_classes": dict(self.classes)}
            self._reset(now)
            return window


class Telemetry:
    """Envelope + outbox + sender thread. ``context()`` returns ``(bundle ident | None, rollout_id | None)``."""

    def __init__(self, device_id: str, outbox: Outbox, publisher: Publisher | None, clock: Clock, *,
                 context: Callable[[], tuple[dict[str, Any] | None, str | None]],
                 publish_timeout_s: float = 30.0, resend_s: float = 300.0,
                 on_notify: Callable[[bytes], None] | None = None) -> None:
        self.device_id = device_id
        self.outbox = outbox
        self.publisher = publisher
        self.clock = clock
        self.context = context
        self.publish_timeout_s = publish_timeout_s
        self.resend_s = resend_s
        self._wake: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: dict[int, tuple[Entry, float]] = {}
        """Publish handle -> (message, when sent): waiting for the broker's PUBACK."""
        self._sent: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        """message_id -> (message, when last sent), least recently sent first: sent, not yet committed."""
        self._cursor = 0
        """The highest seq published since this process started (everything above is unsent)."""
        self.published = 0
        """PUBACKs received (the broker has the message; not yet proof that the server stored it)."""
        self.resent = 0
        """Messages sent again because the server had not committed them ``resend_s`` after sending."""
        self.committed_seq = 0
        """The server's committed high-water mark, as last reported."""
        self.end_to_end = True
        """False once a check-in answer came without a mark (a server older than the end-to-end
        acknowledgement): then the broker's PUBACK deletes a message, as before."""
        self._mark_at = float("-inf")
        """When (monotonic) the last mark arrived: a message is sent again only when a mark that came at
        least ``resend_s`` after sending it does not cover it (while the server is unreachable no mark comes,
        so nothing is re-sent into a broker queue that may already hold it)."""
        if publisher is not None:
            publisher.on_ack = lambda mid: self._wake.put(("ack", mid))
            publisher.on_connect = lambda: self._wake.put(("connect", None))
            publisher.on_notify = on_notify or (lambda payload: None)

    # ---- producing ---------------------------------------------------------------------------------------
    def _envelope(self, kind: str) -> dict[str, Any]:
        bundle, rollout = self.context()
        return {"schema": SCHEMA, "kind": kind, "device_id": self.device_id, "sent_at": iso(self.clock.now()),
                "bundle": bundle, "rollout_id": rollout}

    def event(self, name: str, *, target: dict[str, Any] | None = None, detail: dict[str, Any] | None = None,
              rollout_id: str | None = None) -> dict[str, Any]:
        env = self._envelope("event")
        if rollout_id is not None:
            env["rollout_id"] = rollout_id
        detail = dict(detail or {})
        if "message" in detail:
            detail["message"] = str(detail["message"])[:4000]
        msg = self.outbox.put("event", {**env, "event": name, "target": target, "detail": detail})
        log.info("event %s target=%s detail=%s", name, target, {k: detail[k] for k in list(detail)[:4]})
        self._wake.put(("new", None))
        return msg

    def window(self, window: dict[str, Any]) -> dict[str, Any]:
        dropped = self.outbox.take_dropped()
        window = {**window, "outbox_dropped": dropped, "outbox_dropped_total": self.outbox.dropped}
        body = {**self._envelope("window"), "window": window}
        if len(json.dumps(body)) > MAX_PAYLOAD - 200 and "input_stats" in window:
            window["input_stats"] = {"count": window["input_stats"].get("count"), "truncated": True}
        msg = self.outbox.put("window", body)
        self._wake.put(("new", None))
        return msg

    # ---- end-to-end acknowledgement ----------------------------------------------------------------------
    def progress(self) -> dict[str, int]:
        """What the check-in reports: the oldest seq still in the outbox (every seq below it is committed or
        was dropped by a full outbox: the server counts the uncommitted ones as lost) and the last seq
        assigned (lower than the server's mark only when the state directory was reset)."""
        return {"outbox_oldest_seq": self.outbox.oldest_seq(), "outbox_seq": self.outbox.seq}

    def committed(self, committed_seq: int) -> None:
        """The server has stored every message up to ``committed_seq`` (or knows them lost): delete them."""
        done = self.outbox.commit(committed_seq)
        if committed_seq <= self.outbox.seq:
            self.committed_seq = committed_seq
        self._mark_at = self.clock.monotonic()
        if self.publisher is not None:  # no sender thread without one: nothing would drain the queue
            self._wake.put(("committed", [e.message_id for e in done]))

    def no_mark(self) -> None:
        """The server answered a check-in without a mark: it does not acknowledge end to end. Fall back to
        deleting on the broker's PUBACK (and delete what the broker already acknowledged), or the outbox
        would only ever fill."""
        if self.end_to_end and self.publisher is not None:
            log.warning("the server reports no committed telemetry mark (an older server): telemetry is deleted "
                        "on the broker's acknowledgement, as before")
            self.end_to_end = False
            self._wake.put(("no_mark", None))

    def unsent(self) -> int:
        """Messages not yet published and acknowledged by the broker once since this process started."""
        return len(self.outbox.pending_after(self._cursor, 1_000_000)) + len(self._inflight)

    # ---- sending -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.publisher is None:
            return
        self.publisher.start()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self, flush_s: float = 0.0) -> None:
        if flush_s and self.publisher is not None:
            deadline = self.clock.monotonic() + flush_s
            while self.unsent() and self.clock.monotonic() < deadline and self.publisher.connected():
                self.clock.wait(self._stop, 0.05)
        self._stop.set()
        self._wake.put(("stop", None))
        if self._thread is not None:
            self._thread.join(5)
        if self.publisher is not None:
            self.publisher.stop()

    def _run(self) -> None:
        assert self.publisher is not None
        while not self._stop.is_set():
            try:
                what, arg = self._wake.get(timeout=1.0)
            except queue.Empty:
                what, arg = "tick", None
            if what == "stop":
                return
            if what == "ack" and (entry := self._inflight.pop(arg, None)) is not None:
                self.published += 1
                if not self.end_to_end:
                    self._forget(entry[0])
            elif what == "no_mark":  # PUBACKed already: neither in flight nor waiting for a re-send
                for _, (e, at) in list(self._sent.items()):
                    if at != float("-inf") and all(e is not f for f, _ in self._inflight.values()):
                        self._forget(e)
            elif what == "committed":
                for message_id in arg:
                    self._sent.pop(message_id, None)
            self._pump()

    def _forget(self, entry: Entry) -> None:
        self.outbox.ack(entry.message_id)
        self._sent.pop(entry.message_id, None)

    def _send(self, entry: Entry, now: float) -> bool:
        """Publish one message; False when the publisher cannot take it now (disconnected)."""
        assert self.publisher is not None
        try:
            payload = entry.read()
        except FileNotFoundError:  # committed or dropped meanwhile
            self._sent.pop(entry.message_id, None)
            return True
        handle = self.publisher.publish(f"{topic_prefix(self.device_id)}/telemetry/{entry.kind}", payload)
        if handle is None:
            return False
        self._inflight[handle] = (entry, now)
        self._sent[entry.message_id] = (entry, now)
        self._sent.move_to_end(entry.message_id)
        return True

    def _pump(self) -> None:
        assert self.publisher is not None
        if not self.publisher.connected():
            return
        now = self.clock.monotonic()
        for handle, (entry, since) in list(self._inflight.items()):
            if now - since > self.publish_timeout_s:  # no PUBACK: send again at once, same message id and seq
                del self._inflight[handle]
                self._sent[entry.message_id] = (entry, float("-inf"))
                self._sent.move_to_end(entry.message_id, last=False)
        while len(self._inflight) < MAX_INFLIGHT and self._sent:  # not committed long after sending: again
            entry, at = next(iter(self._sent.values()))
            if self._mark_at - at < self.resend_s:
                break
            if not self._send(entry, now):
                return
            self.resent += 1
        if len(self._inflight) >= MAX_INFLIGHT:
            return
        for entry in self.outbox.pending_after(self._cursor, MAX_INFLIGHT - len(self._inflight)):
            if not self._send(entry, now):
                return
            self._cursor = entry.seq
