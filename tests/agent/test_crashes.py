"""A worker killed by a signal during the self-test or the trial: contained, reported, rolled back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable

from device_agent.machine import Agent
from device_agent.states import State
from tests.agent.conftest import DEVICE, HARDWARE, drive, outbox_events
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data


def _serving_version(agent: Agent) -> str:
    images, _ = digits_data()
    for _ in range(100):  # a crashed worker is restarted within a moment
        status, body = agent.predict(json.dumps({"inputs": images[:1].tolist()}).encode())
        if status == 200:
            return str(json.loads(body)["model"]["version"])
        time.sleep(0.05)
    raise AssertionError(f"agent does not serve: {status} {body!r}")


def test_crash_during_trial_rolls_back(fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable,
                                       agent_config: Callable) -> None:
    bundle("1.0.0", 1)
    agent = make_agent(agent_config(trial={"period_s": 0.3}))
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(agent)
    agent.config = agent_config(trial={"period_s": 30, "health_interval_s": 0.2})  # a long trial for 1.1.0
    bundle("1.1.0", 2)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-7")
    drive(agent, until=State.TRIAL)
    assert _serving_version(agent) == "1.1.0"
    victim = agent.supervisor.status()["pid"]
    os.kill(victim, signal.SIGSEGV)
    assert agent.step() is State.ROLLING_BACK
    assert agent.step() is State.IDLE
    assert _serving_version(agent) == "1.0.0"
    events = outbox_events(agent)
    crash = next(e for e in events if e["event"] == "crash")
    assert crash["detail"]["signal"] == signal.SIGSEGV and crash["detail"]["phase"] == "trial"
    rolled = events[-1]
    assert rolled["event"] == "rolled_back" and rolled["target"]["version"] == "1.1.0"
    assert rolled["detail"]["to"]["version"] == "1.0.0" and rolled["detail"]["error"] == "trial_crash"
    assert rolled["rollout_id"] == "r-7"
    assert [p.name for p in agent.store.bundles.iterdir()] == [agent.record.active.slot]
    # the failed bundle is not installed again until the server issues a newer assignment
    drive(agent)
    assert agent.record.active.version == "1.0.0" and agent.record.state is State.IDLE
    agent.config = agent_config(trial={"period_s": 0.3})  # the re-issued 1.1.0 need not sit out 30 s again
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    drive(agent)
    assert agent.record.state is State.IDLE and agent.record.active.version == "1.1.0"


def test_crash_during_selftest_is_reported_and_keeps_the_old_model(
        fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable, agent_config: Callable) -> None:
    bundle("1.0.0", 1)
    agent = make_agent(agent_config(debug={"step_delay_s": 0.4}))
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(agent)
    bundle("1.1.0", 2)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0")
    agent.check_in_now()
    while agent.step() is not State.SELFTEST:
        pass
    killed: list[int] = []

    def kill_loading_worker() -> None:
        for _ in range(400):
            pid = agent.supervisor.status()["loading_pid"]
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    t = threading.Thread(target=kill_loading_worker)
    t.start()
    assert agent.step() is State.IDLE
    t.join()
    assert killed
    names = [e["event"] for e in outbox_events(agent)]
    assert names[-2:] == ["crash", "selftest_failed"]
    crash, failed = outbox_events(agent)[-2:]
    assert crash["detail"]["signal"] == signal.SIGKILL and crash["detail"]["phase"] == "selftest"
    assert failed["target"]["version"] == "1.1.0"
    assert _serving_version(agent) == "1.0.0"


def test_crash_while_serving_restarts_the_worker(fake_server: FakeUpdateServer, bundle: Callable,
                                                 make_agent: Callable) -> None:
    bundle("1.0.0", 1)
    agent = make_agent()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(agent)
    pid = agent.supervisor.status()["pid"]
    os.kill(pid, signal.SIGABRT)
    assert _serving_version(agent) == "1.0.0"
    assert agent.supervisor.status()["pid"] != pid and agent.supervisor.crashes == 1
    crash = [e for e in outbox_events(agent) if e["event"] == "crash"]
    assert crash[0]["detail"] == {"signal": signal.SIGABRT, "error": "crash", "message": crash[0]["detail"]["message"],
                                  "phase": "serving"}
    assert agent.window.take(agent.clock.now())["crashes"] == 1
