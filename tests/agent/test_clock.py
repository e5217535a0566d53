"""A device clock set back (a dead RTC battery, a forged NTP answer) below the newest signed time the agent
accepted: updates are refused with ``clock_regression`` instead of trusting expiry checks on that clock.

The clock is the agent's injected :class:`~device_agent.clock.Clock` (the wall clock plus an offset, as the
device's rewound clock would read); everything else is real: signed assignments, a TUF repository whose
timestamp has expired, HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

from device_agent.clock import SystemClock
from device_agent.states import State
from tests.agent.conftest import DEVICE, HARDWARE, drive, outbox_events
from tests.agent.fakeserver import FakeUpdateServer


class RewoundClock(SystemClock):
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return super().now() + self.offset


def _refusals(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "update_refused" and e["detail"]["error"] == "clock_regression"]


def test_a_rewound_clock_is_refused_not_trusted_for_expiry(
        fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable, agent_config: Callable) -> None:
    clock = RewoundClock()
    bundle("1.0.0", 1)
    agent = make_agent(agent_config(), clock=clock)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(agent)
    floor = datetime.fromisoformat(agent.record.clock_floor)  # the director signed that assignment at `floor`
    assert abs((floor - clock.now()).total_seconds()) < 60
    assert json.loads((agent.store.file).read_bytes())["clock_floor"] == agent.record.clock_floor

    # An attacker serves metadata that expired an hour ago and sets the device clock back a day: on that
    # clock the expired timestamp would look valid. The agent refuses to decide on it.
    bundle("1.1.0", 2)
    fake_server.resign(timestamp_expires=timedelta(hours=-1))
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-2")
    clock.offset = -timedelta(days=1)
    fake_server.requests.clear()
    drive(agent)
    (refusal,) = _refusals(outbox_events(agent))
    detail = refusal["detail"]
    assert detail["floor"] == agent.record.clock_floor and detail["behind_s"] > 80_000
    assert "clock" in detail["message"] and "NTP" in detail["message"]
    assert agent.record.active.version == "1.0.0" and agent.record.state is State.IDLE
    assert agent.record.refused is None or agent.record.refused.get("bundle") != ["digits", "1.1.0"]
    assert not [p for _, p in fake_server.requests if "/tuf/image/" in p]  # nothing fetched or checked on it
    drive(agent)  # the server hears it at every check-in; the event is not repeated
    assert fake_server.last_checkin["last_error"]["error"] == "clock_regression"
    assert len(_refusals(outbox_events(agent))) == 1

    # The floor is persisted: a restart on the rewound clock still refuses.
    agent.close()
    again = make_agent(agent_config(), clock=clock)
    drive(again)
    assert again.record.last_error["error"] == "clock_regression" and again.record.active.version == "1.0.0"

    # The clock is set right: the expired metadata is now refused as expired, a fresh one installs.
    clock.offset = timedelta(0)
    drive(again)
    assert again.record.last_error["error"] == "ExpiredMetadataError"
    fake_server.resign()
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-2")
    drive(again)
    assert again.record.active.version == "1.1.0" and again.record.last_error is None
    assert datetime.fromisoformat(again.record.clock_floor) > floor  # moved forward with the new assignment
