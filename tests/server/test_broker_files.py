"""The ``files`` backend (a mosquitto password file + ACL file the server rewrites, for brokers without the
dynamic-security plugin), against a real mosquitto reading those files: the same attacks as with dynamic
security are refused, revocation disconnects, the files regenerate from the database."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.server.conftest import LiveServer, enrollment_token, wait_for
from tests.server.sim import Publisher, SimDevice
from tests.server.test_broker_auth import OLD, Client
from tests.support import services
from update_server.broker.passwords import PasswordHash

pytestmark = pytest.mark.mqtt


def test_password_hashes_are_mosquittos(tmp_path: Path) -> None:
    """What `mosquitto_passwd` writes verifies here, and what is written here mosquitto accepts (below)."""
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "pw"), "alice", "s3cret"], check=True,
                   capture_output=True)
    entry = (tmp_path / "pw").read_text().strip().split(":", 1)[1]
    hashed = PasswordHash.parse(entry)
    assert hashed.verify("s3cret") and not hashed.verify("s3cret!")
    ours = PasswordHash.of("s3cret")
    assert PasswordHash.parse(ours.password_file_entry()) == ours
    assert ours.dynsec_fields()["iterations"] == 101
    with pytest.raises(ValueError, match=r"not a mosquitto \$7\$"):
        PasswordHash.parse("$6$abc$def")


@pytest.fixture
def files_broker() -> Iterator[services.Mosquitto]:
    with services.mosquitto(auth="files") as broker:
        yield broker


@pytest.fixture
def files_server(make_server: Callable[..., LiveServer], files_broker: Any, tmp_path: Path) -> LiveServer:
    return make_server(f"sqlite:///{tmp_path / 'server.db'}", broker=files_broker,
                       prefix=f"edgepack-files-{uuid.uuid4().hex[:8]}/v1/devices")


def _device(server: LiveServer, device_id: str, token: str) -> SimDevice:
    d = SimDevice(server.url, device_id)
    body = d.enroll(token)
    assert body["mqtt"]["password"].startswith("epm_")
    d.active = dict(OLD)
    return d


def _as(server: LiveServer, d: SimDevice) -> Client:
    return Client(server.broker, client_id=d.mqtt["client_id"], username=d.mqtt["username"],
                  password=d.mqtt["password"]).connect()


def test_files_backend_refuses_what_dynamic_security_refuses(files_server: LiveServer) -> None:
    server = files_server
    token = enrollment_token(server, uses=2)
    a, b = _device(server, "f-a", token), _device(server, "f-b", token)
    assert f"user {a.mqtt['username']}\n" in (server.broker.files_dir / "acl").read_text()
    anonymous = Client(server.broker).connect()
    assert anonymous.connack == "Not authorized"
    anonymous.close()
    pub = Publisher(server.broker, server.prefix, [b])
    attacker = _as(server, a)  # A's own connection (its client id), used for A's attempts and its own telemetry
    try:
        assert attacker.publish(f"{server.prefix}/f-b/telemetry/window", {"forged": True}) == "Not authorized"
        assert attacker.publish(f"{server.prefix}/f-b/notify", {"forged": True}) == "Not authorized"
        # mosquitto's ACL file grants any subscription but checks every delivery: A's eavesdropping
        # subscriptions receive nothing of B's (dynamic security refuses them outright)
        for topic in (f"{server.prefix}/f-b/notify", f"{server.prefix}/+/notify", "#"):
            attacker.subscribe(topic)
        own = pub.envelope(a, "window", a.active) | {"window": {"start": "2026-01-01T00:00:00Z",
                                                               "end": "2026-01-01T00:01:00Z", "requests": 5,
                                                               "errors": 0}}
        assert attacker.publish(f"{server.prefix}/f-a/telemetry/window", own) == "Success"
        pub.window(b, requests=6)
        wait_for(lambda: server.ctx.counters.snapshot().get("telemetry_ingested", 0) == 2, timeout=30,
                 what="both devices' own windows")
        server.ctx.notify(["f-b"])
        wait_for(lambda: "f-b" in pub.notified, timeout=10, what="the server's notice")
        # a round trip on A's connection: anything the broker queued for A before it has arrived by now
        assert attacker.publish(f"{server.prefix}/f-a/telemetry/event", b"{}") == "Success"
        assert attacker.messages == []
    finally:
        attacker.close()
        pub.close()


def test_files_backend_revocation_and_regeneration(files_server: LiveServer, tmp_path: Path) -> None:
    from update_server import cli as server_cli

    server = files_server
    token = enrollment_token(server, uses=2)
    a, b = _device(server, "f-gone", token), _device(server, "f-kept", token)
    connected = _as(server, a)
    with server.admin as admin:
        assert admin.post("/api/v1/devices/f-gone/revoke", json={"reason": "lost"}).status_code == 200
    wait_for(lambda: connected.disconnects, timeout=10, what="the broker to drop the revoked device")
    connected.close()
    assert _as(server, a).connack != "Success"
    # the files are lost; the database regenerates them
    files = server.broker.files_dir
    (files / "passwd").write_text("")
    (files / "acl").write_text("")
    server.broker.reload()
    s = server.ctx.settings
    env = {"EDGEPACK_DATABASE_URL": s.effective_database_url, "EDGEPACK_KEYS_DIR": str(s.keys_dir),
           "EDGEPACK_MQTT_URL": s.mqtt_url, "EDGEPACK_BROKER_AUTH": "files",
           "EDGEPACK_BROKER_FILES_DIR": str(files), "EDGEPACK_BROKER_RELOAD_COMMAND": s.broker_reload_command,
           "EDGEPACK_BROKER_ADMIN_PASSWORD": s.broker_admin_password, "EDGEPACK_MQTT_PASSWORD": s.mqtt_password,
           "EDGEPACK_MQTT_USERNAME": s.mqtt_username, "EDGEPACK_MQTT_TOPIC_PREFIX": s.mqtt_topic_prefix,
           "EDGEPACK_MQTT_SHARE_GROUP": s.mqtt_share_group, "EDGEPACK_BROKER_ACCOUNT_PREFIX": s.broker_account_prefix}
    result = CliRunner().invoke(server_cli.app, ["broker", "write-files"], env=env)
    assert result.exit_code == 0 and "wrote 1 device account(s)" in result.output, result.output
    kept = _as(server, b)
    assert kept.connack == "Success"
    kept.close()
    assert _as(server, a).connack != "Success"


def test_enrollment_is_refused_whole_when_the_broker_cannot_reload(files_server: LiveServer) -> None:
    """The broker is down, so the reload command fails: the enrollment is refused, the files are restored,
    the token keeps its use; once the broker is back the same request succeeds."""
    server, broker = files_server, files_server.broker
    token = enrollment_token(server, uses=1)
    before = (broker.files_dir / "passwd").read_text()
    broker.stop()
    d = SimDevice(server.url, "f-half")
    body = {"enrollment_token": token, "device_id": "f-half", "hardware_id": "x86-kiosk"}
    r = d.http.post("/api/v1/devices/enroll", json=body)
    assert r.status_code == 503 and "broker_reload_command" in r.json()["error"]["message"], r.text
    assert (broker.files_dir / "passwd").read_text() == before
    with server.admin as admin:
        assert admin.get("/api/v1/devices/f-half").status_code == 404
    broker.start()
    d.enroll(token)
    device = _as(server, d)
    assert device.connack == "Success"
    device.close()


def test_broker_init_for_the_files_backend_starts_a_working_broker(tmp_path: Path) -> None:
    from edgepack import tls
    from update_server import cli as server_cli
    from update_server.broker.setup import current_user

    tls.init(tmp_path / "tls", hosts=["127.0.0.1"])
    port = services.free_port()
    made = CliRunner().invoke(server_cli.app, [
        "broker", "init", "--auth", "files", "--out", str(tmp_path / "broker"), "--tls-dir", str(tmp_path / "tls"),
        "--broker-host", "127.0.0.1", "--port", str(port), "--bind", "127.0.0.1", "--run-as", current_user()])
    assert made.exit_code == 0, made.output
    env = dict(line.split("=", 1) for line in (tmp_path / "broker" / "ingest.env").read_text().splitlines())
    assert "EDGEPACK_BROKER_ADMIN_PASSWORD" not in env  # an ingest replica gets only its own account
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "password_file" in conf and "acl_file" in conf and "allow_anonymous false" in conf
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "broker" / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: services.port_open("127.0.0.1", port), timeout=10, what="mosquitto")

        class Where:
            url, ca_file = f"mqtts://127.0.0.1:{port}", tmp_path / "tls" / "ca.pem"

        ingest = Client(Where, username=env["EDGEPACK_MQTT_USERNAME"], password=env["EDGEPACK_MQTT_PASSWORD"])
        assert ingest.connect().connack == "Success"
        ingest.close()
        assert Client(Where).connect().connack == "Not authorized"
    finally:
        proc.terminate()
        proc.wait(10)
