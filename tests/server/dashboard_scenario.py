"""A small real scenario for the dashboard: a live server, simulated devices, a rollout halted by a gate, one
running, telemetry with input statistics. Used by the browser tests and by scripts/dashboard_screenshots.py.

Group ``a`` runs digits 1.0.0; 1.2.0 goes to it in phases 50/100 % and a crash on a first-phase device halts
it on the ``crash_rate`` gate (``on_breach: halt``, so it stays halted for the operator). Group ``b`` gets 1.1.0
with an hour-long soak: it stays running, for pausing from the browser.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push, start_server, wait_for
from tests.server.sim import Publisher, SimDevice
from tests.support.factories import digits_data

OLD = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}


@dataclass
class Scenario:
    live: LiveServer
    halted: str
    running: str
    viewer: str
    operator: str
    devices: list[SimDevice]


def input_stats(x: np.ndarray, profile: dict[str, Any]) -> dict[str, Any]:
    """What an agent sends for inputs ``x`` (rows of 64 values in [0, 1]): moments and drift counts."""
    from bundles.drift import DriftCounter, DriftProfile

    counter = DriftCounter(DriftProfile.from_dict(profile))
    counter.observe({"input": x.astype(np.float32)}, {})
    return {"count": len(x), "mean": x.mean(axis=0).round(6).tolist(), "std": x.std(axis=0).round(6).tolist(),
            "hist": counter.take()}


def publish_window(pub: Publisher, device: SimDevice, x: np.ndarray, *, correct: int = 38) -> dict[str, Any]:
    """A window of one request per row of ``x`` (the device's inputs), with the input statistics an agent sends."""
    import json

    from tests.support.factories import reference_profile

    msg = pub.envelope(device, "window", device.active)
    n = len(x)
    msg["window"] = {"start": msg["sent_at"], "end": msg["sent_at"], "requests": n, "errors": 0, "crashes": 0,
                     "latency_ms": {"bounds": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
                                    "counts": [0, n // 2, n - n // 2, 0, 0, 0, 0, 0, 0, 0, 0]},
                     "feedback": {"count": 40, "correct": correct}, "predicted_classes": {"1": n // 2, "7": n - n // 2},
                     "input_stats": input_stats(x, reference_profile())}
    pub.publish(f"{pub.prefix}/{device.device_id}/telemetry/window", json.dumps(msg).encode(), device)
    return msg


def build(keys: KeyStore, bundles: dict[str, Any], work: Path, broker: Any, n: int = 8) -> Scenario:
    """``broker``: a ``services.Mosquitto`` (TLS, accounts); devices publish on the accounts they enroll with."""
    from update_server.security import Role
    from update_server.services.tokens import create_api_token

    prefix = f"edgepack-ui-{uuid.uuid4().hex[:8]}/v1/devices"
    live = start_server(keys=keys, data_dir=work / "data", db_url=f"sqlite:///{work / 'server.db'}",
                        broker=broker, prefix=prefix, gate_history_interval_s=0.5)
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        assert push(live, bundles[version]).status_code == 201
    devices = []
    for group in ("a", "b"):
        token = enrollment_token(live, uses=n, group=group)
        for i in range(n):
            d = SimDevice(live.url, f"kiosk-{group}{i:02d}")
            d.enroll(token)
            d.active = dict(OLD)
            d.checkin()
            devices.append(d)
    director_root = (keys.directory / "online" / "director-root.json").read_bytes()
    images, _ = digits_data()
    x = images.reshape(-1, 64) / 16.0
    pub = Publisher(broker, prefix, devices)
    try:
        rng = np.random.default_rng(7)
        for d in devices:
            publish_window(pub, d, x[rng.choice(len(x), 100)])
        with live.admin as client:
            r = client.post("/api/v1/rollouts", json={
                "bundle": {"name": "digits", "version": "1.2.0"}, "selector": {"group": "a"},
                "phases": [50, 100], "min_soak_s": 3600, "on_breach": "halt", "start": True, "canary_devices": 3,
                "gates": {"max_crash_rate": 0.05}, "reason": "dashboard scenario: a release that crashes"})
            assert r.status_code == 201, r.text
            halted = r.json()["id"]
            r = client.post("/api/v1/rollouts", json={
                "bundle": {"name": "digits", "version": "1.1.0"}, "selector": {"group": "b"},
                "phases": [25, 100], "min_soak_s": 3600, "start": True, "reason": "dashboard scenario: a good one"})
            assert r.status_code == 201, r.text
            running = r.json()["id"]
        for d in devices:
            d.sync(director_root)
            d.checkin()  # report the new version in the inventory
        # The ingester re-reads rollout membership at most every 0.5 s: a real device takes longer than that to
        # install; here, wait so its first telemetry on the new version counts for the rollout.
        time.sleep(1.0)
        for d in devices:
            publish_window(pub, d, x[rng.choice(len(x), 100)])
        # the release crashes on every device that got it (the crash gate needs 3 crashed devices to be sure)
        for crashed in [d for d in devices if d.device_id.startswith("kiosk-a") and d.active["version"] == "1.2.0"]:
            pub.event(crashed, "crash", target=crashed.active, detail={"exitcode": -11, "phase": "serving"})
        try:
            wait_for(lambda: live.admin.get(f"/api/v1/rollouts/{halted}").json()["state"] == "halted", timeout=30,
                     what="the crash gate to halt 1.2.0")
        except AssertionError as exc:
            status = live.admin.get(f"/api/v1/rollouts/{halted}").json()
            raise AssertionError(f"{exc}: {json.dumps(status)[:3000]} {live.ctx.counters.snapshot()}") from None
    finally:
        pub.close()
    from datetime import datetime, timezone

    with live.ctx.sessions() as session, session.begin():
        now = datetime.now(timezone.utc)
        _, viewer = create_api_token(session, name="vera-viewer", role=Role.VIEWER, actor="tests", now=now)
        _, operator = create_api_token(session, name="otto-operator", role=Role.OPERATOR, actor="tests", now=now)
    return Scenario(live, halted, running, viewer, operator, devices)
