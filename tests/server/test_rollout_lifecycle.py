"""Manual rollout control on both databases: cohorts stable across pause/resume, late enrollment, conflicts,
illegal transitions, and the audit trail (who and why)."""

from __future__ import annotations

from typing import Any

import httpx

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push
from tests.server.sim import SimDevice, expected_phases
from update_server.rollout_policy import PhaseSpec, cohort_bucket, phase_of

PHASES = [PhaseSpec(p, 0, 0) for p in (1, 10, 50, 100)]


def _members(client: httpx.Client, rollout_id: str) -> dict[str, dict[str, Any]]:
    return {m["device_id"]: m for m in client.get(f"/api/v1/rollouts/{rollout_id}/devices").json()}


def _act(client: httpx.Client, rollout_id: str, action: str, reason: str) -> httpx.Response:
    return client.post(f"/api/v1/rollouts/{rollout_id}/{action}", json={"reason": reason})


def test_cohorts_stable_across_pause_resume_and_late_enrollment(server: LiveServer, digits_bundles: dict,
                                                               session_keys: KeyStore) -> None:
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    assert push(server, digits_bundles["1.1.0"]).status_code == 201
    token = enrollment_token(server, uses=200, group="berlin")
    fleet = [SimDevice(server.url, f"k-{i:03d}") for i in range(60)]
    for d in fleet:
        d.enroll(token)
    other = SimDevice(server.url, "munich-1")
    other.enroll(enrollment_token(server, group="munich"))
    director_root = session_keys.director_root_path.read_bytes()
    client = server.admin
    r = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.1.0"},
                                              "selector": {"group": "berlin"}, "min_soak_s": 3600})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert r.json()["state"] == "created"
    before = _members(client, rid)
    assert set(before) == {d.device_id for d in fleet}  # the munich device is not selected
    assert {k: m["phase"] for k, m in before.items()} == expected_phases(rid, list(before))
    assert _act(client, rid, "start", "go").status_code == 200
    assert _act(client, rid, "advance", "phase 0 looked fine").json()["current_phase"] == 1
    assert _act(client, rid, "advance", "skip ahead").json()["current_phase"] == 2
    assigned = {d.device_id for d in fleet if (a := d.sync(director_root)) and a.bundle}
    assert assigned == {k for k, m in before.items() if m["phase"] <= 2}
    assert 0 < len(assigned) < len(fleet)

    assert _act(client, rid, "pause", "investigating a ticket").json()["state"] == "paused"
    assert _act(client, rid, "pause", "twice").status_code == 409
    assert _act(client, rid, "resume", "ticket unrelated").json()["state"] == "running"
    after = _members(client, rid)
    assert {k: (m["bucket"], m["phase"]) for k, m in after.items()} == {
        k: (m["bucket"], m["phase"]) for k, m in before.items()}
    for d in fleet:  # nothing changed for anyone: same assignment version
        version = d.last_version
        d.sync(director_root)
        assert d.last_version == version

    # devices enrolling mid-rollout land in the phase of their bucket
    late = [SimDevice(server.url, f"late-{i:03d}") for i in range(30)]
    for d in late:
        d.enroll(token)
    members = _members(client, rid)
    for d in late:
        phase = phase_of(cohort_bucket(rid, d.device_id), PHASES)
        assert members[d.device_id]["phase"] == phase
        a = d.sync(director_root)
        assert (a is not None and a.bundle is not None and a.bundle["version"] == "1.1.0") == (phase <= 2)
    assert other.sync(director_root) is None

    # one active rollout per device set and model
    clash = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"},
                                                  "selector": {"device_ids": ["k-001", "munich-1"]}})
    assert clash.status_code == 409 and clash.json()["error"]["detail"]["rollouts"] == [rid]
    ok = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"},
                                               "selector": {"group": "munich"}})
    assert ok.status_code == 201

    assert _act(client, rid, "abort", "superseded").json()["state"] == "aborted"
    assert _act(client, rid, "resume", "no").status_code == 409
    assert _act(client, rid, "explode", "no").status_code == 400
    assert client.post("/api/v1/rollouts/r-nope/pause", json={}).status_code == 404
    log = list(reversed(client.get(f"/api/v1/rollouts/{rid}/audit").json()))
    assert [(e["action"], e["reason"]) for e in log] == [
        ("rollout.create", ""), ("rollout.start", "go"), ("rollout.advance", "phase 0 looked fine"),
        ("rollout.advance", "skip ahead"), ("rollout.pause", "investigating a ticket"),
        ("rollout.resume", "ticket unrelated"), ("rollout.abort", "superseded")]
    assert all(e["actor"].startswith("test-admin") for e in log)
    client.close()


def test_manual_rollback_and_unknown_bundle(server: LiveServer, digits_bundles: dict, session_keys: KeyStore) -> None:
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    assert push(server, digits_bundles["1.1.0"]).status_code == 201
    token = enrollment_token(server)
    d = SimDevice(server.url, "solo")
    d.enroll(token)
    d.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}
    d.checkin()
    director_root = session_keys.director_root_path.read_bytes()
    with server.admin as client:
        assert client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "7.0.0"}}
                           ).status_code == 404
        assert client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.1.0"},
                                                      "phases": [50, 40]}).status_code == 400
        r = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.1.0"},
                                                  "phases": [100], "min_soak_s": 3600, "start": True})
        rid = r.json()["id"]
        a1 = d.sync(director_root)
        assert a1.bundle["version"] == "1.1.0" and a1.info["reason"] == "rollout"
        assert _act(client, rid, "rollback", "customer complaint").json()["state"] == "rolled_back"
        a2 = d.sync(director_root)
        assert a2.bundle["version"] == "1.0.0" and a2.info["reason"] == "rollback" and a2.version > a1.version
