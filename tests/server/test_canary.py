"""The first phase of a rollout is never empty: 1 % of a small fleet still gets one canary device."""

from __future__ import annotations

from tests.server.conftest import LiveServer, enrollment_token, push
from tests.server.sim import SimDevice


def test_first_phase_holds_a_device_even_when_one_percent_rounds_to_none(server: LiveServer,
                                                                          digits_bundles: dict) -> None:
    token = enrollment_token(server, uses=12)
    for i in range(12):
        SimDevice(server.url, f"canary-{i:02d}").enroll(token)
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    with server.admin as admin:
        r = admin.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"},
                                                 "selector": {}, "phases": [1, 10, 50, 100], "start": False})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        first = admin.get(f"/api/v1/rollouts/{rid}").json()["phases"][0]
        assert first["devices"] == 1
        # The canary is fixed with the membership: pausing and resuming does not move it.
        assert admin.post(f"/api/v1/rollouts/{rid}/start", json={"reason": "go"}).status_code == 200
        assert admin.post(f"/api/v1/rollouts/{rid}/pause", json={"reason": "look"}).status_code == 200
        assert admin.post(f"/api/v1/rollouts/{rid}/resume", json={"reason": "on"}).status_code == 200
        assert admin.get(f"/api/v1/rollouts/{rid}").json()["phases"][0]["devices"] == 1


def test_canary_devices_puts_the_lowest_buckets_in_the_first_phase(server: LiveServer, digits_bundles: dict) -> None:
    """A 1-device canary cannot show a crash rate above 5 %: the status says how many devices the crash gate
    needs, and canary_devices gives the first phase that many (the members with the lowest buckets)."""
    token = enrollment_token(server, uses=12)
    for i in range(12):
        SimDevice(server.url, f"canary3-{i:02d}").enroll(token)
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    with server.admin as admin:
        r = admin.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"},
                                                 "phases": [1, 10, 50, 100], "canary_devices": 3})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        status = admin.get(f"/api/v1/rollouts/{rid}").json()
        assert status["phases"][0]["devices"] == 3 and status["devices_to_halt"] == 3
        members = admin.get(f"/api/v1/rollouts/{rid}/devices").json()
        lowest = sorted(members, key=lambda m: m["bucket"])[:3]
        assert all(m["phase"] == 0 for m in lowest)
        refused = admin.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"},
                                                       "selector": {"device_ids": ["canary3-00"]}, "canary_devices": 0})
        assert refused.status_code in (400, 422), refused.text
