"""The production setup of docs/server.md, run as written: `edgepack tls init`, `edgepack-server broker init`,
mosquitto with the written configuration, `edgepack-server serve --config server.env` over HTTPS; a device
enrolls over HTTPS and uses its broker account over TLS. Plain transport off loopback is refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import paho.mqtt.client as mqtt
import pytest
import typer
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from bundles.keys import KeyStore
from edgepack import cli_tls
from tests.support import services
from update_server import cli as server_cli
from update_server.broker.setup import current_user

runner = CliRunner()


def _tls_cli() -> typer.Typer:
    app = typer.Typer()
    cli_tls.register(app)
    return app


def _connack(url: str, ca: Path, username: str | None, password: str | None, client_id: str) -> str:
    parsed = urlparse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    client.tls_set(ca_certs=str(ca))
    result: list[str] = []
    client.on_connect = lambda c, u, f, rc, p: result.append(str(rc))
    client.connect(parsed.hostname, parsed.port)
    deadline = time.monotonic() + 10
    while not result and time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    return result[0] if result else "no answer"


def test_tls_init_issue_and_show(tmp_path: Path) -> None:
    app = _tls_cli()
    out = tmp_path / "tls"
    made = runner.invoke(app, ["tls", "init", "--out", str(out), "--host", "updates.example.com",
                               "--host", "10.0.0.5", "--broker-host", "mqtt.example.com"])
    assert made.exit_code == 0, made.output
    for key in ("ca.key", "server.key", "broker.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    from cryptography import x509

    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["updates.example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    broker = x509.load_pem_x509_certificate((out / "broker.pem").read_bytes())
    assert broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["mqtt.example.com"]
    again = runner.invoke(app, ["tls", "init", "--out", str(out), "--host", "x"])
    assert again.exit_code == 2 and "already exists" in again.output  # devices trust that CA: never replaced
    renewed = runner.invoke(app, ["tls", "issue", "--dir", str(out), "--name", "server", "--host",
                                  "updates.example.com", "--days", "30"])
    assert renewed.exit_code == 0, renewed.output
    new = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert new.serial_number != server.serial_number and new.issuer == server.issuer
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days == 30
    assert "server.pem" in runner.invoke(app, ["tls", "show", "--dir", str(out)]).output


def test_server_refuses_plain_transport_off_loopback(tmp_path: Path, session_keys: KeyStore) -> None:
    env = {"EDGEPACK_DATA_DIR": str(tmp_path / "data"), "EDGEPACK_KEYS_DIR": str(session_keys.directory / "online")}
    cases = [({"EDGEPACK_HOST": "0.0.0.0"}, "refusing to serve plain HTTP on 0.0.0.0"),
             ({"EDGEPACK_MQTT_URL": "mqtt://10.1.2.3:1883"}, "refusing plain MQTT to mqtt://10.1.2.3:1883"),
             ({"EDGEPACK_MQTT_URL": "mqtts://broker.example.com:8883"}, "refusing broker_auth=none"),
             ({"EDGEPACK_MQTT_URL": "mqtts://broker.example.com:8883", "EDGEPACK_BROKER_AUTH": "dynsec"},
              "broker_auth=dynsec needs broker_admin_password, mqtt_password")]
    for extra, message in cases:
        result = runner.invoke(server_cli.app, ["serve"], env={**env, **extra})
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    allowed = runner.invoke(server_cli.app, ["ingest"], env={**env, "EDGEPACK_MQTT_URL": "mqtt://10.1.2.3:1883"})
    assert allowed.exit_code == 2 and "refusing plain MQTT" in allowed.output  # ingest replicas too


@pytest.mark.mqtt
@pytest.mark.slow
def test_production_setup_as_documented(tmp_path: Path, session_keys: KeyStore,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.server.sim import SimDevice

    # `--config` makes the CLI export EDGEPACK_CONFIG for its worker processes; undo that after the test, or the
    # next test's `serve` reads this production config (and serves HTTPS on 0.0.0.0 instead of refusing)
    monkeypatch.setenv("EDGEPACK_CONFIG", "")  # restored (removed) at teardown

    tls_dir = tmp_path / "tls"
    assert runner.invoke(_tls_cli(), ["tls", "init", "--out", str(tls_dir), "--host", "127.0.0.1"]).exit_code == 0
    broker_port, http_port = services.free_port(), services.free_port()
    made = runner.invoke(server_cli.app, [
        "broker", "init", "--out", str(tmp_path / "broker"), "--tls-dir", str(tls_dir), "--broker-host", "127.0.0.1",
        "--port", str(broker_port), "--bind", "127.0.0.1", "--run-as", current_user()])
    assert made.exit_code == 0, made.output
    server_env = tmp_path / "broker" / "server.env"
    assert stat.S_IMODE(server_env.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "broker" / "dynamic-security.json").stat().st_mode) == 0o600
    again = runner.invoke(server_cli.app, ["broker", "init", "--out", str(tmp_path / "broker"), "--tls-dir",
                                           str(tls_dir), "--broker-host", "127.0.0.1"])
    assert again.exit_code == 2 and "holds live accounts" in again.output
    settings = dict(line.split("=", 1) for line in server_env.read_text().splitlines())
    mosquitto = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "broker" / "mosquitto.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "EDGEPACK_DATA_DIR": str(tmp_path / "data"), "EDGEPACK_PORT": str(http_port),
           "EDGEPACK_KEYS_DIR": str(session_keys.directory / "online"),
           "EDGEPACK_TLS_CERT": str(tls_dir / "server.pem"), "EDGEPACK_TLS_KEY": str(tls_dir / "server.key")}
    env.pop("EDGEPACK_CONFIG", None)
    server: Any = None
    clients: list[httpx.Client] = []
    url = f"https://127.0.0.1:{http_port}"
    try:
        token = subprocess.run([sys.executable, "-m", "update_server.cli", "create-token", "--config",
                                str(server_env)], env=env, capture_output=True, text=True, timeout=60)
        assert token.returncode == 0, token.stderr
        admin_token = token.stdout.strip().splitlines()[-1]
        log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - handed to the child
        server = subprocess.Popen([sys.executable, "-m", "update_server.cli", "serve", "--config", str(server_env),
                                   "--log-level", "info"], env=env, stdout=log, stderr=log)
        log.close()
        ca = str(tls_dir / "ca.pem")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", verify=ca, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        checked = subprocess.run([sys.executable, "-m", "update_server.cli", "check-broker", "--config",
                                  str(server_env)], env=env, capture_output=True, text=True, timeout=120)
        assert checked.returncode == 0, checked.stdout + checked.stderr  # the broker `broker init` wrote is right
        assert "queued for a disconnected session: 1500 of 1500" in checked.stdout
        with pytest.raises(httpx.ConnectError):  # not trusted without the pinned CA
            httpx.get(f"{url}/healthz", timeout=5)
        with pytest.raises(httpx.HTTPError):  # and nothing plain on that port
            httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)
        admin = httpx.Client(base_url=url, verify=ca, headers={"Authorization": f"Bearer {admin_token}"})
        enroll = admin.post("/api/v1/admin/enrollment-tokens", json={"uses": 1}).json()["token"]
        device = SimDevice(url, "prod-1")
        device.http = httpx.Client(base_url=url, verify=ca, timeout=30)
        clients += [admin, device.http]
        body = device.enroll(enroll)
        assert body["mqtt"]["url"] == settings["EDGEPACK_MQTT_URL"] == f"mqtts://127.0.0.1:{broker_port}"
        assert body["image_repo_url"].startswith("https://")
        mqtt_url = body["mqtt"]["url"]
        assert _connack(mqtt_url, tls_dir / "ca.pem", body["mqtt"]["username"], body["mqtt"]["password"],
                        body["mqtt"]["client_id"]) == "Success"
        assert _connack(mqtt_url, tls_dir / "ca.pem", None, None, "anonymous-1") == "Not authorized"

        # runbook: rotate the broker admin password
        old = settings["EDGEPACK_BROKER_ADMIN_PASSWORD"]
        rotated = runner.invoke(server_cli.app, ["broker", "rotate-admin-password", "--config", str(server_env)])
        assert rotated.exit_code == 0, rotated.output
        new = rotated.output.strip().splitlines()[-1]
        assert new != old
        assert _connack(mqtt_url, tls_dir / "ca.pem", "edgepack-server", old, "rot-1") != "Success"
        assert _connack(mqtt_url, tls_dir / "ca.pem", "edgepack-server", new, "rot-2") == "Success"
    finally:
        for client in clients:  # uvicorn waits for open keep-alive connections before it exits
            client.close()
        try:
            if server is not None:
                server.terminate()
                server.wait(30)
        finally:
            mosquitto.terminate()
            mosquitto.wait(10)
