"""The agent's optional local ``GET /metrics``: a real agent process, real predictions, scraped and parsed with
prometheus-client's own parser; off by default."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from device_agent.client import AgentClient, ApiError
from tests.agent.conftest import DEVICE, HARDWARE, AgentProcess
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data


def scrape(api: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{api}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_the_agent_served(fake_server: FakeUpdateServer, bundle: Callable,
                                             agent_process: Callable[..., AgentProcess]) -> None:
    bundle("1.0.0", 1)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    agent = agent_process(api={"metrics": True}, server={"poll_interval_s": 0.2}).start()
    try:
        deadline = time.monotonic() + 120
        while ((st := agent.status()).get("serving") or {}).get("version") != "1.0.0" or st["state"] != "idle":
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.2)
        images, labels = digits_data()
        with AgentClient(agent.api, timeout=30) as client:
            for i in range(5):
                answer = client.predict(images[i:i + 2].tolist())
                client.feedback(answer["prediction_id"], [str(x) for x in labels[i:i + 2]])
            with pytest.raises(ApiError):
                client.predict([[1, 2, 3]])  # a wrong shape: an error the metrics count
        m = scrape(agent.api)
        assert m[("edgepack_agent_requests_total", ())] == 6
        assert m[("edgepack_agent_errors_total", ())] == 1
        assert m[("edgepack_agent_feedback_total", ())] == 10
        assert 0 <= m[("edgepack_agent_feedback_correct_total", ())] <= 10
        assert m[("edgepack_agent_latency_seconds_count", ())] == 6
        assert m[("edgepack_agent_latency_seconds_bucket", (("le", "+Inf"),))] == 6
        assert m[("edgepack_agent_latency_seconds_sum", ())] > 0
        assert m[("edgepack_agent_worker_up", ())] == 1
        assert m[("edgepack_agent_state", (("state", "idle"),))] == 1
        assert m[("edgepack_agent_state", (("state", "trial"),))] == 0
        info = [k for k in m if k[0] == "edgepack_agent_info"]
        assert len(info) == 1 and ("version", "1.0.0") in info[0][1] and ("device_id", DEVICE) in info[0][1]
    finally:
        agent.stop()


def test_metrics_are_off_by_default(fake_server: FakeUpdateServer,
                                    agent_process: Callable[..., AgentProcess]) -> None:
    agent = agent_process().start()
    try:
        try:
            urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10)
            raise AssertionError("GET /metrics answered although [api] metrics is off")
        except urllib.error.HTTPError as err:
            assert err.code == 404 and "[api] metrics = true" in err.read().decode()
    finally:
        agent.stop()
