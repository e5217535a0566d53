"""The local API over TCP and a Unix socket, with the Python client: predict, feedback, status, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.api import LocalApi
from device_agent.client import AgentClient, ApiError
from device_agent.machine import Agent
from tests.agent.conftest import DEVICE, HARDWARE, drive
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data


@pytest.fixture
def agent(fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable) -> Agent:
    bundle("1.0.0", 1)
    a = make_agent()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(a)
    return a


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_predict_and_feedback_round_trip(agent: Agent, transport: str, tmp_path: Path) -> None:
    listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path / 'run' / 'agent.sock'}"
    api = LocalApi(agent, listen).start()
    images, labels = digits_data()
    try:
        with AgentClient(api.address) as client:
            assert client.health()
            answer = client.predict(images[:3].tolist())
            assert answer["model"]["version"] == "1.0.0" and len(answer["prediction_id"]) == 32
            assert answer["predictions"] == [str(x) for x in answer["outputs"]["label"]]
            assert len(answer["outputs"]["probabilities"]) == 3
            fb = client.feedback(answer["prediction_id"], [str(x) for x in labels[:3]])
            assert fb["model_version"] == "1.0.0" and len(fb["correct"]) == 3
            with pytest.raises(ApiError) as err:
                client.feedback(answer["prediction_id"], "1")  # one feedback per prediction
            assert err.value.status == 404
            with pytest.raises(ApiError) as err:
                client.predict([[1, 2, 3]])
            assert err.value.status == 400 and "(N, H, W)" in err.value.message
            with pytest.raises(ApiError) as err:
                client.request("POST", "/v1/nope", {})
            assert err.value.status == 404
            status = client.status()
            assert status["state"] == "idle" and status["serving"]["version"] == "1.0.0"
            assert status["worker"]["alive"]
        window = agent.window.take(agent.clock.now())
        assert window["requests"] == 2 and window["errors"] == 1
        assert window["feedback"]["count"] == 3
        assert sum(window["predicted_classes"].values()) == 3
    finally:
        api.close()


def test_too_large_and_no_model(fake_server: FakeUpdateServer, make_agent: Callable, agent_config: Callable) -> None:
    agent = make_agent(agent_config(api={"max_request_bytes": 1000}))
    api = LocalApi(agent, "127.0.0.1:0", max_body=1000).start()
    try:
        with AgentClient(api.address) as client:
            assert not client.health()
            with pytest.raises(ApiError) as err:
                client.predict([[0] * 8] * 8)
            assert err.value.status == 503 and "no model" in err.value.message
            with pytest.raises(ApiError) as err:
                client.predict([[0.123456] * 64] * 64)
            assert err.value.status == 413
    finally:
        api.close()


def test_a_refused_feedback_leaves_the_prediction_id_for_the_corrected_call(agent: Agent) -> None:
    api = LocalApi(agent, "127.0.0.1:0").start()
    images, labels = digits_data()
    try:
        with AgentClient(api.address) as client:
            answer = client.predict(images[:2].tolist())
            with pytest.raises(ApiError) as err:
                client.feedback(answer["prediction_id"], str(labels[0]))  # one label for a batch of two
            assert err.value.status == 400 and "expected 2 label(s)" in err.value.message
            assert "stays valid" in err.value.message
            fb = client.feedback(answer["prediction_id"], [str(x) for x in labels[:2]])  # the corrected retry
            assert len(fb["correct"]) == 2
            with pytest.raises(ApiError) as err:
                client.feedback(answer["prediction_id"], [str(x) for x in labels[:2]])
            assert err.value.status == 404  # an accepted feedback uses the id up
        assert agent.window.take(agent.clock.now())["feedback"]["count"] == 2  # the refused call counted nothing
    finally:
        api.close()
