"""Enrollment, check-in, assignments and the credential boundaries, over real HTTP on both databases."""

from __future__ import annotations

import httpx

from tests.server.conftest import LiveServer, enrollment_token, push
from tests.server.sim import SimDevice


def test_enroll_checkin_inventory(server: LiveServer) -> None:
    token = enrollment_token(server, uses=1, group="berlin", tags={"site": "b1"})
    device = SimDevice(server.url, "kiosk-0042")
    body = device.enroll(token, tags={"floor": "2"})
    assert body["device_id"] == "kiosk-0042" and body["credential"].startswith("epd_")
    assert body["image_repo_url"] == f"{server.url}/tuf/image/"
    assert body["mqtt"]["topic_prefix"] == f"{server.prefix}/kiosk-0042"
    device.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}
    r = device.checkin()
    assert r.status_code == 200 and r.json()["assignment"] is None and r.json()["poll_interval_s"] == 1
    assert httpx.get(f"{server.url}/api/v1/devices/kiosk-0042/assignment", headers=device.auth).status_code == 204
    with server.admin as client:
        inv = client.get("/api/v1/devices/kiosk-0042").json()
        assert inv["group"] == "berlin" and inv["tags"] == {"floor": "2", "site": "b1"}
        assert inv["active"]["version"] == "1.0.0" and inv["agent_version"] == "0.1.0"
        assert inv["runtimes"] == {"onnxruntime": "1.32.0"} and inv["last_seen_at"]
        listed = client.get("/api/v1/devices", params={"group": "berlin", "tag": "site=b1"}).json()
        assert listed["total"] == 1
        assert client.get("/api/v1/devices", params={"tag": "site=other"}).json()["total"] == 0
        assert client.get("/api/v1/devices/nope").status_code == 404
        patched = client.patch("/api/v1/devices/kiosk-0042", json={"group": "munich"}).json()
        assert patched["group"] == "munich"
    # the token was single use; the device id is taken
    again = httpx.post(f"{server.url}/api/v1/devices/enroll", json={
        "enrollment_token": token, "device_id": "kiosk-0043", "hardware_id": "x86-kiosk"})
    assert again.status_code == 401
    taken = httpx.post(f"{server.url}/api/v1/devices/enroll", json={
        "enrollment_token": enrollment_token(server), "device_id": "kiosk-0042", "hardware_id": "x86-kiosk"})
    assert taken.status_code == 409
    invalid = httpx.post(f"{server.url}/api/v1/devices/enroll", json={
        "enrollment_token": enrollment_token(server), "device_id": "../etc", "hardware_id": "x86-kiosk"})
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_request"


def test_device_cannot_read_another_devices_assignment(server: LiveServer, digits_bundles: dict) -> None:
    assert push(server, digits_bundles["1.0.0"]).status_code == 201
    token = enrollment_token(server)
    a, b = SimDevice(server.url, "dev-a"), SimDevice(server.url, "dev-b")
    a.enroll(token)
    b.enroll(token)
    assert a.credential != b.credential
    with server.admin as client:
        r = client.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"},
                                                  "phases": [100], "start": True})
        assert r.status_code == 201, r.text
    own = a.http.get("/api/v1/devices/dev-a/assignment", headers=a.auth)
    assert own.status_code == 200 and b'"dev-a"' in own.content
    other = a.http.get("/api/v1/devices/dev-b/assignment", headers=a.auth)
    assert other.status_code == 403 and b"dev-b" not in other.content
    assert a.http.post("/api/v1/devices/dev-b/checkin", headers=a.auth, json={}).status_code == 403
    bad = {"Authorization": "Bearer epd_not-a-credential"}
    assert a.http.get("/api/v1/devices/dev-a/assignment", headers=bad).status_code == 401
    assert a.http.get("/api/v1/devices/dev-a/assignment").status_code == 401
    # a device credential reaches no admin endpoint
    for method, path in (("GET", "/api/v1/devices"), ("GET", "/api/v1/bundles"), ("POST", "/api/v1/rollouts"),
                         ("GET", "/api/v1/rollouts"), ("POST", "/api/v1/admin/enrollment-tokens"),
                         ("GET", "/api/v1/admin/tokens")):
        assert a.http.request(method, path, headers=a.auth, json={}).status_code == 403, path
    # the archive is readable by any enrolled device (sideloading)
    assert a.http.get("/api/v1/bundles/digits/1.0.0/archive", headers=a.auth).status_code == 200


def test_roles(server: LiveServer) -> None:
    with server.admin as client:
        viewer = client.post("/api/v1/admin/tokens", json={"name": "ci", "role": "viewer"}).json()
        operator = client.post("/api/v1/admin/tokens", json={"name": "ops", "role": "operator"}).json()
    v = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {viewer['token']}"})
    o = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {operator['token']}"})
    assert v.get("/api/v1/bundles").status_code == 200
    assert v.post("/api/v1/admin/enrollment-tokens", json={}).status_code == 403
    assert o.post("/api/v1/admin/enrollment-tokens", json={}).status_code == 201
    assert o.post("/api/v1/admin/tokens", json={"name": "x"}).status_code == 403
    assert o.get("/api/v1/rollouts/r-unknown").status_code == 404
    with server.admin as client:
        assert client.delete(f"/api/v1/admin/tokens/{viewer['id']}").status_code == 204
        log = client.get("/api/v1/audit").json()
        assert {"token.create", "token.revoke", "enrollment_token.create"} <= {e["action"] for e in log}
    assert v.get("/api/v1/bundles").status_code == 401
    assert httpx.get(f"{server.url}/api/v1/bundles").status_code == 401
