"""Broker accounts and ACLs (Mosquitto dynamic security), tried the way an attacker on the broker would: with
independent clients (``mosquitto_pub``, paho), without credentials and with a real device's credentials.

The server under test runs against this worker's TLS + dynamic-security broker; each device enrolled through
the real HTTP API and got its own broker account.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.server.conftest import LiveServer, enrollment_token, wait_for
from tests.server.sim import Publisher, SimDevice

pytestmark = pytest.mark.mqtt

@pytest.fixture
def auth_server(make_server: Callable[..., LiveServer], session_broker: Any, tmp_path: Path) -> LiveServer:
    """A server (SQLite) on this worker's TLS + dynamic-security broker, with topics and accounts of its own."""
    return make_server(f"sqlite:///{tmp_path / 'server.db'}", broker=session_broker,
                       prefix=f"edgepack-acl-{uuid.uuid4().hex[:8]}/v1/devices")


OLD = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}


class Client:
    """An independent MQTT 5 client (paho) that records what the broker answers."""

    def __init__(self, broker: Any, *, client_id: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self.broker = broker
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"x-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.tls_set(ca_certs=str(broker.ca_file))
        self.connack: str | None = None
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.disconnects: list[str] = []
        self.subacks: dict[int, str] = {}
        self.pubacks: dict[int, str] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, rc, p: (self.disconnects.append(str(rc)), self.connected.clear())
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, str(rcs[0]))
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, str(rc))
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = str(reason)
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def connect(self) -> Client:
        url = urlparse(self.broker.url)
        self.client.connect(url.hostname, url.port)
        self.client.loop_start()
        assert self.answered.wait(10), "no CONNACK"
        return self

    def subscribe(self, topic: str) -> str:
        _, mid = self.client.subscribe(topic, qos=1)
        wait_for(lambda: mid in self.subacks, timeout=10, what=f"SUBACK for {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes | dict[str, Any]) -> str:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1)
        wait_for(lambda: info.mid in self.pubacks, timeout=10, what=f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _device(server: LiveServer, device_id: str, token: str) -> SimDevice:
    d = SimDevice(server.url, device_id)
    body = d.enroll(token)
    assert body["mqtt"]["username"] and body["mqtt"]["password"].startswith("epm_")
    assert body["mqtt"]["client_id"] == f"edgepack-dev-{device_id}"
    d.active = dict(OLD)
    return d


def _as(server: LiveServer, d: SimDevice, **kw: Any) -> Client:
    return Client(server.broker, client_id=kw.pop("client_id", d.mqtt["client_id"]), username=d.mqtt["username"],
                  password=kw.pop("password", d.mqtt["password"])).connect()


def _ingested(server: LiveServer) -> int:
    return int(server.ctx.counters.snapshot().get("telemetry_ingested", 0))


def test_anonymous_and_wrong_password_are_refused(auth_server: LiveServer) -> None:
    server = auth_server
    d = _device(server, "acl-anon", enrollment_token(server))
    url = urlparse(server.broker.url)
    # mosquitto_pub, no credentials: the broker refuses the connection
    anon = subprocess.run(["mosquitto_pub", "-h", url.hostname, "-p", str(url.port), "--cafile",
                           str(server.broker.ca_file), "-V", "mqttv5", "-q", "1",
                           "-t", f"{server.prefix}/acl-anon/telemetry/window", "-m", "{}"],
                          capture_output=True, text=True, timeout=30)
    assert anon.returncode != 0 and "not authori" in (anon.stderr + anon.stdout).lower()
    anonymous = Client(server.broker).connect()
    assert anonymous.connack == "Not authorized" and not anonymous.connected.is_set()
    anonymous.close()
    wrong = _as(server, d, password="epm_guessed")
    assert wrong.connack in ("Bad user name or password", "Not authorized") and not wrong.connected.is_set()
    wrong.close()
    right = _as(server, d)
    assert right.connack == "Success"
    right.close()


def test_device_cannot_publish_as_another_device(auth_server: LiveServer) -> None:
    server = auth_server
    token = enrollment_token(server, uses=2)
    a, b = _device(server, "acl-a", token), _device(server, "acl-b", token)
    pub = Publisher(server.broker, server.prefix, [a, b])
    forged = pub.envelope(b, "window", b.active)
    forged["window"] = {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:01:00Z", "requests": 100,
                        "errors": 0, "crashes": 0, "feedback": {"count": 1_000_000, "correct": 1_000_000}}
    attacker = _as(server, a)
    try:
        # A, with valid credentials, on B's topic: the broker refuses it (PUBACK reason 0x87, which the
        # publisher sees; mosquitto logs "Denied PUBLISH" at debug level) and never delivers it
        assert attacker.publish(f"{server.prefix}/acl-b/telemetry/window", forged) == "Not authorized"
        assert attacker.publish(f"{server.prefix}/acl-b/telemetry/event", forged) == "Not authorized"
        assert attacker.publish("edgepack/v1/devices/acl-b/telemetry/window", forged) == "Not authorized"
        # A's own session stays usable, and B's own telemetry still arrives
        assert attacker.connected.is_set()
        pub.window(b, requests=7)
        wait_for(lambda: _ingested(server) >= 1, timeout=30, what="B's own window")
        assert attacker.publish(f"{server.prefix}/acl-a/telemetry/window",
                                pub.envelope(a, "window", a.active) | {"window": {
                                    "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:01:00Z",
                                    "requests": 3, "errors": 0}}) == "Success"
        wait_for(lambda: _ingested(server) >= 2, timeout=30, what="A's own window")
    finally:
        attacker.close()
        pub.close()
    assert _ingested(server) == 2  # the forged messages never reached the ingester


def test_devices_can_neither_send_notices_nor_read_other_devices(auth_server: LiveServer) -> None:
    server = auth_server
    token = enrollment_token(server, uses=2)
    a, b = _device(server, "acl-n1", token), _device(server, "acl-n2", token)
    victim = _as(server, b)
    attacker = _as(server, a)
    try:
        assert victim.subscribe(f"{server.prefix}/acl-n2/notify") == "Granted QoS 1"
        notice = {"schema": "edgepack.notify.v1", "type": "checkin", "reason": "assignment_changed",
                  "message_id": uuid.uuid4().hex}
        # only the server publishes notices: not another device, not the device to itself
        assert attacker.publish(f"{server.prefix}/acl-n2/notify", notice) == "Not authorized"
        assert victim.publish(f"{server.prefix}/acl-n2/notify", notice) == "Not authorized"
        # a device subscribes to its own notify topic only, and literally (no wildcards, no telemetry)
        for topic in (f"{server.prefix}/acl-n2/notify", f"{server.prefix}/+/notify", f"{server.prefix}/#", "#",
                      f"{server.prefix}/acl-n2/telemetry/#", f"$share/g/{server.prefix}/+/telemetry/#"):
            assert attacker.subscribe(topic) == "Not authorized", topic
        # a notice from the server does reach the device
        server.ctx.notify(["acl-n2"])
        wait_for(lambda: victim.messages, timeout=10, what="the server's notice")
    finally:
        attacker.close()
        victim.close()
    assert [t for t, _ in victim.messages] == [f"{server.prefix}/acl-n2/notify"]


def test_device_credentials_are_bound_to_the_devices_client_id(auth_server: LiveServer) -> None:
    """Valid credentials with another device's client id would take over that device's session: refused."""
    server = auth_server
    token = enrollment_token(server, uses=2)
    a, b = _device(server, "acl-c1", token), _device(server, "acl-c2", token)
    victim = _as(server, b)
    thief = _as(server, a, client_id=b.mqtt["client_id"])
    try:
        assert thief.connack == "Not authorized"
        assert victim.connected.is_set() and not victim.disconnects
    finally:
        thief.close()
        victim.close()


def test_enrollment_is_refused_whole_while_the_broker_is_down(make_server: Callable[..., LiveServer],
                                                              private_broker: Any, tmp_path: Path) -> None:
    """A broker error refuses the enrollment and leaves nothing behind: no device, the token still has its
    use; the same request succeeds once the broker is back."""
    server = make_server(f"sqlite:///{tmp_path / 'server.db'}", broker=private_broker, broker_admin_timeout_s=1.0)
    token = enrollment_token(server, uses=1)
    private_broker.stop()
    d = SimDevice(server.url, "acl-outage")
    body = {"enrollment_token": token, "device_id": "acl-outage", "hardware_id": "x86-kiosk"}
    refused = d.http.post("/api/v1/devices/enroll", json=body)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "broker_unavailable"
    assert "nothing was enrolled" in refused.json()["error"]["message"]
    with server.admin as admin:
        assert admin.get("/api/v1/devices/acl-outage").status_code == 404
    private_broker.start()
    d.enroll(token)  # the same single-use token: it was not spent
    device = _as(server, d)
    assert device.connack == "Success"
    device.close()


def _revoke(server: LiveServer, device_id: str) -> Any:
    from typer.testing import CliRunner

    from tests.server.test_cli import _app

    return CliRunner().invoke(_app(), ["devices", "revoke", device_id, "--reason", "stolen"],
                              env={"EDGEPACK_SERVER": server.url, "EDGEPACK_TOKEN": server.token})


def test_revoked_device_is_disconnected_at_once_and_stays_out(auth_server: LiveServer) -> None:
    server = auth_server
    token = enrollment_token(server, uses=2)
    d, other = _device(server, "acl-stolen", token), _device(server, "acl-other", token)
    connected, bystander = _as(server, d), _as(server, other)
    assert connected.subscribe(f"{server.prefix}/acl-stolen/notify") == "Granted QoS 1"
    assert d.checkin().status_code == 200
    result = _revoke(server, "acl-stolen")
    assert result.exit_code == 0, result.output
    assert "revoked acl-stolen" in result.output
    wait_for(lambda: connected.disconnects, timeout=10, what="the broker to disconnect the revoked device")
    assert connected.disconnects[0] == "Administrative action"
    connected.close()
    again = _as(server, d)
    assert again.connack != "Success" and not again.connected.is_set()
    again.close()
    checkin = d.checkin()
    assert checkin.status_code == 401 and checkin.json()["error"]["code"] == "device_revoked"
    reenroll = d.http.post("/api/v1/devices/enroll", json={
        "enrollment_token": enrollment_token(server), "device_id": "acl-stolen", "hardware_id": "x86-kiosk"})
    assert reenroll.status_code == 409 and reenroll.json()["error"]["code"] == "device_revoked"
    with server.admin as admin:
        view = admin.get("/api/v1/devices/acl-stolen").json()
        audit = admin.get("/api/v1/audit").json()
    assert view["revoked_at"] is not None
    assert any(e["action"] == "device.revoke" and e["reason"] == "stolen" for e in audit)
    assert bystander.connected.is_set() and not bystander.disconnects  # nobody else was touched
    assert _revoke(server, "acl-stolen").exit_code == 0  # idempotent
    bystander.close()


def test_revocation_the_broker_missed_is_completed_by_revoking_again(make_server: Callable[..., LiveServer],
                                                                    private_broker: Any, tmp_path: Path) -> None:
    server = make_server(f"sqlite:///{tmp_path / 'server.db'}", broker=private_broker, broker_admin_timeout_s=1.0)
    d = _device(server, "acl-late", enrollment_token(server))
    private_broker.stop()
    result = _revoke(server, "acl-late")
    assert result.exit_code == 1 and "503" in result.output and "Revoke it again" in result.output
    assert d.checkin().status_code == 401  # the HTTP side is revoked already
    private_broker.start()
    device = _as(server, d)  # the broker still has the account...
    assert device.connack == "Success"
    assert _revoke(server, "acl-late").exit_code == 0  # ...until the revocation is repeated
    wait_for(lambda: device.disconnects, timeout=10, what="the late disconnect")
    device.close()
    late = _as(server, d)
    assert late.connack != "Success"
    late.close()


def test_accounts_provisioned_before_the_broker_starts_behave_like_enrolled_ones(tmp_path: Path) -> None:
    """``MosquittoBroker(devices=N)`` (benchmarks) writes the same accounts and ACLs the server creates."""
    from edgepack._local import MosquittoBroker

    broker = MosquittoBroker(tmp_path / "broker", persistence=False, devices=["pre-1", "pre-2"]).start()
    try:
        one, two = broker.device_accounts["pre-1"], broker.device_accounts["pre-2"]
        device = Client(broker, client_id=one.client_id, username=one.username, password=one.password).connect()
        other = Client(broker, client_id=two.client_id, username=two.username, password=two.password).connect()
        ingest = Client(broker, username="edgepack-ingest", password=broker.ingest_password).connect()
        assert ingest.subscribe("$share/edgepack-server/edgepack/v1/devices/+/telemetry/#") == "Granted QoS 1"
        assert device.publish("edgepack/v1/devices/pre-1/telemetry/window", b"{}") == "Success"
        assert device.publish("edgepack/v1/devices/pre-2/telemetry/window", b"{}") == "Not authorized"
        assert other.subscribe("edgepack/v1/devices/pre-1/notify") == "Not authorized"
        wait_for(lambda: ingest.messages, timeout=10, what="the device's own message")
        assert [t for t, _ in ingest.messages] == ["edgepack/v1/devices/pre-1/telemetry/window"]
        for c in (device, other, ingest):
            c.close()
    finally:
        broker.close()


def test_a_leftover_broker_account_is_replaced_at_enrollment(auth_server: LiveServer) -> None:
    """A broker account of an id the database does not know (left by an enrollment whose commit failed after
    the broker said yes) is replaced when that id enrolls: the old password stops working."""
    server = auth_server
    accounts = server.ctx.broker
    stale = accounts.add_device("acl-stale", "epm_left-over-password")
    d = _device(server, "acl-stale", enrollment_token(server))
    assert d.mqtt["username"] == stale.username
    old = Client(server.broker, client_id=stale.client_id, username=stale.username,
                 password=stale.password).connect()
    assert old.connack != "Success"
    old.close()
    new = _as(server, d)
    assert new.connack == "Success"
    new.close()
