"""Phased rollouts end to end: real server, real database (both), real Mosquitto, simulated devices.

Telemetry goes device -> broker -> the server's shared subscription -> aggregates -> gate loop; the
rollout advances, completes, or halts and rolls back on what the devices report.
"""

from __future__ import annotations

from typing import Any

from tuf.api.metadata import Metadata, Root  # noqa: F401 - documents what director-root.json is

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push, wait_for
from tests.server.sim import Publisher, SimDevice, expected_phases

OLD = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}


def _fleet(server: LiveServer, n: int, prefix: str = "kiosk") -> list[SimDevice]:
    token = enrollment_token(server, uses=n)
    devices = []
    for i in range(n):
        d = SimDevice(server.url, f"{prefix}-{i:03d}")
        d.enroll(token)
        d.active = dict(OLD)
        assert d.checkin().status_code == 200
        devices.append(d)
    return devices


def _status(server: LiveServer, rollout_id: str) -> dict[str, Any]:
    with server.admin as client:
        return client.get(f"/api/v1/rollouts/{rollout_id}").json()


def _audit(server: LiveServer, rollout_id: str) -> list[dict[str, Any]]:
    with server.admin as client:
        return list(reversed(client.get(f"/api/v1/rollouts/{rollout_id}/audit").json()))


def _step(devices: list[SimDevice], pub: Publisher, director_root: bytes, target: str, committed: set[str],
          **window: Any) -> None:
    """One polling round of the fleet: check in, install what is assigned, report."""
    for d in devices:
        a = d.sync(director_root)
        if a is not None and a.bundle is not None and a.bundle["version"] == target and d.device_id not in committed:
            tgt = {k: a.bundle[k] for k in ("name", "version", "release_counter")}
            pub.event(d, "downloading", target=tgt)
            pub.event(d, "committed", target=tgt)
            committed.add(d.device_id)
        pub.window(d, **window)


def test_rollout_driven_through_all_phases_by_telemetry(mqtt_server: LiveServer, digits_bundles: dict,
                                                        session_keys: KeyStore) -> None:
    server = mqtt_server
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    assert push(server, digits_bundles["1.1.0"]).status_code == 201
    devices = _fleet(server, 24)
    pub = Publisher(server.broker, server.prefix, devices)  # each device on its own account, notify subscribed
    director_root = session_keys.director_root_path.read_bytes()
    with server.admin as client:
        r = client.post("/api/v1/rollouts", json={
            # min_devices = the fleet: each phase waits until every device of it reports on 1.1.0, so the
            # final one cannot complete before the last device's window is ingested (and credited)
            "bundle": {"name": "digits", "version": "1.1.0"}, "min_soak_s": 0.5, "min_devices": 24,
            "start": True, "reason": "new digits model"})
        assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]
    assert [p["percent"] for p in r.json()["phases"]] == [1, 10, 50, 100]
    committed: set[str] = set()
    try:
        def done() -> bool:
            _step(devices, pub, director_root, "1.1.0", committed)
            return _status(server, rollout_id)["state"] == "completed"

        wait_for(done, timeout=120, interval=0.2, what="the rollout to complete")
        wait_for(lambda: pub.notified >= committed, timeout=10, what="notices")
    finally:
        pub.close()
    status = _status(server, rollout_id)
    assert [p["status"] for p in status["phases"]] == ["done"] * 4
    assert status["target"]["devices_reporting"] == 24
    assert all(d.active["version"] == "1.1.0" for d in devices)
    assert committed == {d.device_id for d in devices}
    entries = _audit(server, rollout_id)
    actions = [(e["action"], e["actor"]) for e in entries]
    assert [a for a, _ in actions[:2]] == ["rollout.create", "rollout.start"]
    assert all(who.startswith("test-admin") for _, who in actions[:2])
    assert [a for a, who in actions if who == "system"] == ["rollout.advance"] * 3 + ["rollout.complete"]
    advances = [e for e in entries if e["action"] == "rollout.advance"]
    assert [(e["detail"]["phase_from"], e["detail"]["phase_to"]) for e in advances] == [(0, 1), (1, 2), (2, 3)]
    # a phase advances only on gates that have their data (no allow_unproven here)
    assert all(g["status"] in ("ok", "off") for e in advances for g in e["detail"]["gates"])
    # cohorts are the deterministic hash of (rollout, device)
    with server.admin as client:
        members = client.get(f"/api/v1/rollouts/{rollout_id}/devices").json()
    assert {m["device_id"]: m["phase"] for m in members} == expected_phases(rollout_id,
                                                                            [d.device_id for d in devices])
    # the control group: every device that reported on the old version before its phase opened (devices of
    # phases 0 and 1 may have been updated at their very first check-in)
    assert status["control"]["devices_reporting"] >= sum(1 for m in members if m["phase"] >= 2)


def test_crash_in_first_cohort_halts_and_rolls_back(mqtt_server: LiveServer, digits_bundles: dict,
                                                    session_keys: KeyStore) -> None:
    server = mqtt_server
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    assert push(server, digits_bundles["1.1.0"]).status_code == 201
    devices = _fleet(server, 20, prefix="crashy")
    director_root = session_keys.director_root_path.read_bytes()
    pub = Publisher(server.broker, server.prefix, devices)
    with server.admin as client:
        r = client.post("/api/v1/rollouts", json={
            "bundle": {"name": "digits", "version": "1.1.0"}, "phases": [50, 100], "min_soak_s": 3600,
            "gates": {"max_crash_rate": 0.05}, "start": True})
        assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]
    try:
        committed: set[str] = set()
        _step(devices, pub, director_root, "1.1.0", committed)
        first = [d for d in devices if d.device_id in committed]
        rest = [d for d in devices if d.device_id not in committed]
        assert len(first) >= 4 and rest, "both phases need devices for this test"
        assert _status(server, rollout_id)["state"] == "running"
        # one crash among the first phase's devices is within what a good release may show: noted, no halt
        pub.event(first[0], "crash", detail={"signal": 11, "phase": "serving"})

        def crash_gate() -> dict[str, Any]:
            return next(g for g in _status(server, rollout_id)["decision"]["gates"] if g["name"] == "crash_rate")

        wait_for(lambda: (crash_gate()["value"] or 0) > 0, timeout=30, what="the crash to be counted")
        assert _status(server, rollout_id)["state"] == "running" and crash_gate()["status"] == "ok"
        # the build crashes on every device that got it: the interval leaves no doubt
        for d in first[1:]:
            pub.event(d, "crash", detail={"signal": 11, "phase": "serving"})
        wait_for(lambda: _status(server, rollout_id)["state"] == "rolled_back", timeout=30, what="halt")
        wait_for(lambda: pub.notified >= committed, timeout=10, what="rollback notices")
        for d in first:
            a = d.sync(director_root)
            assert a is not None and a.bundle["version"] == "1.0.0" and a.info["reason"] == "rollback"
            assert a.info["rollout_id"] == rollout_id
        for d in rest:
            a = d.sync(director_root)
            assert a is None  # never got the new version, nothing changes for them
    finally:
        pub.close()
    status = _status(server, rollout_id)
    assert status["halt"]["breached"][0]["name"] == "crash_rate"
    assert status["halt"]["breached"][0]["value"] > 0.05 and status["halt"]["breached"][0]["lower"] > 0.05
    actions = [(e["action"], e["actor"]) for e in _audit(server, rollout_id)]
    assert actions[-2:] == [("rollout.halt", "system"), ("rollout.rollback", "system")]


def test_halt_rolls_back_to_the_last_committed_version_not_a_refused_one(mqtt_server: LiveServer,
                                                                        digits_bundles: dict,
                                                                        session_keys: KeyStore) -> None:
    """A: 1.0.0 completes. B: 1.1.0, which `refuser` fails to install and `taker` commits, is aborted.
    C: 1.2.0 halts on a crash and rolls back: each device goes back to what it last committed (refuser to
    1.0.0, never to the 1.1.0 it refused; taker to 1.1.0), not to its last assignment."""
    server = mqtt_server
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        assert push(server, digits_bundles[version]).status_code == 201
    token = enrollment_token(server, uses=2)
    refuser, taker = SimDevice(server.url, "refuser"), SimDevice(server.url, "taker")
    for d in (refuser, taker):
        d.enroll(token)
    director_root = session_keys.director_root_path.read_bytes()
    pub = Publisher(server.broker, server.prefix, [refuser, taker])
    client = server.admin

    def rollout(version: str, **extra: Any) -> str:
        r = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": version},
                                                  "phases": [100], "min_soak_s": 3600, "start": True, **extra})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    try:
        a = rollout("1.0.0")
        for d in (refuser, taker):
            assert d.sync(director_root).bundle["version"] == "1.0.0"
            assert d.checkin().status_code == 200  # reports 1.0.0 as its running bundle
        assert client.post(f"/api/v1/rollouts/{a}/advance", json={"reason": "done"}).json()["state"] == "completed"

        b = rollout("1.1.0")
        assert refuser.sync(director_root, install=False).bundle["version"] == "1.1.0"  # assigned, refused
        pub.event(refuser, "install_failed", target={"name": "digits", "version": "1.1.0", "release_counter": 2},
                  detail={"error": "DigestMismatchError", "phase": "verify"})

        def refusal_ingested() -> bool:  # the rollback target of a later rollout reads the device's own reports
            from sqlalchemy import select

            from update_server.models import TelemetryEvent
            with server.ctx.sessions() as session:
                return session.scalar(select(TelemetryEvent.id).where(
                    TelemetryEvent.device_id == "refuser", TelemetryEvent.event == "install_failed")) is not None

        wait_for(refusal_ingested, timeout=30, what="the refusal to be ingested")
        assert taker.sync(director_root).bundle["version"] == "1.1.0"
        for d in (refuser, taker):
            assert d.checkin().status_code == 200
        assert refuser.active["version"] == "1.0.0" and taker.active["version"] == "1.1.0"
        assert client.post(f"/api/v1/rollouts/{b}/abort", json={"reason": "bad"}).json()["state"] == "aborted"
        devices = {d["device_id"]: d for d in client.get("/api/v1/devices").json()["devices"]}
        assert devices["refuser"]["assigned"]["version"] == "1.1.0"  # still assigned what it refused
        assert devices["refuser"]["active"]["version"] == "1.0.0"

        c = rollout("1.2.0", gates={"max_crash_rate": 0.05, "false_halt_rate": 0.2})
        targets = {m["device_id"]: m["rollback_version"] for m in client.get(f"/api/v1/rollouts/{c}/devices").json()}
        assert targets == {"refuser": "1.0.0", "taker": "1.1.0"}  # shown before any rollback
        for d in (refuser, taker):
            a12 = d.sync(director_root)
            assert a12 is not None and a12.bundle["version"] == "1.2.0"
            pub.event(d, "committed", target={k: a12.bundle[k] for k in ("name", "version", "release_counter")})

        def reporting() -> bool:  # windows until both count on rollout C's target (the ingester's view of the
            for d in (refuser, taker):  # rollout membership is refreshed every half second)
                pub.window(d)
            return bool(client.get(f"/api/v1/rollouts/{c}").json()["target"]["devices_reporting"] == 2)

        wait_for(reporting, timeout=60, interval=0.3, what="both devices reporting on 1.2.0")
        for d in (refuser, taker):  # both crash: with false_halt_rate 0.2 two devices of two can halt the gate
            pub.event(d, "crash", detail={"signal": 11, "phase": "serving"})
        wait_for(lambda: client.get(f"/api/v1/rollouts/{c}").json()["state"] == "rolled_back", timeout=60,
                 what="the crash to halt and roll back rollout C")
        back = {d.device_id: d.sync(director_root) for d in (refuser, taker)}
        assert back["refuser"].bundle["version"] == "1.0.0" and back["refuser"].info["reason"] == "rollback"
        assert back["taker"].bundle["version"] == "1.1.0" and back["taker"].info["reason"] == "rollback"
        members = {m["device_id"]: m["assigned_version"]
                   for m in client.get(f"/api/v1/rollouts/{c}/devices").json()}
        assert members == {"refuser": "1.0.0", "taker": "1.1.0"}
    finally:
        pub.close()
        client.close()
