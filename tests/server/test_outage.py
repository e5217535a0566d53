"""The database stopped and restarted under load: requests get 503 (with Retry-After) while it is down, and
the same server process serves, ingests and evaluates again once it is back; telemetry sent meanwhile is
not lost (the broker keeps it until the ingester has committed and acknowledged it)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.server.conftest import LiveServer, PrivatePostgres, enrollment_token, wait_for
from tests.server.sim import Publisher, SimDevice

pytestmark = [pytest.mark.postgres, pytest.mark.mqtt, pytest.mark.slow]


def test_database_stopped_and_restarted_under_load(private_postgres: PrivatePostgres,
                                                   make_server: Callable[..., LiveServer], session_broker: Any) -> None:
    prefix = f"edgepack-outage-{uuid.uuid4().hex[:8]}/v1/devices"
    server = make_server(private_postgres.url, broker=session_broker, prefix=prefix)
    token = enrollment_token(server, uses=10)
    devices = [SimDevice(server.url, f"o-{i}") for i in range(4)]
    for d in devices:
        d.enroll(token)
        d.active = {"name": "digits", "version": "1.0.0", "release_counter": 1, "variant": "onnx-fp32"}
    statuses: Counter[int] = Counter()
    retry_after_ok = True
    stop = threading.Event()

    def load() -> None:
        nonlocal retry_after_ok
        while not stop.is_set():
            for d in devices:
                try:
                    r = d.checkin()
                except httpx.HTTPError:
                    statuses[0] += 1
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 503:
                    retry_after_ok &= r.headers.get("retry-after") == "2"
            time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    pub = Publisher(session_broker, prefix, devices)
    try:
        wait_for(lambda: statuses[200] > 20, what="check-ins before the outage")
        private_postgres.stop()
        wait_for(lambda: statuses[503] > 10, timeout=30, what="503 while the database is down")
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        for d in devices:  # telemetry during the outage
            for _ in range(10):
                pub.window(d, bundle=d.active)
        time.sleep(1)
        private_postgres.start()
        ok_before = statuses[200]
        wait_for(lambda: statuses[200] > ok_before + 20, timeout=60, what="check-ins after the restart")
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        wait_for(lambda: server.ctx.counters.snapshot().get("telemetry_ingested", 0) >= 40, timeout=60,
                 what="telemetry sent during the outage to be ingested")
    finally:
        stop.set()
        worker.join(30)
        pub.close()
    assert retry_after_ok
    assert set(statuses) <= {200, 503}, statuses  # never a 500 or a dropped connection
    with server.admin as client:
        assert client.get("/api/v1/devices").json()["total"] == 4
