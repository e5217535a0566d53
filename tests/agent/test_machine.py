"""The update cycle against real signed bundles: install, update, verify, self-test, commit, roll back."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from device_agent.machine import Agent
from device_agent.states import State
from tests.agent.conftest import DEVICE, HARDWARE, drive, event_names, outbox_events
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data


def _predict(agent: Agent, n: int = 4) -> dict:
    images, _ = digits_data()
    status, body = agent.predict(json.dumps({"inputs": images[:n].tolist()}).encode())
    assert status == 200, body
    return json.loads(body)


def test_install_then_update_commits_and_serves_new_version(
        fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable) -> None:
    bundle("1.0.0", 1)
    agent = make_agent()
    assert agent.status()["serving"] is None
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0", rollout_id="r-1")
    states = drive(agent)
    assert states == [State.DOWNLOADING, State.VERIFYING, State.SELFTEST, State.ACTIVATING, State.TRIAL,
                      State.COMMITTING, State.IDLE]
    assert _predict(agent)["model"]["version"] == "1.0.0"

    bundle("1.1.0", 2)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-2")
    drive(agent)
    answer = _predict(agent)
    assert answer["model"] == {"name": "digits", "version": "1.1.0", "release_counter": 2, "variant": "onnx-fp32"}
    assert answer["predictions"] == [str(x) for x in np.asarray(answer["outputs"]["label"])]
    assert agent.record.previous is None and agent.record.pending is None
    assert sorted(p.name for p in agent.store.bundles.iterdir()) == [agent.record.active.slot]
    names = event_names(agent)
    assert names.count("committed") == 2
    assert names[-6:] == ["downloading", "downloaded", "verified", "selftest_passed", "activated", "committed"]
    committed = [e for e in outbox_events(agent) if e["event"] == "committed"][-1]
    assert committed["rollout_id"] == "r-2" and committed["target"]["version"] == "1.1.0"
    assert committed["bundle"]["version"] == "1.1.0"
    # the check-in reports what runs
    agent.check_in_now()
    agent.step()
    assert fake_server.last_checkin["active"]["version"] == "1.1.0"


def test_restart_resumes_from_persisted_state(
        fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable, agent_config: Callable) -> None:
    bundle("1.0.0", 1)
    agent = make_agent()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    agent.check_in_now()
    assert agent.step() is State.DOWNLOADING
    assert agent.step() is State.VERIFYING
    agent.close()
    again = make_agent(agent_config())
    assert again.record.state is State.VERIFYING
    drive(again)
    assert _predict(again)["model"]["version"] == "1.0.0"
