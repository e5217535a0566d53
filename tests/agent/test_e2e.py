"""The full cycle against the real update server (uvicorn, SQLite, HTTPS) and a real Mosquitto (TLS, dynamic
security).

Enroll with the real CLI (the device gets its credential and its broker account), run ``edgepack-agent run``
as a process pinned to the local CA, roll out 1.0.0 then 1.1.0 with the server's rollouts, and end with a
committed 1.1.0 serving predictions; the server's inventory and its telemetry ingestion must agree with the
device.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bundles.assemble import BundleInfo
from bundles.keys import KeyStore
from device_agent.client import AgentClient
from tests.agent.conftest import HARDWARE, AgentProcess, toml_dumps
from tests.support.factories import digits_data, make_digits_bundle
from tests.support.services import Mosquitto, free_port

pytest.importorskip("fastapi")


def _wait(predicate: Callable[[], Any], timeout: float, what: str, agent: AgentProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}\n{agent.log_tail() if agent else ''}")


@pytest.mark.slow
@pytest.mark.mqtt
def test_full_cycle_against_the_real_server(keys: KeyStore, tmp_path: Path, private_broker: Mosquitto) -> None:
    from tests.server.conftest import enrollment_token, push, start_server

    bundles: dict[str, BundleInfo] = {
        v: make_digits_bundle(keys, tmp_path / f"digits-{v}.edgepack", version=v, release_counter=rc)
        for v, rc in (("1.0.0", 1), ("1.1.0", 2))}
    live = start_server(keys=keys, data_dir=tmp_path / "server", db_url=f"sqlite:///{tmp_path / 'server.db'}",
                        broker=private_broker, tls_files=private_broker.tls_files)
    assert live.url.startswith("https://")
    agent: AgentProcess | None = None
    try:
        for info in bundles.values():
            assert push(live, info).status_code == 201
        device = "kiosk-e2e-1"
        api = f"127.0.0.1:{free_port()}"
        config = tmp_path / "agent.toml"
        config.write_text(toml_dumps({
            "device_id": device, "hardware_id": HARDWARE, "state_dir": str(tmp_path / "state"),
            "server": {"url": live.url, "poll_interval_s": 2, "ca_file": str(live.ca_file)},
            "trust": {"image_root": str(keys.root_path), "director_root": str(keys.director_root_path)},
            "api": {"listen": api}, "trial": {"period_s": 1.0, "health_interval_s": 0.3},
            "telemetry": {"window_s": 1.0}}))
        enroll = subprocess.run([sys.executable, "-m", "device_agent.cli", "enroll", "--config", str(config),
                                 "--token", enrollment_token(live, uses=1), "--tag", "site=lab"],
                                capture_output=True, text=True, timeout=60)
        assert enroll.returncode == 0, enroll.stderr
        assert (tmp_path / "state" / "credential").stat().st_mode & 0o077 == 0
        assert (tmp_path / "state" / "mqtt-password").stat().st_mode & 0o077 == 0
        assert "password" not in (tmp_path / "state" / "enrollment.json").read_text()
        agent = AgentProcess(config, api, tmp_path / "agent.log").start()
        images, labels = digits_data()
        with live.admin as admin:
            for version in ("1.0.0", "1.1.0"):
                # The rollout cannot complete before the device's feedback is credited to it (the accuracy
                # gate must have data), however slow the machine: no soak timer to outwait. One device, 20
                # calls: nothing to compare with and too few requests for the error gate, waived explicitly.
                r = admin.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": version},
                                                         "selector": {"device_ids": [device]}, "phases": [100],
                                                         "min_soak_s": 1, "gates": {
                                                             "min_accuracy": 0.5, "min_feedback": 20,
                                                             "allow_unproven": ["error_rate", "accuracy_drop",
                                                                                "p95_latency_regression"]},
                                                         "start": True, "reason": f"e2e {version}"})
                assert r.status_code == 201, r.text
                rid = r.json()["id"]
                _wait(lambda v=version: (s := agent.status())["state"] == "idle" and s["serving"]
                      and s["serving"]["version"] == v, 90, f"agent serving {version}", agent)
                with AgentClient(api) as client:
                    for i in range(20):
                        ans = client.predict(images[i:i + 1].tolist())
                        client.feedback(ans["prediction_id"], str(labels[i]))
                assert ans["model"]["version"] == version
                _wait(lambda v=version: admin.get(f"/api/v1/devices/{device}").json()["active"]["version"] == v, 30,
                      f"server inventory shows {version}", agent)
                # the server ingested the windows the agent sent for this bundle (requests and feedback)
                target = _wait(lambda r_=rid: (t := admin.get(f"/api/v1/rollouts/{r_}").json()["target"])[
                    "feedback_count"] >= 20 and t, 30, f"telemetry of {version} ingested", agent)
                _wait(lambda r_=rid: admin.get(f"/api/v1/rollouts/{r_}").json()["state"] == "completed", 90,
                      f"rollout {version} completed", agent)
                assert target["requests"] >= 20 and target["devices_reporting"] == 1
                assert target["feedback_correct"] >= 15 and target["crashed_devices"] == 0
        status = agent.status()
        assert status["serving"] == {"name": "digits", "version": "1.1.0", "release_counter": 2,
                                     "variant": "onnx-fp32"}
        assert status["previous"] is None and status["last_error"] is None
        view = live.admin.get(f"/api/v1/devices/{device}").json()
        assert view["state"] == "idle" and view["tags"] == {"site": "lab"}
        assert view["runtimes"].get("onnxruntime")
        def delivered(s: dict[str, Any]) -> bool:  # emptied by the server's mark, not by the broker's PUBACK
            tel = s["telemetry"]
            return bool(s["outbox"] == 0 and tel["end_to_end"] and tel["committed_seq"] == tel["seq"] > 0)

        _wait(lambda: delivered(agent.status()), 30, "telemetry delivered and committed", agent)
        assert live.admin.get(f"/api/v1/devices/{device}").json()["telemetry"]["lost"] == 0
        assert agent.stop() == 0
        agent = None
    finally:
        if agent is not None:  # a failed assertion must not leave the agent process running
            agent.stop(signal.SIGKILL)
        live.stop()
