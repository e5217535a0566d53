"""Telemetry ingestion through a real broker: validation, de-duplication, drops that never stop the ingester,
and the schema migrations matching the models."""

from __future__ import annotations

import json

from sqlalchemy import create_engine, func, select

from tests.server.conftest import LiveServer, enrollment_token, push, wait_for
from tests.server.sim import Publisher, SimDevice
from update_server.models import TelemetryAggregate, TelemetryEvent


def _count(server: LiveServer, name: str) -> int:
    return int(server.ctx.counters.snapshot().get(name, 0))


def test_bad_messages_are_counted_and_dropped(mqtt_server: LiveServer) -> None:
    server = mqtt_server
    device = SimDevice(server.url, "tele-1")
    device.enroll(enrollment_token(server))
    device.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}
    pub = Publisher(server.broker, server.prefix, [device])
    topic = f"{server.prefix}/tele-1/telemetry/window"
    try:
        pub.publish(topic, b"{not json")
        pub.publish(topic, b"x" * (70 * 1024))
        pub.publish(topic, {"schema": "edgepack.telemetry.v1", "kind": "window"})  # missing fields
        wrong = pub.envelope(device, "window", device.active)
        wrong["device_id"] = "someone-else"
        wrong["window"] = {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:01:00Z", "requests": 1, "errors": 0}
        pub.publish(topic, wrong)
        sent = pub.window(device, requests=10, errors=1)
        pub.publish(topic, json.dumps(sent).encode())  # a retry: same message id
        pub.event(device, "crash", detail={"signal": 9, "phase": "serving"})
        pub.event(device, "install_failed", target={"name": "digits", "version": "1.1.0", "release_counter": 2})
        wait_for(lambda: _count(server, "telemetry_ingested") == 3 and _count(server, "telemetry_duplicates") == 1,
                 timeout=30, what="the valid messages")
    finally:
        pub.close()
    assert _count(server, "telemetry_dropped_malformed") == 2
    assert _count(server, "telemetry_dropped_oversized") == 1
    assert _count(server, "telemetry_dropped_device_mismatch") == 1
    with server.ctx.sessions() as session:
        rows = {r.bundle_version: r for r in session.scalars(select(TelemetryAggregate))}
        assert rows["1.0.0"].windows == 1 and rows["1.0.0"].requests == 10 and rows["1.0.0"].errors == 1
        assert rows["1.0.0"].crashes == 1 and rows["1.0.0"].lat_1 == 50
        assert rows["1.1.0"].install_failures == 1
        assert session.scalar(select(func.count()).select_from(TelemetryEvent)) == 2
    with server.admin as client:
        counters = client.get("/api/v1/admin/stats").json()["counters"]
    assert counters["telemetry_ingested"] == 3


def test_migrations_match_models(server: LiveServer) -> None:
    """The schema Alembic built equals what the ORM models declare (no migration forgotten)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from update_server.models import Base

    engine = create_engine(server.ctx.engine.url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_telemetry_right_after_a_rollout_starts_counts_for_it(server: LiveServer, digits_bundles: dict) -> None:
    """Attribution reads the memberships committed before the batch, whatever the ingester's cache saw
    earlier (a cache refreshed every 0.5 s credited such windows to no rollout: 22 of 24 devices reporting)."""
    from datetime import datetime, timezone

    from update_server.services.telemetry import MembershipCache, parse, write_batch

    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    assert push(server, digits_bundles["1.1.0"]).status_code == 201
    device = SimDevice(server.url, "attr-1")
    device.enroll(enrollment_token(server))
    device.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}
    assert device.checkin().status_code == 200
    cache = MembershipCache()
    with server.ctx.sessions() as session, session.begin():
        cache.refresh(session)  # the ingester's view before the rollout exists
    with server.admin as client:
        r = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.1.0"}, "phases": [100],
                                                 "start": True})
        assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]
    now = datetime.now(timezone.utc).isoformat()
    prefix = server.prefix
    body = {"schema": "edgepack.telemetry.v1", "kind": "window", "message_id": "a" * 32, "device_id": "attr-1",
            "seq": 1, "sent_at": now, "bundle": device.active,
            "window": {"start": now, "end": now, "requests": 5, "errors": 0}}
    msg = parse(f"{prefix}/attr-1/telemetry/window", json.dumps(body).encode(), prefix=prefix, max_bytes=65536)
    with server.ctx.sessions() as session, session.begin():
        assert write_batch(session, [msg], cache, datetime.now(timezone.utc)) == 1
    with server.ctx.sessions() as session:
        row = session.scalars(select(TelemetryAggregate).where(TelemetryAggregate.device_id == "attr-1")).one()
    assert row.rollout_id == rollout_id and row.requests == 5


def test_worker_slots_give_restarted_workers_the_same_client_ids(tmp_path: object) -> None:
    """With several workers each ingests as ``<id>-w<i>``: a slot is a lock held while the process lives, so
    a restarted server's workers take the same ids again (a pid in the id left a stale session per restart)."""
    import subprocess
    import sys
    from pathlib import Path

    from update_server.ingest import WorkerSlot
    from update_server.settings import Settings

    slots = Path(str(tmp_path)) / "ingest-slots"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from update_server.ingest import WorkerSlot; "
        f"s = WorkerSlot.claim(Path({str(slots)!r}), 2); print(s.index, flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0"  # another worker holds slot 0
        mine = WorkerSlot.claim(slots, 2)
        assert mine is not None and mine.index == 1
        assert WorkerSlot.claim(slots, 2) is None  # both taken
    finally:
        holder.communicate("", timeout=30)  # that worker exits: its lock goes with it
    again = WorkerSlot.claim(slots, 2)
    assert again is not None and again.index == 0
    again.release()
    mine.release()
    ids = Settings(mqtt_client_id="srv", workers=2).ingest_client_ids()
    assert ids == ["srv-w0", "srv-w1"]
