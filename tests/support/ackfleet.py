"""Devices made of the agent's real telemetry parts (``Outbox``, ``Telemetry``, ``MqttPublisher``) against a
real update server and a real broker: what the end-to-end acknowledgement tests and bench/bench_e2e_ack.py
drive. Only the state machine and the inference worker are left out; the check-in carries the outbox
figures (``Telemetry.progress``) and hands the answer's ``telemetry.committed_seq`` back
(``Telemetry.committed``), as ``device_agent.steps`` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from device_agent.clock import SystemClock
from device_agent.outbox import Outbox
from device_agent.telemetry import MqttPublisher, Telemetry

BUNDLE = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}


class AckDevice:
    """One enrolled device with a persisted outbox under ``state_dir``."""

    def __init__(self, server_url: str, device_id: str, token: str, broker: Any, state_dir: Path, *,
                 resend_s: float = 3.0, publish_timeout_s: float = 5.0) -> None:
        self.device_id = device_id
        self.http = httpx.Client(base_url=server_url, timeout=10)
        r = self.http.post("/api/v1/devices/enroll", json={
            "enrollment_token": token, "device_id": device_id, "hardware_id": "x86-kiosk",
            "platform": "linux-x86_64", "agent_version": "0.1.0", "runtimes": {}, "tags": {}})
        assert r.status_code == 201, r.text
        body = r.json()
        self.credential = body["credential"]
        account = body["mqtt"]
        self.outbox = Outbox(state_dir / device_id)
        publisher = MqttPublisher(broker.url, device_id, username=account["username"], password=account["password"],
                                  client_id=account["client_id"], ca_file=str(broker.ca_file), keepalive_s=5)
        publisher.client.reconnect_delay_set(0.2, 1)
        self.telemetry = Telemetry(device_id, self.outbox, publisher, SystemClock(), context=lambda: (BUNDLE, None),
                                   publish_timeout_s=publish_timeout_s, resend_s=resend_s)
        self.telemetry.start()

    def retarget(self, server_url: str) -> None:
        """Check in at another address from now on (a server restarted on another port)."""
        old, self.http = self.http, httpx.Client(base_url=server_url, timeout=10)
        old.close()

    def produce(self, n: int = 1) -> None:
        """``n`` windows of one request each (what the device will expect the server to hold)."""
        for _ in range(n):
            now = datetime.now(timezone.utc).isoformat()
            self.telemetry.window({"start": now, "end": now, "requests": 1, "errors": 0})

    @property
    def produced(self) -> int:
        return self.outbox.seq

    def check_in(self) -> bool:
        try:
            r = self.http.post(f"/api/v1/devices/{self.device_id}/checkin",
                               headers={"Authorization": f"Bearer {self.credential}"},
                               json={"state": "idle", "active": BUNDLE, **self.telemetry.progress()})
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        self.telemetry.committed(r.json()["telemetry"]["committed_seq"])
        return True

    def close(self) -> None:
        self.telemetry.stop()
        self.http.close()


class AckFleet:
    """Devices checking in every ``interval_s`` from one background thread (a server that is down just
    makes the check-ins fail: the devices keep their outboxes)."""

    def __init__(self, devices: list[AckDevice], interval_s: float = 0.5) -> None:
        self.devices = devices
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ack-checkins", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for d in self.devices:
                d.check_in()
            self._stop.wait(self.interval_s)

    def produce(self, n: int) -> None:
        for d in self.devices:
            d.produce(n)

    def drained(self) -> bool:
        """Every device's outbox is empty: the server has committed everything they produced."""
        return all(len(d.outbox) == 0 for d in self.devices)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for d in self.devices:
            d.close()


def server_counts(db_url: str, device_ids: list[str]) -> dict[str, dict[str, int]]:
    """What the server stored, straight from its database: windows per device (each window counts once in
    ``telemetry_aggregates``), the committed mark and the lost count."""
    from sqlalchemy import create_engine, func, select

    from update_server.models import TelemetryAggregate, TelemetryProgress

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            windows = dict(conn.execute(select(TelemetryAggregate.device_id, func.sum(TelemetryAggregate.windows))
                                        .where(TelemetryAggregate.device_id.in_(device_ids))
                                        .group_by(TelemetryAggregate.device_id)).all())
            progress = {r.device_id: r for r in conn.execute(
                select(TelemetryProgress).where(TelemetryProgress.device_id.in_(device_ids)))}
    finally:
        engine.dispose()
    return {d: {"windows": int(windows.get(d) or 0),
                "committed_seq": int(progress[d].committed_seq) if d in progress else 0,
                "lost": int(progress[d].lost) if d in progress else 0} for d in device_ids}


class Producer:
    """Every device produces ``rate`` windows per second from a background thread (what keeps producing
    while a fault is injected)."""

    def __init__(self, fleet: AckFleet, rate: float) -> None:
        self.fleet, self.rate = fleet, rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ack-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.fleet.produce(1)
            self._stop.wait(1.0 / self.rate)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


ROOT = Path(__file__).resolve().parents[2]


def server_env(data_dir: Path, keys_dir: Path, db_url: str, broker: Any) -> tuple[dict[str, str], str]:
    """Environment and URL of ``edgepack-server serve`` as a subprocess (one worker) on ``broker``."""
    from tests.support import services

    port = services.free_port()
    broker_env = {f"EDGEPACK_{k.upper()}": str(v) for k, v in
                  broker.server_settings(account_prefix=f"k{uuid.uuid4().hex[:6]}-").items() if v is not None}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEPACK_DATA_DIR": str(data_dir),
           "EDGEPACK_KEYS_DIR": str(keys_dir), "EDGEPACK_DATABASE_URL": db_url,
           "EDGEPACK_PORT": str(port), "EDGEPACK_WORKERS": "1", "EDGEPACK_POLL_INTERVAL_S": "1",
           "EDGEPACK_BROKER_CHECK": "false", **broker_env,
           "EDGEPACK_MQTT_SHARE_GROUP": f"g-{uuid.uuid4().hex[:8]}",
           "EDGEPACK_MQTT_CLIENT_ID": f"srv-{uuid.uuid4().hex[:8]}"}
    return env, f"http://127.0.0.1:{port}"


def enroll_token_cli(env: dict[str, str], uses: int) -> str:
    out = subprocess.run([sys.executable, "-m", "update_server.cli", "enroll-token", "--uses", str(uses)], env=env,
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def serve_process(env: dict[str, str], url: str, log: Path) -> subprocess.Popen[bytes]:
    """Start the server subprocess; returns once ``/readyz`` answers 200 (its output goes to ``log``)."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "update_server.cli", "serve", "--log-level", "warning"],
                                env=env, cwd=ROOT, stdout=out, stderr=out)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 90, "the server to be ready")
    except BaseException:
        end_process(proc)
        raise
    return proc


def end_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
