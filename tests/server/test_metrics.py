"""``/metrics``: one seam for every server counter, correct across uvicorn worker processes.

The multi-worker test runs the real ``edgepack-server serve --workers 2`` (prometheus-client multiprocess
mode, managed by ``serve``) against PostgreSQL and the machine's broker, and parses the scrape with
prometheus-client's own parser.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bundles.keys import KeyStore
from tests.server.conftest import LiveServer, enrollment_token, push, wait_for
from tests.server.sim import Publisher, SimDevice
from tests.support import services

ROOT = Path(__file__).resolve().parents[2]
DEVICES, WINDOWS, REQUESTS = 5, 20, 100
TOTAL = DEVICES * WINDOWS


def scrape(url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_seam_drop_reasons_and_auth(mqtt_server: LiveServer) -> None:
    """A counter added anywhere with ctx.counters.add shows in /metrics and /api/v1/admin/stats alike."""
    live = mqtt_server
    assert httpx.get(f"{live.url}/metrics").status_code == 401  # same tokens as the API
    device = SimDevice(live.url, "dev-x")
    device.enroll(enrollment_token(live, uses=1))
    pub = Publisher(live.broker, live.prefix, [device])
    try:
        pub.publish(f"{live.prefix}/dev-x/telemetry/window", b"{not json")
        pub.publish(f"{live.prefix}/dev-x/telemetry/window", b"x" * (live.ctx.settings.max_message_bytes + 1))
    finally:
        pub.close()
    wait_for(lambda: live.ctx.counters.snapshot().get("telemetry_dropped_oversized"), what="the drops")
    live.ctx.counters.add("some_future_counter", 3)
    samples = scrape(live.url, live.token)
    assert value(samples, "edgepack_telemetry_dropped_total", reason="malformed") == 1
    assert value(samples, "edgepack_telemetry_dropped_total", reason="oversized") == 1
    assert value(samples, "edgepack_telemetry_received_total") == 2
    assert value(samples, "edgepack_server_events_total", event="some_future_counter") == 3
    with live.admin as client:
        stats = client.get("/api/v1/admin/stats").json()["counters"]
    assert stats["telemetry_dropped_malformed"] == 1 and stats["some_future_counter"] == 3
    assert value(samples, "edgepack_http_requests_total", method="GET", route="/metrics", status="401") == 1


def _serve(tmp_path: Path, keys: KeyStore, db_url: str, broker: Any, prefix: str, mp_dir: Path) -> tuple[Any, str,
                                                                                                          str]:
    port = services.free_port()
    broker_env = {f"EDGEPACK_{k.upper()}": str(v) for k, v in
                  broker.server_settings(account_prefix=f"mp{uuid.uuid4().hex[:6]}-").items() if v is not None}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEPACK_DATA_DIR": str(tmp_path / "data"),
           "EDGEPACK_KEYS_DIR": str(keys.directory / "online"), "EDGEPACK_DATABASE_URL": db_url,
           "EDGEPACK_PORT": str(port), "EDGEPACK_WORKERS": "2", **broker_env,
           "EDGEPACK_MQTT_TOPIC_PREFIX": prefix, "EDGEPACK_MQTT_SHARE_GROUP": f"g-{uuid.uuid4().hex[:8]}",
           "EDGEPACK_MQTT_CLIENT_ID": f"srv-{uuid.uuid4().hex[:8]}", "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    out = subprocess.run([sys.executable, "-m", "update_server.cli", "create-token", "--name", "t"], env=env,
                         check=True, capture_output=True, text=True, cwd=ROOT, timeout=120)
    token = out.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen([sys.executable, "-m", "update_server.cli", "serve", "--log-level", "warning"], env=env,
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, "the server exited"
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=90, what="the server with two workers")
    return proc, url, token


@pytest.mark.slow
def test_metrics_add_up_across_two_workers(pg_url: str, session_keys: KeyStore, session_broker: Any,
                                           digits_bundles: dict[str, Any], tmp_path: Path) -> None:
    prefix = f"edgepack-mp-{uuid.uuid4().hex[:8]}/v1/devices"
    mp_dir = tmp_path / "prom"
    proc, url, token = _serve(tmp_path, session_keys, pg_url, session_broker, prefix, mp_dir)
    try:
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        live = LiveServer(None, None, None, url, token, prefix)  # type: ignore[arg-type]
        assert push(live, digits_bundles["1.0.0"]).status_code == 201
        enroll = enrollment_token(live, uses=DEVICES)
        devices = [SimDevice(url, f"mp-{i}") for i in range(DEVICES)]
        for d in devices:
            d.enroll(enroll)
            d.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}

        def healthz(_: int) -> int:
            with httpx.Client(timeout=30) as c:  # a new connection each: the kernel spreads them over the workers
                return c.get(f"{url}/healthz", headers={"Connection": "close"}).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(healthz, range(REQUESTS))) == {200}
        pub = Publisher(session_broker, prefix, devices)
        try:
            for d in devices:
                for _ in range(WINDOWS):
                    pub.window(d)
        finally:
            pub.close()
        wait_for(lambda: admin.get("/api/v1/admin/stats").json()["counters"].get("telemetry_ingested", 0) >= TOTAL,
                 timeout=60, what=f"{TOTAL} windows ingested (summed over both workers)")

        files = {p.name for p in mp_dir.glob("counter_*.db")}
        assert len(files) >= 2, f"expected both workers to have served; metric files: {sorted(files)}"
        per_process = _per_process(mp_dir, "edgepack_server_events", "telemetry_ingested")
        assert len([n for n in per_process.values() if n > 0]) == 2, per_process  # both workers ingested a share
        for _ in range(3):  # whichever worker answers, every scrape sums both
            samples = scrape(url, token)
            assert value(samples, "edgepack_http_requests_total", method="GET", route="/healthz",
                         status="200") == REQUESTS
            assert value(samples, "edgepack_server_events_total", event="telemetry_ingested") == TOTAL
            assert value(samples, "edgepack_telemetry_received_total") == TOTAL
            assert value(samples, "edgepack_telemetry_lag_seconds_count") == TOTAL
            assert value(samples, "edgepack_model_requests_total", model="digits", version="1.0.0") == TOTAL * 100
        assert admin.get("/api/v1/admin/stats").json()["counters"]["telemetry_ingested"] == TOTAL
        admin.close()
    finally:
        proc.terminate()
        proc.wait(30)


def _per_process(mp_dir: Path, metric: str, label: str) -> dict[str, float]:
    """Each worker's own value of one counter (to show both did a share): each worker's multiprocess file is
    read alone by prometheus-client's MultiProcessCollector."""
    import shutil
    import tempfile

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    out: dict[str, float] = {}
    for path in mp_dir.glob("counter_*.db"):
        with tempfile.TemporaryDirectory() as one:
            shutil.copy(path, one)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=one)
            for family in registry.collect():
                for s in family.samples:
                    if family.name == metric and s.name.endswith("_total") and label in s.labels.values():
                        out[path.name] = out.get(path.name, 0.0) + s.value
    return out
