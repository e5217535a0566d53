"""Input drift through the real telemetry path: devices publish windows with the input statistics an agent sends
(``bundles.drift`` counts, as tests/agent/test_drift_counts.py shows the worker makes them) through the
broker; the server ingests them, and drift shows per device, as a fleet alert for a version at 100 %, and as a
rollout gate that halts."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import numpy as np
import pytest

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push, wait_for
from tests.server.dashboard_scenario import OLD, publish_window
from tests.server.sim import Publisher, SimDevice
from tests.server.test_metrics import scrape, value
from tests.support.factories import digits_data

OFF = {"max_install_failure_rate": None, "max_crash_rate": None, "max_error_rate": None,
       "max_accuracy_drop": None, "max_p95_latency_regression": None}


def _device_psi(live: LiveServer, device_id: str) -> list[float]:
    """The PSI values on the device's dashboard page (one per version it reported inputs for)."""
    r = httpx.get(f"{live.url}/ui/devices/{device_id}", headers={"Authorization": f"Bearer {live.token}"})
    assert r.status_code == 200
    table = r.text.split('id="device-drift"', 1)[1].split("</table>", 1)[0]
    return [float(v) for v in re.findall(r'title="worst feature [^"]*">([0-9.]+)</span>', table)]


@pytest.mark.mqtt
def test_shifted_inputs_raise_drift_alert_and_halt_a_rollout(make_server: Any, session_broker: Any, tmp_path: Any,
                                                             digits_bundles: dict[str, Any],
                                                             session_keys: KeyStore) -> None:
    import uuid

    live: LiveServer = make_server(f"sqlite:///{tmp_path / 's.db'}", broker=session_broker,
                                   prefix=f"edgepack-drift-{uuid.uuid4().hex[:8]}/v1/devices", metrics_cache_s=0)
    for v in ("1.0.0", "1.1.0"):
        assert push(live, digits_bundles[v]).status_code == 201
    token = enrollment_token(live, uses=2)
    steady, shifted = SimDevice(live.url, "kiosk-steady"), SimDevice(live.url, "kiosk-smudged")
    for d in (steady, shifted):
        d.enroll(token)
    images, _ = digits_data()
    clean = images.reshape(-1, 64) / 16.0
    faint = np.round(images.reshape(-1, 64) * 0.6) / 16.0   # the same digits through a smudged lens
    rng = np.random.default_rng(3)
    director_root = session_keys.director_root_path.read_bytes()
    pub = Publisher(session_broker, live.prefix, [steady, shifted])
    admin = live.admin
    try:
        # 1.0.0 at 100 % (a completed rollout; gates off: this part is about drift only)
        r = admin.post("/api/v1/rollouts", json={"bundle": {"name": "digits", "version": "1.0.0"}, "phases": [100],
                                                 "min_soak_s": 0, "min_devices": 1, "gates": OFF, "start": True})
        rid = r.json()["id"]
        for d in (steady, shifted):
            d.sync(director_root)
            assert d.active == OLD
        time.sleep(1.0)  # the ingester re-reads rollout membership at most every 0.5 s
        for _ in range(3):
            publish_window(pub, steady, clean[rng.choice(len(clean), 400)])
        wait_for(lambda: admin.get(f"/api/v1/rollouts/{rid}").json()["state"] == "completed", what="1.0.0 at 100 %")
        wait_for(lambda: value(scrape(live.url, live.token), "edgepack_model_input_drift", model="digits",
                               version="1.0.0") > 0, what="drift of 1.0.0 in /metrics")
        samples = scrape(live.url, live.token)
        assert value(samples, "edgepack_model_input_drift", model="digits", version="1.0.0") < 0.25
        assert value(samples, "edgepack_model_input_drift_alert", model="digits", version="1.0.0") == 0
        for _ in range(6):
            publish_window(pub, shifted, faint[rng.choice(len(faint), 400)])
        wait_for(lambda: value(scrape(live.url, live.token), "edgepack_model_input_drift_alert", model="digits",
                               version="1.0.0") == 1, what="the fleet drift alert on 1.0.0")
        overview = httpx.get(f"{live.url}/ui/", headers={"Authorization": f"Bearer {live.token}"}).text
        assert 'id="alert-drift-digits-1.0.0"' in overview
        (steady_psi,), (shifted_psi,) = _device_psi(live, steady.device_id), _device_psi(live, shifted.device_id)
        assert steady_psi < 0.25 < shifted_psi, (steady_psi, shifted_psi)

        # 1.1.0 with the drift gate: steady inputs pass it, then smudged ones halt the rollout
        r = admin.post("/api/v1/rollouts", json={
            "bundle": {"name": "digits", "version": "1.1.0"}, "phases": [100], "min_soak_s": 3600, "on_breach": "halt",
            "gates": {**OFF, "max_input_drift": 0.25, "min_drift_samples": 1000}, "start": True})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        for d in (steady, shifted):
            d.sync(director_root)
            assert d.active["version"] == "1.1.0"
        time.sleep(1.0)  # the ingester re-reads rollout membership at most every 0.5 s
        for _ in range(3):
            publish_window(pub, steady, clean[rng.choice(len(clean), 400)])

        def gate() -> dict[str, Any]:
            status = admin.get(f"/api/v1/rollouts/{rid}").json()
            return next(g for g in status["decision"]["gates"] if g["name"] == "input_drift") | {"state":
                                                                                                status["state"]}

        ok = wait_for(lambda: (g := gate())["status"] == "ok" and g, what="the drift gate to have data")
        assert ok["value"] < 0.25 and ok["state"] == "running"
        for _ in range(6):
            publish_window(pub, shifted, faint[rng.choice(len(faint), 400)])
        wait_for(lambda: admin.get(f"/api/v1/rollouts/{rid}").json()["state"] == "halted", what="the drift halt")
        halt = admin.get(f"/api/v1/rollouts/{rid}").json()["halt"]
        assert [g["name"] for g in halt["breached"]] == ["input_drift"]
        assert halt["breached"][0]["value"] > 0.25
    finally:
        pub.close()
        admin.close()
        for d in (steady, shifted):
            d.close()
