"""Telemetry: the persisted outbox, windows, broker outages and restarts (real Mosquitto)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from device_agent.client import AgentClient
from device_agent.machine import Agent
from device_agent.outbox import Outbox
from device_agent.telemetry import MqttPublisher, WindowStats
from tests.agent.conftest import DEVICE, HARDWARE, drive
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data
from tests.support.services import Mosquitto


def _env(i: int) -> dict[str, Any]:
    return {"schema": "edgepack.telemetry.v1", "kind": "window", "device_id": "d", "i": i}


def test_outbox_persists_and_bounds_and_counts_drops(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "box", max_messages=5)
    event = box.put("event", {"kind": "event", "event": "committed"})
    for i in range(6):
        box.put("window", _env(i))
    assert len(box) == 5 and box.dropped == 2
    kinds = [e.kind for e in box.pending()]
    assert kinds[0] == "event"  # the oldest windows were dropped first; the event survived
    (tmp_path / "box" / ".000000000099-window-x.json.tmp").write_bytes(b"{")  # a power-loss leftover
    again = Outbox(tmp_path / "box", max_messages=5)
    assert [e.message_id for e in again.pending()] == [e.message_id for e in box.pending()]
    assert again.seq == 7 and again.take_dropped() == 2 and again.take_dropped() == 0
    assert not list((tmp_path / "box").glob(".*"))
    again.ack(event["message_id"])
    assert len(Outbox(tmp_path / "box")) == 4
    assert [json.loads(e.read())["seq"] for e in again.pending()] == [4, 5, 6, 7]


def test_window_figures() -> None:
    now = datetime.now(timezone.utc)
    w = WindowStats(now)
    for ms in (0.5, 1.5, 3, 3, 700, 5000):
        w.request(ms, ms < 1000, ["7"] if ms < 10 else ["1"])
    w.feedback_given(True)
    w.feedback_given(False)
    w.crash()
    out = w.take(now)
    assert out["requests"] == 6 and out["errors"] == 1 and out["crashes"] == 1
    assert out["latency_ms"]["counts"] == [1, 1, 2, 0, 0, 0, 0, 0, 0, 1, 1]
    assert out["latency_ms"]["p50"] == 3 and out["latency_ms"]["p99"] == 5000
    assert out["feedback"] == {"count": 2, "correct": 1} and out["predicted_classes"] == {"7": 4, "1": 2}
    assert w.take(now)["requests"] == 0


def device_account(broker: Mosquitto, device_id: str = DEVICE, account_prefix: str = "") -> dict[str, Any]:
    """Create the device's broker account (what enrollment does on a real server); the [mqtt] config that
    uses it, over TLS pinned to the broker's CA."""
    accounts = broker.accounts(account_prefix=account_prefix)
    try:
        account = accounts.add_device(device_id, f"epm_{uuid.uuid4().hex}")
    finally:
        accounts.stop()
    return {"url": broker.url, "username": account.username, "password": account.password,
            "client_id": account.client_id, "ca_file": str(broker.ca_file)}


class Collector:
    """The server's ingest account (its shared subscription, the only telemetry read it may do) with a
    persistent session, recording every telemetry message it receives."""

    def __init__(self, broker: Mosquitto) -> None:
        self.messages: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-collector",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set("edgepack-ingest", broker.ingest_password)
        self.client.tls_set(ca_certs=str(broker.ca_file))
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.reconnect_delay_set(0.2, 1)
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", broker.port, 10, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe("$share/edgepack-server/edgepack/v1/devices/+/telemetry/#", qos=1)
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def mark(self, device_id: str) -> int:
        """The committed high-water mark a server would report: every seq up to it received."""
        seqs = {m["seq"] for m in list(self.messages) if m["device_id"] == device_id}
        mark = 0
        while mark + 1 in seqs:
            mark += 1
        return mark


@pytest.mark.slow
@pytest.mark.mqtt
def test_broker_outage_and_agent_restart_lose_nothing_and_duplicate_nothing(
        private_broker: Mosquitto, fake_server: FakeUpdateServer, bundle: Callable, agent_process: Callable,
        tmp_path: Path) -> None:
    bundle("1.0.0", 1)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0", rollout_id="r-1")
    mqtt_config = device_account(private_broker)  # also sets up the ingest account the collector uses
    collector = Collector(private_broker)
    fake_server.committed = collector.mark  # the collector stands for the server's ingester
    fake_server.poll_interval_s = 1.0
    agent = agent_process(mqtt=mqtt_config, telemetry={"window_s": 1.0},
                          trial={"period_s": 0.5}).start()
    images, labels = digits_data()

    def traffic(seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        """Predictions with feedback for ``seconds``, or sooner once ``until()`` holds."""
        end = time.monotonic() + seconds
        with AgentClient(agent.api) as client:
            while time.monotonic() < end and not until():
                try:
                    ans = client.predict(images[:2].tolist())
                    client.feedback(ans["prediction_id"], [str(x) for x in labels[:2]])
                except Exception:  # the model may not be installed yet
                    pass
                time.sleep(0.1)

    def committed(version: str) -> bool:
        s = agent.status()
        return s["state"] == "idle" and (s["serving"] or {}).get("version") == version and not s["previous"]

    traffic(30, until=lambda: committed("1.0.0"))
    traffic(2)
    assert agent.status()["serving"]["version"] == "1.0.0"
    private_broker.stop()                                  # ---- outage ----
    bundle("1.1.0", 2)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-2")
    traffic(3)
    assert agent.stop() == 0                               # restart in the middle of the outage: it checks
    agent.start()                                          # in at once and installs 1.1.0, broker still down
    traffic(60, until=lambda: committed("1.1.0") and agent.status()["outbox"] > 10)
    traffic(2)
    assert committed("1.1.0") and agent.status()["outbox"] > 10, agent.log_tail()
    private_broker.start()                                 # ---- broker back ----
    deadline = time.monotonic() + 60
    while agent.status()["outbox"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent.status()["outbox"] == 0, agent.log_tail()
    assert agent.stop() == 0
    meta = json.loads((tmp_path / "state" / "outbox" / "meta.json").read_text())
    time.sleep(1.0)
    collector.close()
    # A message sent but not yet covered by the committed mark when the agent stopped is sent again after the
    # restart (same message_id and seq): the server stores it once. What must hold: one message per seq, none
    # missing.
    by_seq: dict[int, str] = {}
    for m in collector.messages:
        assert by_seq.setdefault(m["seq"], m["message_id"]) == m["message_id"], "two messages with one seq"
    assert sorted(by_seq) == list(range(1, meta["seq"] + 1)), "a message was lost"
    assert meta["dropped"] == 0
    stored = list({m["message_id"]: m for m in collector.messages}.values())  # what the server keeps
    events = [m["event"] for m in stored if m["kind"] == "event"]
    assert events.count("committed") == 2 and "activated" in events
    windows = [m["window"] for m in stored if m["kind"] == "window"]
    assert sum(w["requests"] for w in windows) > 50
    assert sum(w["feedback"]["count"] for w in windows) > 50
    assert any("input_stats" in w and len(w["input_stats"]["mean"]) == 64 for w in windows)
    committed = [m for m in stored if m.get("event") == "committed"]
    assert [c["rollout_id"] for c in committed] == ["r-1", "r-2"]


@pytest.mark.mqtt
def test_notify_triggers_an_immediate_check_in(session_broker: Mosquitto, fake_server: FakeUpdateServer,
                                               bundle: Callable, make_agent: Callable, agent_config: Callable) -> None:
    from update_server.broker.acl import notify_password

    bundle("1.0.0", 1)
    prefix = f"n{uuid.uuid4().hex[:6]}-"
    mqtt_config = device_account(session_broker, account_prefix=prefix)
    publisher = MqttPublisher(mqtt_config["url"], DEVICE, username=mqtt_config["username"],
                              password=mqtt_config["password"], client_id=mqtt_config["client_id"],
                              ca_file=mqtt_config["ca_file"])
    agent: Agent = make_agent(agent_config(mqtt=mqtt_config), publisher=publisher)
    drive(agent)  # first check-in: nothing assigned yet
    assert agent.record.active is None
    deadline = time.monotonic() + 10
    while not publisher.connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    notifier = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)  # as the server's notifier
    notifier.username_pw_set(f"{prefix}edgepack-notify", notify_password(session_broker.admin_password))
    notifier.tls_set(ca_certs=str(session_broker.ca_file))
    notifier.connect("127.0.0.1", session_broker.port)
    notifier.loop_start()
    notifier.publish(f"edgepack/v1/devices/{DEVICE}/notify", json.dumps(
        {"schema": "edgepack.notify.v1", "type": "checkin", "reason": "assignment_changed",
         "message_id": "n1"}), qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 30
    while (agent.record.active is None or agent.record.state.value != "idle") and time.monotonic() < deadline:
        time.sleep(0.05)
    notifier.loop_stop()
    agent.stop()
    thread.join(10)
    assert agent.record.active is not None and agent.record.active.version == "1.0.0"


def test_outbox_keeps_messages_until_the_server_mark_covers_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "box", max_messages=100)
    assert box.oldest_seq() == 1
    for i in range(5):
        box.put("window", _env(i))
    assert [e.seq for e in box.pending_after(2, 10)] == [3, 4, 5]
    assert [e.seq for e in box.commit(3)] == [1, 2, 3]  # the server stored 1..3: off the disk
    assert box.oldest_seq() == 4 and len(Outbox(tmp_path / "box")) == 2
    assert box.commit(99) == [] and len(box) == 2  # a mark above our own seq: our state was reset; keep all
    box.commit(5)
    assert len(box) == 0 and box.oldest_seq() == 6  # empty: seq + 1


class AckingPublisher:
    """The :class:`~device_agent.telemetry.Publisher` seam: a broker that acknowledges every message at once."""

    def __init__(self) -> None:
        self.on_ack: Callable[[int], None] = lambda mid: None
        self.on_connect: Callable[[], None] = lambda: None
        self.on_notify: Callable[[bytes], None] = lambda payload: None
        self.sent: list[bytes] = []

    def start(self) -> None:
        self.on_connect()

    def stop(self) -> None:
        pass

    def connected(self) -> bool:
        return True

    def publish(self, topic: str, payload: bytes) -> int | None:
        self.sent.append(payload)
        self.on_ack(len(self.sent))
        return len(self.sent)


def test_broker_ack_deletes_nothing_until_the_server_mark_or_an_older_server(tmp_path: Path) -> None:
    from device_agent.clock import SystemClock
    from device_agent.telemetry import Telemetry

    def until(predicate: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + 10
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.02)
        return predicate()

    pub = AckingPublisher()
    tel = Telemetry("d", Outbox(tmp_path / "box"), pub, SystemClock(), context=lambda: (None, None))
    tel.start()
    try:
        for _ in range(3):
            tel.event("crash")
        assert until(lambda: tel.published == 3)
        assert len(tel.outbox) == 3              # the broker has them; the server has not said so: kept
        tel.committed(2)
        assert [e.seq for e in tel.outbox.pending()] == [3]
        tel.no_mark()                            # an older server: no mark will ever come
        assert until(lambda: len(tel.outbox) == 0)
        tel.event("crash")                       # from now on the broker's PUBACK deletes
        assert until(lambda: tel.published == 4 and len(tel.outbox) == 0)
    finally:
        tel.stop()
