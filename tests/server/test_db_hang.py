"""The database hangs (its processes SIGSTOPped: connections are accepted and bytes acknowledged by the kernel,
nothing answers): the server answers 503 with Retry-After promptly instead of hanging, on /readyz, check-ins
and admin requests alike, and serves again on its own once the database resumes. (A database that is
*stopped* is test_outage.py.) Timings here are sanity bounds only; the measured figures are in
docs/benchmarks.md (bench/bench_faults.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.server.conftest import LiveServer, PrivatePostgres, enrollment_token, wait_for
from tests.server.sim import SimDevice

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SANITY_S = 10.0  # the design figure is under 3 s (probe interval + probe timeout); this only catches a hang


def _timed(request: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    response = request()
    return response, time.monotonic() - t0


def test_hung_database_gets_503_with_retry_after_and_recovers(private_postgres: PrivatePostgres,
                                                              make_server: Callable[..., LiveServer]) -> None:
    server = make_server(private_postgres.url)
    device = SimDevice(server.url, "hang-1")
    device.enroll(enrollment_token(server, uses=2))
    assert device.checkin().status_code == 200  # both pools hold live connections now
    admin = server.admin
    assert admin.get("/api/v1/devices").status_code == 200
    plain = httpx.Client(base_url=server.url, timeout=60)
    try:
        private_postgres.freeze()
        answers = {
            "readyz": _timed(lambda: plain.get("/readyz")),  # first: on a pooled connection that now hangs
            "checkin": _timed(device.checkin),
            "admin": _timed(lambda: admin.get("/api/v1/devices")),
            "enroll": _timed(lambda: plain.post("/api/v1/devices/enroll", json={
                "enrollment_token": "x" * 20, "device_id": "hang-2", "hardware_id": "x86-kiosk"})),
        }
        for name, (response, elapsed) in answers.items():
            assert response.status_code == 503, (name, response.status_code, response.text)
            assert response.headers.get("retry-after") == "2", name
            assert elapsed < SANITY_S, (name, elapsed)
        assert server.ctx.db_guard.down
    finally:
        private_postgres.thaw()
    wait_for(lambda: plain.get("/readyz").status_code == 200, timeout=60, what="/readyz after the thaw")
    wait_for(lambda: device.checkin().status_code == 200, timeout=30, what="check-ins after the thaw")
    assert admin.get("/api/v1/devices").json()["total"] == 1
    assert not server.ctx.db_guard.down
    plain.close()
    admin.close()
