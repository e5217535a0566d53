"""Poison telemetry never stops ingestion (issue 10): through a real broker into a real server on SQLite and
PostgreSQL, messages that fail validation or the database write are dropped and counted by reason, the good
messages around them are stored, and ingestion carries on."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from tests.server.conftest import LiveServer, enrollment_token, wait_for
from tests.server.sim import Publisher, SimDevice
from update_server.models import TelemetryAggregate

pytestmark = [pytest.mark.mqtt]

ACTIVE = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}


def _counters(server: LiveServer) -> dict[str, int]:
    with server.admin as client:
        return dict(client.get("/api/v1/admin/stats").json()["counters"])


def _window(pub: Publisher, device: SimDevice, **window: Any) -> dict[str, Any]:
    msg = pub.envelope(device, "window", ACTIVE)
    msg["window"] = {"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T00:01:00+00:00", "requests": 10,
                     "errors": 0, **window}
    return msg


def _requests(server: LiveServer) -> int:
    with server.ctx.sessions() as session:
        return sum(r.requests for r in session.scalars(select(TelemetryAggregate)))


def test_poison_between_good_messages_is_counted_and_the_rest_stored(mqtt_server: LiveServer) -> None:
    server = mqtt_server
    device = SimDevice(server.url, "poison-1")
    device.enroll(enrollment_token(server))
    device.active = ACTIVE
    pub = Publisher(server.broker, server.prefix, [device])
    topic = f"{server.prefix}/poison-1/telemetry/window"
    poison = {
        "out_of_range": [_window(pub, device, requests=10**30), _window(pub, device, requests=2**63),
                         _window(pub, device, errors=-1 + 2**64),
                         _window(pub, device, latency_ms={"bounds": [1], "counts": [10**20, 0]})],
        "implausible_rate": [_window(pub, device, requests=10**9),  # 60 s at 10,000/s allows 610,000
                             _window(pub, device, feedback={"count": 10**8, "correct": 0})],
        "bad_window_time": [_window(pub, device, start="yesterday"),
                            _window(pub, device, start="2026-01-02T00:00:00+00:00")],
        "malformed": [_window(pub, device, requests=7) | {"bundle": {**ACTIVE, "version": "1.0\x00"}}],
    }
    try:
        for bad in (m for group in poison.values() for m in group):
            pub.publish(topic, json.dumps(bad).encode())
            pub.publish(topic, json.dumps(_window(pub, device, requests=10)).encode())  # a good one each time
        pub.publish(f"{server.prefix}/poison-1/telemetry/event", json.dumps(
            pub.envelope(device, "event", ACTIVE) | {"event": "crash", "detail": {"x": float("nan")}}).encode())
        wait_for(lambda: _counters(server).get("telemetry_ingested", 0) == 9, timeout=60, what="the good windows")
    finally:
        pub.close()
    counters = _counters(server)
    for reason, messages in poison.items():
        expected = len(messages) + (1 if reason == "malformed" else 0)  # + the event with NaN in its detail
        assert counters.get(f"telemetry_dropped_{reason}") == expected, (reason, counters)
    assert _requests(server) == 9 * 10
    with server.admin as client:
        metrics = client.get("/metrics").text
    assert 'edgepack_telemetry_dropped_total{reason="out_of_range"} 4.0' in metrics
    assert 'edgepack_telemetry_dropped_total{reason="implausible_rate"} 2.0' in metrics


def _install_poison_trigger(server: LiveServer) -> None:
    """A real database fault for one kind of message: inserting an event whose detail says ``poison`` fails,
    as a row the database refuses would (the messages that pass validation but fail the write)."""
    with server.ctx.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                              "IF NEW.detail->>'poison' = 'yes' THEN RAISE EXCEPTION 'poison row refused'; END IF; "
                              "RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(text("CREATE TRIGGER refuse_poison BEFORE INSERT ON telemetry_events FOR EACH ROW "
                              "EXECUTE FUNCTION refuse_poison()"))
        else:
            conn.execute(text("CREATE TRIGGER refuse_poison BEFORE INSERT ON telemetry_events "
                              "WHEN json_extract(NEW.detail, '$.poison') = 'yes' "
                              "BEGIN SELECT RAISE(ABORT, 'poison row refused'); END"))


def test_a_message_the_database_refuses_costs_only_itself(mqtt_server: LiveServer) -> None:
    server = mqtt_server
    _install_poison_trigger(server)
    devices = [SimDevice(server.url, f"wpoison-{i}") for i in range(3)]
    token = enrollment_token(server)
    for d in devices:
        d.enroll(token)
        d.active = ACTIVE
    pub = Publisher(server.broker, server.prefix, devices)
    try:
        server.ctx.settings.ingest_flush_s = 1.0  # large batches: the poison shares its batch with good messages
        for round_ in range(3):
            for d in devices:
                pub.window(d, requests=5)
                if round_ == 1:
                    pub.event(d, "crash", detail={"poison": "yes"})
        wait_for(lambda: _counters(server).get("telemetry_dropped_write_failed", 0) == 3
                 and _counters(server).get("telemetry_ingested", 0) == 9, timeout=60,
                 what="the poison isolated and the rest written")
        for d in devices:  # ingestion goes on after it
            pub.window(d, requests=5)
        wait_for(lambda: _counters(server).get("telemetry_ingested", 0) == 12, timeout=60, what="later windows")
    finally:
        pub.close()
    assert _requests(server) == 12 * 5
    assert httpx.get(f"{server.url}/readyz").status_code == 200
