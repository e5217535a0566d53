"""Two server instances on one PostgreSQL: they split telemetry (shared subscription) and never double-advance
or double-halt a rollout."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push, wait_for
from tests.server.sim import Publisher, SimDevice
from update_server.services import rollouts

pytestmark = [pytest.mark.postgres, pytest.mark.mqtt]
OLD = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}


def _race(servers: list[LiveServer], rollout_id: str, per_server: int = 4) -> None:
    """Evaluate one rollout from many threads of both replicas at the same instant."""
    barrier = threading.Barrier(per_server * len(servers))
    errors: list[BaseException] = []

    def run(ctx: Any) -> None:
        try:
            barrier.wait()
            rollouts.evaluate(ctx, rollout_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s.ctx,)) for s in servers for _ in range(per_server)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def _actions(server: LiveServer, rollout_id: str) -> Counter[str]:
    with server.admin as client:
        return Counter(e["action"] for e in client.get(f"/api/v1/rollouts/{rollout_id}/audit").json())


def test_two_replicas_one_rollout(pg_url: str, make_server: Callable[..., LiveServer], session_broker: Any,
                                  digits_bundles: dict, session_keys: KeyStore, tmp_path: Any) -> None:
    prefix, group = f"edgepack-rep-{uuid.uuid4().hex[:8]}/v1/devices", f"g-{uuid.uuid4().hex[:8]}"
    shared = dict(broker=session_broker, account_prefix=f"rep{uuid.uuid4().hex[:6]}-", prefix=prefix,
                  mqtt_share_group=group, data_dir=tmp_path / "shared", gate_interval_s=0.05)
    a = make_server(pg_url, **shared)
    b = make_server(pg_url, **shared)
    assert push(a, digits_bundles["1.0.0"]).status_code == 201
    assert push(b, digits_bundles["1.1.0"]).status_code == 201  # same storage and database, either replica
    assert push(a, digits_bundles["1.1.0"]).status_code == 200  # the same files again, on the other replica: a no-op
    token = enrollment_token(a, uses=40)
    devices = []
    for i in range(40):
        d = SimDevice((a if i % 2 else b).url, f"rep-{i:03d}")
        d.enroll(token)
        d.active = dict(OLD)
        d.checkin()
        devices.append(d)
    director_root = session_keys.director_root_path.read_bytes()

    # 1. racing evaluations: once soaked, exactly one replica advances
    with b.admin as client:
        r = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.1.0"},
                                                  "phases": [{"percent": 25, "min_soak_s": 1.0}, {"percent": 50},
                                                             {"percent": 100}], "min_soak_s": 3600, "min_devices": 0,
                                                  # no telemetry yet: the race is about advancing, so the
                                                  # gates' data is waived (audited) for this test
                                                  "gates": {"max_crash_rate": 0.01, "allow_unproven": [
                                                      "install_failure_rate", "crash_rate", "error_rate",
                                                      "accuracy_drop", "p95_latency_regression"]},
                                                  "start": True})
        assert r.status_code == 201, r.text
    rid = r.json()["id"]
    time.sleep(1.1)
    _race([a, b], rid)
    time.sleep(0.5)  # the replicas' own gate loops keep evaluating too
    assert _actions(a, rid)["rollout.advance"] == 1

    # 2. telemetry split between replicas; a crash halts and rolls back exactly once
    pub = Publisher(session_broker, prefix, devices)
    try:
        before = [s.ctx.counters.snapshot().get("telemetry_ingested", 0) for s in (a, b)]
        for d in devices:
            d.sync(director_root)
            for _ in range(5):
                pub.window(d)
        wait_for(lambda: sum(s.ctx.counters.snapshot().get("telemetry_ingested", 0) for s in (a, b))
                 - sum(before) >= 200, timeout=30, what="both replicas to ingest")
        after = [s.ctx.counters.snapshot().get("telemetry_ingested", 0) for s in (a, b)]
        assert all(x > y for x, y in zip(after, before, strict=True)), (before, after)  # both did a share
        crashed = [d for d in devices if d.active["version"] == "1.1.0"]  # a build that crashes everywhere
        assert len(crashed) >= 3, "the crash gate needs 3 crashed devices to halt"
        for d in crashed:
            pub.event(d, "crash", detail={"exitcode": -11, "phase": "serving"})
        wait_for(lambda: sum(s.ctx.counters.snapshot().get("telemetry_ingested", 0) for s in (a, b))
                 >= sum(after) + len(crashed), timeout=30, what="the crash events")
        _race([a, b], rid)
        wait_for(lambda: _actions(a, rid)["rollout.rollback"] == 1, timeout=10, what="rollback")
        time.sleep(0.5)
    finally:
        pub.close()
    actions = _actions(b, rid)
    assert actions["rollout.halt"] == 1 and actions["rollout.rollback"] == 1 and actions["rollout.advance"] == 1
    with a.admin as client:
        assert client.get(f"/api/v1/rollouts/{rid}").json()["state"] == "rolled_back"
