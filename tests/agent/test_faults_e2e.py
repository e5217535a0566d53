"""What the operator sees when a device's disk is full, end to end: the real update server (uvicorn, SQLite,
HTTPS), a real Mosquitto (TLS, broker accounts), ``edgepack-agent run`` on a real 4 MB tmpfs, and a rollout of
a bundle that cannot fit.

The device refuses the bundle before downloading it; the server shows the reason in the device's
``last_error`` (``GET /api/v1/devices/{id}``, which ``edgepack devices show`` prints), and the rollout's
install-failure gate counts the device.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bundles.keys import KeyStore
from tests.agent.conftest import HARDWARE, AgentProcess, rebuild_bundle, toml_dumps, wait_for
from tests.support.factories import make_digits_bundle
from tests.support.services import Mosquitto, free_port

pytest.importorskip("fastapi")
MB = 1024 * 1024


@pytest.mark.slow
@pytest.mark.mqtt
def test_disk_full_reaches_the_device_view_and_the_install_failure_gate(
        keys: KeyStore, tmp_path: Path, private_broker: Mosquitto, small_disk: Callable[[int], Path]) -> None:
    from tests.server.conftest import enrollment_token, push, start_server

    state = small_disk(4 * MB)
    base = make_digits_bundle(keys, tmp_path / "digits-1.0.0.edgepack", version="1.0.0", release_counter=1)
    huge = rebuild_bundle(keys, base, tmp_path / "digits-2.0.0.edgepack", version="2.0.0", release_counter=2,
                          replace_files={"data/padding.bin": os.urandom(5 * MB)})
    live = start_server(keys=keys, data_dir=tmp_path / "server", db_url=f"sqlite:///{tmp_path / 'server.db'}",
                        broker=private_broker, tls_files=private_broker.tls_files)
    agent: AgentProcess | None = None
    try:
        assert push(live, huge).status_code == 201
        device = "kiosk-e2e-disk"
        api = f"127.0.0.1:{free_port()}"
        config = tmp_path / "agent.toml"
        config.write_text(toml_dumps({
            "device_id": device, "hardware_id": HARDWARE, "state_dir": str(state),
            "server": {"url": live.url, "poll_interval_s": 1, "ca_file": str(live.ca_file)},
            "trust": {"image_root": str(keys.root_path), "director_root": str(keys.director_root_path)},
            "api": {"listen": api}, "limits": {"disk_reserve_bytes": 256 * 1024}}))
        enroll = subprocess.run([sys.executable, "-m", "device_agent.cli", "enroll", "--config", str(config),
                                 "--token", enrollment_token(live, uses=1)], capture_output=True, text=True,
                                timeout=60)
        assert enroll.returncode == 0, enroll.stderr
        agent = AgentProcess(config, api, tmp_path / "agent.log").start()
        with live.admin as admin:
            r = admin.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "2.0.0"},
                                                     "selector": {"device_ids": [device]}, "phases": [100],
                                                     "start": True, "reason": "e2e disk full"})
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
            view = wait_for("last_error at check-in", lambda: (v := admin.get(f"/api/v1/devices/{device}").json())
                            ["last_error"] and "disk_full" in v["last_error"] and v, agent=agent)
            error = json.loads(view["last_error"])
            assert error["error"] == "disk_full" and error["permanent"] is True
            assert error["needed_bytes"] > 5 * MB and error["total_bytes"] <= 4 * MB
            assert "will not be retried" in error["message"]
            rollout = wait_for("the install failure counted by the gate", lambda: (
                ro := admin.get(f"/api/v1/rollouts/{rid}").json())["target"]["failed_devices"] == 1 and ro,
                agent=agent)
            gate = next(g for g in rollout["decision"]["gates"] if g["name"] == "install_failure_rate")
            assert gate["value"] == 1.0 and "1/1" in str(gate["detail"]), gate
        assert not (state / "staging").exists() or not any((state / "staging").rglob("*"))
        assert agent.proc.poll() is None  # never crashed
        assert agent.stop() == 0
        agent = None
    finally:
        if agent is not None:
            agent.stop(signal.SIGKILL)
        live.stop()
