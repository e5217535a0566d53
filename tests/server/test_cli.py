"""The operator CLI (`edgepack bundles|devices|rollout ...`) against a live server, and `edgepack-server`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer
from tests.server.sim import SimDevice
from update_server import admin_cli
from update_server import cli as server_cli

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    admin_cli.register(app)
    return app


def test_admin_cli(server: LiveServer, digits_bundles: dict) -> None:
    app = _app()
    env = {"EDGEPACK_SERVER": server.url, "EDGEPACK_TOKEN": server.token}

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    out = run("bundles", "push", str(digits_bundles["1.0.0"].path), str(digits_bundles["1.1.0"].path))
    assert "pushed digits 1.0.0" in out and "pushed digits 1.1.0" in out
    again = runner.invoke(app, ["bundles", "push", str(digits_bundles["1.0.0"].path)], env=env)
    assert again.exit_code == 0 and "already on the server with the same signed files" in again.output
    assert "1.1.0" in run("bundles", "list")
    token = run("enroll-token", "create", "--uses", "3", "--group", "lab").strip()
    for i in range(3):
        SimDevice(server.url, f"cli-{i}").enroll(token)
    assert "3 device(s)" in run("devices", "list", "--group", "lab")
    out = run("rollout", "create", "digits", "1.1.0", "--group", "lab", "--phases", "50,100", "--soak", "600",
              "--gate", "max_crash_rate=0.01", "--gate", "min_accuracy=0.9", "--gate", "require_data=accuracy",
              "--allow-unproven", "p95_latency_regression", "--start", "--reason", "try it")
    rid = re.search(r"rollout (r-[0-9a-f]+)", out).group(1)
    as_json = json.loads(run("rollout", "status", rid, "--json"))
    assert "require_data" in json.dumps(as_json)
    assert as_json["spec"]["gates"]["allow_unproven"] == ["p95_latency_regression"]
    assert {"lower", "upper", "alpha"} <= set(as_json["decision"]["gates"][0])
    status = run("rollout", "status", rid)
    assert "crash_rate" in status and "<= 0.01" in status and "min soak" in status and "soaking" in status
    assert "interval" in status
    waived = [e for e in json.loads(run("rollout", "audit", rid, "--json")) if e["action"] == "rollout.allow_unproven"]
    assert [e["detail"]["gates"] for e in waived] == [["p95_latency_regression"]]
    assert waived[0]["actor"].startswith("test-admin")  # who waived it
    assert "paused" in run("rollout", "pause", rid, "--reason", "[urgent] lunch")
    assert "running" in run("rollout", "resume", rid, "--reason", "back")
    assert "phase 1" in run("rollout", "advance", rid, "--reason", "looks good")
    assert "rolled_back" in run("rollout", "rollback", rid, "--reason", "changed my mind")
    audit = run("rollout", "audit", rid)
    assert "changed my mind" in audit and "[urgent] lunch" in audit  # operators' words are not rich markup
    assert json.loads(run("rollout", "audit", rid, "--json"))[0]["reason"] == "changed my mind"  # newest first
    assert [r["id"] for r in json.loads(run("rollout", "list", "--json"))] == [rid]
    tokens = json.loads(run("tokens", "list", "--json"))
    assert {t["name"] for t in tokens} >= {"test-admin"} and not any("token" in t for t in tokens)
    created = json.loads(run("enroll-token", "create", "--uses", "2", "--json"))
    assert created["token"] and created["uses"] == 2
    assert json.loads(run("bundles", "show", "digits", "1.1.0", "--json"))["manifest"]["version"] == "1.1.0"
    assert "onnx-fp32" in run("bundles", "show", "digits", "1.1.0")
    assert json.loads(run("devices", "show", "cli-0", "--json"))["group"] == "lab"
    # an unknown gate is refused by name, with the known ones listed (not a Python TypeError)
    bad_gate = runner.invoke(app, ["rollout", "create", "digits", "1.1.0", "--gate", "foo=1"], env=env)
    assert bad_gate.exit_code == 1 and "unknown gate(s) ['foo']" in bad_gate.output, bad_gate.output
    assert "max_crash_rate" in bad_gate.output and "TypeError" not in bad_gate.output
    bad_value = runner.invoke(app, ["rollout", "create", "digits", "1.1.0", "--gate", "max_crash_rate=lots"],
                              env=env)
    assert bad_value.exit_code == 1 and "max_crash_rate must be a number" in bad_value.output
    # a captured token with a second line (or a space) says so instead of "Illegal header value"
    two_lines = runner.invoke(app, ["bundles", "list"], env={**env, "EDGEPACK_TOKEN": f"created\n{server.token}"})
    assert two_lines.exit_code == 2 and "must hold the token alone" in two_lines.output
    bad = runner.invoke(app, ["rollout", "abort", rid], env=env)
    assert bad.exit_code == 1 and "cannot abort a rollout that is rolled_back" in bad.output
    denied = runner.invoke(app, ["bundles", "list"], env={**env, "EDGEPACK_TOKEN": "ept_wrong"})
    assert denied.exit_code == 1 and "401" in denied.output


def test_server_cli_create_token(tmp_path: Path, session_keys: object) -> None:
    env = {"EDGEPACK_DATA_DIR": str(tmp_path / "data"), "EDGEPACK_KEYS_DIR": str(tmp_path)}
    result = runner.invoke(server_cli.app, ["create-token", "--name", "first", "--role", "admin"], env=env)
    assert result.exit_code == 0, result.output
    # stdout is the token alone, so $(edgepack-server create-token) captures it; the note goes to stderr
    assert result.stdout.startswith("ept_") and len(result.stdout.strip().splitlines()) == 1
    assert "shown only once" in result.stderr
    bad = runner.invoke(server_cli.app, ["create-token", "--role", "root"], env=env)
    assert bad.exit_code == 2 and "unknown role" in bad.output
    config = tmp_path / "server.toml"
    config.write_text(f'data_dir = "{tmp_path / "data2"}"\ndefault_phases = [5.0, 100.0]\n')
    from update_server.settings import Settings

    settings = Settings.load(config)
    assert settings.default_phases == (5.0, 100.0) and settings.data_dir == tmp_path / "data2"


def test_settings_files_are_checked_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPACK_CONFIG", "")  # `--config` exports it for worker processes; restored afterwards
    env = {"EDGEPACK_DATA_DIR": str(tmp_path / "data")}
    typo = tmp_path / "server.toml"
    typo.write_text('max_uplod_bytes = 10\n[mqtt]\nurl = "mqtt://broker"\n')
    result = runner.invoke(server_cli.app, ["migrate", "--config", str(typo)], env=env)
    assert result.exit_code == 2
    assert "unknown key 'max_uplod_bytes' (did you mean 'max_upload_bytes'?)" in result.stderr
    assert "unknown key 'mqtt'" in result.stderr and "known keys: data_dir" in result.stderr
    wrong_type = tmp_path / "types.toml"
    wrong_type.write_text('port = "eighty"\n')
    result = runner.invoke(server_cli.app, ["migrate", "--config", str(wrong_type)], env=env)
    assert result.exit_code == 2 and "port: Input should be a valid integer" in result.stderr
    env_file = tmp_path / "server.env"
    env_file.write_text("EDGEPACK_DATA_DIR=/tmp/x\nEDGEPACK_MAX_UPLOD=5\n")
    result = runner.invoke(server_cli.app, ["migrate", "--config", str(env_file)], env=env)
    assert result.exit_code == 2 and "unknown key 'EDGEPACK_MAX_UPLOD'" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created
    # an unknown EDGEPACK_ environment variable may belong to another tool: a warning, not a refusal
    result = runner.invoke(server_cli.app, ["migrate"],
                           env={**env, "EDGEPACK_MQTT_ULR": "mqtt://x", "EDGEPACK_CONFIG": None})
    assert result.exit_code == 0 and "EDGEPACK_MQTT_ULR is not a server setting" in result.stderr


def test_ingest_only_replica(tmp_path: Path, session_keys: KeyStore, session_broker: Any) -> None:
    """`edgepack-server ingest` is a replica without HTTP: it consumes its share of the telemetry, with only
    the ingest account (no admin password), over TLS."""
    import os
    import subprocess
    import sys
    import time
    import uuid

    from sqlalchemy import create_engine, func, select

    from tests.server.sim import Publisher
    from update_server.models import TelemetrySeen

    prefix, group = f"edgepack-ingest-{uuid.uuid4().hex[:8]}/v1/devices", f"g-{uuid.uuid4().hex[:6]}"
    account_prefix = f"ing{uuid.uuid4().hex[:6]}-"
    # the serving replica's part: the ingest account and the device's account exist on the broker
    accounts = session_broker.accounts(account_prefix=account_prefix, mqtt_topic_prefix=prefix,
                                       mqtt_share_group=group)
    device = SimDevice("http://unused", "ing-1")
    account = accounts.add_device("ing-1", "device-password-1")
    device.mqtt = {"username": account.username, "password": account.password, "client_id": account.client_id}
    accounts.stop()
    ingest = session_broker.server_settings(account_prefix=account_prefix)
    db = tmp_path / "ingest.db"
    env = {**os.environ, "EDGEPACK_DATA_DIR": str(tmp_path / "data"), "EDGEPACK_DATABASE_URL": f"sqlite:///{db}",
           "EDGEPACK_KEYS_DIR": str(session_keys.directory / "online"), "EDGEPACK_MQTT_URL": ingest["mqtt_url"],
           "EDGEPACK_MQTT_CA_FILE": str(ingest["mqtt_ca_file"]), "EDGEPACK_MQTT_USERNAME": ingest["mqtt_username"],
           "EDGEPACK_MQTT_PASSWORD": ingest["mqtt_password"], "EDGEPACK_BROKER_AUTH": "dynsec",
           "EDGEPACK_MQTT_TOPIC_PREFIX": prefix, "EDGEPACK_MQTT_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:6]}",
           "EDGEPACK_MQTT_SHARE_GROUP": group}
    proc = subprocess.Popen([sys.executable, "-m", "update_server.cli", "ingest", "--log-level", "warning"], env=env)
    pub = Publisher(session_broker, prefix)
    engine = None
    try:
        deadline = time.monotonic() + 60
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # subscribed by now (the process migrated, then connected)
        device.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}
        for _ in range(5):
            pub.window(device)
        engine = create_engine(f"sqlite:///{db}")
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(select(func.count()).select_from(TelemetrySeen)).scalar() == 5:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("the ingest replica did not store the telemetry")
    finally:
        pub.close()
        proc.terminate()
        assert proc.wait(30) == 0
        if engine is not None:
            engine.dispose()
