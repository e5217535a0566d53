"""End-to-end acknowledgement (issue 10): a telemetry message leaves a device's outbox only when the server has
committed it. Each test injects a real fault that made a broker acknowledgement a lie and checks that every
message the devices produced is stored exactly once (device-side count == server-side count, nothing lost):

* the broker stopped and restarted WITHOUT persistence while devices keep producing (it forgets queued
  messages and the ingester's session; devices publish their backlog before the ingester is back);
* the server killed with SIGKILL during a burst (a real subprocess) and started again;
* the ingester away while the broker runs with mosquitto's DEFAULT ``max_queued_messages`` (1000) and the
  devices send more than 1000 messages (the broker acknowledges and drops the rest).

The devices are the agent's real telemetry parts (tests/support/ackfleet.py) re-sending after 3 s.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token
from tests.support import services
from tests.support.ackfleet import (
    AckDevice,
    AckFleet,
    end_process,
    enroll_token_cli,
    serve_process,
    server_counts,
    server_env,
    wait_until,
)

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def _assert_exactly_once(db_url: str, devices: list[AckDevice]) -> None:
    counts = server_counts(db_url, [d.device_id for d in devices])
    for d in devices:
        assert counts[d.device_id] == {"windows": d.produced, "committed_seq": d.produced, "lost": 0}, \
            (d.device_id, d.produced, counts[d.device_id])


@pytest.fixture
def private_broker_factory() -> Iterator[Callable[..., services.Mosquitto]]:
    brokers: list[services.Mosquitto] = []

    def make(**options: Any) -> services.Mosquitto:
        broker = services.Mosquitto(**options).start()
        brokers.append(broker)
        return broker

    yield make
    for b in brokers:
        b.close()


def test_broker_restarted_without_persistence_loses_nothing(
        make_server: Callable[..., LiveServer], private_broker_factory: Callable[..., services.Mosquitto],
        tmp_path: Path) -> None:
    broker = private_broker_factory(persistence=False)
    db_url = f"sqlite:///{tmp_path / 'server.db'}"
    server = make_server(db_url, broker=broker, prefix="edgepack/v1/devices")
    token = enrollment_token(server, uses=10)
    devices = [AckDevice(server.url, f"nopersist-{i}", token, broker, tmp_path / "devices") for i in range(3)]
    fleet = AckFleet(devices)
    try:
        for _ in range(10):
            fleet.produce(1)
            time.sleep(0.1)
        broker.stop()                                       # ---- the broker is gone, and forgets everything ----
        for _ in range(20):                                 # ~10 s of windows meanwhile
            fleet.produce(1)
            time.sleep(0.5)
        broker.start()
        for _ in range(10):                                 # and right after it is back (the ingester is not yet)
            fleet.produce(1)
            time.sleep(0.1)
        wait_until(fleet.drained, 60, "every device's outbox to drain (the server committed everything)")
    finally:
        fleet.close()
    assert all(d.produced == 40 for d in devices)
    _assert_exactly_once(db_url, devices)
    assert sum(d.telemetry.resent for d in devices) > 0, "no re-send was needed: the fault was not injected"


@pytest.mark.postgres
def test_server_killed_during_a_burst_loses_and_duplicates_nothing(
        pg_url: str, session_keys: KeyStore, private_broker_factory: Callable[..., services.Mosquitto],
        tmp_path: Path) -> None:
    from sqlalchemy import create_engine, func, select

    from update_server.models import TelemetrySeen

    broker = private_broker_factory()
    env, url = server_env(tmp_path / "data", session_keys.directory / "online", pg_url, broker)
    log = tmp_path / "server.log"
    token = enroll_token_cli(env, 10)
    proc = serve_process(env, url, log)
    devices: list[AckDevice] = []
    fleet: AckFleet | None = None
    engine = create_engine(pg_url)

    def stored() -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(TelemetrySeen)).scalar_one())

    try:
        devices = [AckDevice(url, f"kill9-{i}", token, broker, tmp_path / "devices")
                   for i in range(3)]
        fleet = AckFleet(devices)
        fleet.produce(150)                                  # the burst
        wait_until(lambda: stored() > 30, 60, "the server to store part of the burst")
        proc.send_signal(signal.SIGKILL)                    # ---- mid-burst ----
        proc.wait(30)
        fleet.produce(30)                                   # still producing while the server is down
        proc = serve_process(env, url, log)
        fleet.produce(20)
        wait_until(fleet.drained, 60, "every device's outbox to drain (the server committed everything)")
    finally:
        if fleet is not None:
            fleet.close()
        end_process(proc)
        engine.dispose()
    assert all(d.produced == 200 for d in devices)
    _assert_exactly_once(pg_url, devices)


@pytest.mark.postgres
def test_more_than_the_broker_queue_while_the_ingester_is_away_all_arrive(
        pg_url: str, make_server: Callable[..., LiveServer],
        private_broker_factory: Callable[..., services.Mosquitto], tmp_path: Path) -> None:
    broker = private_broker_factory(max_queued_messages=1000)  # mosquitto's default
    same = {"broker": broker, "prefix": "edgepack/v1/devices", "account_prefix": f"q{uuid.uuid4().hex[:6]}-",
            "mqtt_share_group": f"g-{uuid.uuid4().hex[:8]}", "mqtt_client_id": f"srv-{uuid.uuid4().hex[:8]}",
            "data_dir": tmp_path / "data"}
    server = make_server(pg_url, **same)
    token = enrollment_token(server, uses=10)
    devices = [AckDevice(server.url, f"queue-{i}", token, broker, tmp_path / "devices", resend_s=5.0)
               for i in range(3)]
    fleet = AckFleet(devices)
    try:
        fleet.produce(5)
        wait_until(fleet.drained, 30, "the first windows to be committed")
        server.stop()                                       # ---- the ingester (and the server) away ----
        fleet.produce(450)                                  # 1350 messages for a queue of 1000
        wait_until(lambda: all(d.telemetry.unsent() == 0 for d in devices), 60,
                   "the broker to acknowledge every message")
        server = make_server(pg_url, **same)                # back, same session: it gets 1000 of them
        for d in devices:
            d.retarget(server.url)
        wait_until(fleet.drained, 60, "every device's outbox to drain (the server committed everything)")
    finally:
        fleet.close()
    assert all(d.produced == 455 for d in devices)
    _assert_exactly_once(pg_url, devices)
    assert sum(d.telemetry.resent for d in devices) > 0, "no re-send was needed: the fault was not injected"


def test_committed_mark_passes_rejected_messages_and_counts_lost_seqs(mqtt_server: LiveServer) -> None:
    """A message the server rejects (here: more requests than its window allows) still completes its seq, so
    the device stops re-sending it; seqs the device reports gone from its outbox (dropped when it was full)
    are counted lost, per device and fleet-wide; a device whose counter went back (state wiped) starts again."""
    from tests.server.sim import Publisher, SimDevice

    device = SimDevice(mqtt_server.url, "mark-1")
    device.enroll(enrollment_token(mqtt_server))
    device.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}
    pub = Publisher(mqtt_server.broker, mqtt_server.prefix, [device])

    def mark(**outbox: int) -> int:
        r = device.http.post(f"/api/v1/devices/{device.device_id}/checkin", headers=device.auth,
                             json={"state": "idle", "active": device.active, **outbox})
        assert r.status_code == 200, r.text
        return int(r.json()["telemetry"]["committed_seq"])

    try:
        assert mark() == 0
        pub.window(device)                                   # seq 1
        pub.window(device, requests=10**9)                   # seq 2: implausible, rejected
        pub.window(device)                                   # seq 3
        wait_until(lambda: mark() == 3, 30, "the mark to pass the rejected seq 2")
        pub.seqs[device.device_id] = 7                       # seqs 4..7 dropped by the device's full outbox
        pub.window(device)                                   # seq 8
        wait_until(lambda: mqtt_server.ctx.counters.snapshot().get("telemetry_ingested", 0) >= 3, 30,
                   "seq 8 to be stored")
        assert mark() == 3                                   # 4..7 missing: the mark waits
        assert mark(outbox_oldest_seq=8, outbox_seq=8) == 8  # the device says they are gone: lost, mark moves on
        with mqtt_server.admin as client:
            assert client.get(f"/api/v1/devices/{device.device_id}").json()["telemetry"] == {
                "committed_seq": 8, "lost": 4, "resets": 0}
            stats = client.get("/api/v1/admin/stats").json()
        assert stats["telemetry"]["lost"] == 4 and stats["counters"]["telemetry_lost"] == 4
        assert mark(outbox_oldest_seq=1, outbox_seq=2) == 0  # state wiped: its counter restarted at 1
        pub.seqs[device.device_id] = 0
        pub.window(device)                                   # the new seq 1 is stored, not taken for a duplicate
        wait_until(lambda: mark(outbox_oldest_seq=1, outbox_seq=1) == 1, 30, "the new seq 1 to be stored")
        assert mqtt_server.ctx.counters.snapshot().get("telemetry_ingested") == 4
    finally:
        pub.close()
        device.close()
