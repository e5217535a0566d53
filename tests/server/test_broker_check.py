"""Broker configuration is part of the product (issue 10): `edgepack-server check-broker` reports a
default-configured Mosquitto's queue cap and passes the product's configuration; a server that fails to start
(port in use) leaves no session in the shared subscription; /readyz says when the ingester is down."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.server.conftest import LiveServer, wait_for
from tests.support import services
from update_server import cli as server_cli
from update_server.mqtt_wire import Message, WireClient, publish_all

pytestmark = [pytest.mark.mqtt]


def _env(values: dict[str, Any]) -> dict[str, str]:
    return {f"EDGEPACK_{k.upper()}": str(v) for k, v in values.items() if v is not None}


def test_check_broker_reports_mosquittos_default_queue_cap() -> None:
    with services.mosquitto(auth="none", tls=False, max_queued_messages=1000) as broker:
        result = CliRunner().invoke(server_cli.app, ["check-broker"], env=_env(broker.server_settings()))
    assert result.exit_code == 1, result.output
    assert "queued for a disconnected session: 1000 of 1500" in result.output
    assert "max_queued_messages 1000000" in result.output


def test_check_broker_passes_the_product_configuration(session_broker: Any) -> None:
    settings = session_broker.server_settings(account_prefix=f"t{uuid.uuid4().hex[:6]}-")
    result = CliRunner().invoke(server_cli.app, ["check-broker", "--json"], env=_env(settings))
    assert result.exit_code == 0, result.output
    assert '"queued": 1500' in result.output and '"session_resumed": true' in result.output


def _consume(url_port: int, group: str, topic: str, expected: int) -> int:
    """A consumer joining the shared subscription; returns how many of ``expected`` messages reach it."""
    client = WireClient("127.0.0.1", url_port, f"live-{uuid.uuid4().hex[:6]}", clean_start=True, session_expiry=0)
    client.connect()
    got: list[Message] = []
    try:
        client.subscribe(f"$share/{group}/{topic}", qos=1)
        wait_for(lambda: client.read(lambda m: None) >= 0 and client.subscribed.is_set(), what="the subscription")
        publish_all("127.0.0.1", url_port, ((topic, b"m") for _ in range(expected)))
        deadline = time.monotonic() + 30
        while len(got) < expected and time.monotonic() < deadline:
            before = len(got)
            client.read(got.append)
            client.ack(got[before:])
    finally:
        client.close()
    return len(got)


def test_a_start_that_fails_on_a_port_in_use_leaves_no_session(session_keys: Any, tmp_path: Path) -> None:
    group, client_id = f"g-{uuid.uuid4().hex[:6]}", f"srv-{uuid.uuid4().hex[:6]}"
    prefix = "edgepack-stale/v1/devices"
    with services.mosquitto(auth="none", tls=False) as broker, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, **_env({**broker.server_settings(), "keys_dir": session_keys.directory / "online",
                                      "data_dir": tmp_path / "data", "port": taken.getsockname()[1],
                                      "mqtt_client_id": client_id, "mqtt_share_group": group,
                                      "mqtt_topic_prefix": prefix})}
        proc = subprocess.Popen([sys.executable, "-m", "update_server.cli", "serve"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode != 0, out.decode()
        assert b"cannot listen" in out
        # every message of the group reaches the live consumer: no stale session takes a share
        assert _consume(broker.port, group, f"{prefix}/d1/telemetry/window", 200) == 200
        probe = WireClient("127.0.0.1", broker.port, client_id, clean_start=False, session_expiry=0)
        assert probe.connect() is False  # the failed server's client id has no session on the broker
        probe.close()


def test_readyz_reports_the_ingester(private_broker: Any, make_server: Callable[..., LiveServer],
                                     tmp_path: Path) -> None:
    server = make_server(f"sqlite:///{tmp_path / 'r.db'}", broker=private_broker,
                         prefix=f"edgepack-ready-{uuid.uuid4().hex[:6]}/v1/devices")
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200 and r.json()["ingester"]["connected"] is True, r.text
    private_broker.stop()
    down = wait_for(lambda: (r := httpx.get(f"{server.url}/readyz")).status_code == 503 and r, timeout=60,
                    what="/readyz to fail while the broker is down")
    assert "not connected to the broker" in down.json()["status"]
    assert down.headers["retry-after"] == "2"
    assert httpx.get(f"{server.url}/readyz", params={"scope": "http"}).status_code == 200  # check-ins still work
    private_broker.start()
    wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, timeout=60,
             what="/readyz to recover with the broker")


def test_release_session_ends_a_retired_replicas_session() -> None:
    client_id = f"retired-{uuid.uuid4().hex[:6]}"
    with services.mosquitto(auth="none", tls=False) as broker:
        old = WireClient("127.0.0.1", broker.port, client_id, clean_start=True, session_expiry=3600)
        old.connect()
        old.close()
        result = CliRunner().invoke(server_cli.app, ["release-session"],
                                    env=_env({**broker.server_settings(), "mqtt_client_id": client_id}))
        assert result.exit_code == 0, result.output
        probe = WireClient("127.0.0.1", broker.port, client_id, clean_start=False, session_expiry=0)
        assert probe.connect() is False
        probe.close()


def test_serve_logs_the_broker_check_at_start(make_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    with services.mosquitto(auth="none", tls=False, max_queued_messages=1000) as broker:
        server = make_server(f"sqlite:///{tmp_path / 'c.db'}", mqtt_url=broker.url, broker_check=True,
                             prefix=f"edgepack-chk-{uuid.uuid4().hex[:6]}/v1/devices")
        body = wait_for(lambda: (r := httpx.get(f"{server.url}/readyz").json()).get("broker_check") and r,
                        timeout=60, what="the start-up broker check")
        server.stop()
    assert "1000 of 1500" in body["broker_check"][0]
