"""The configuration file and the transition table: pure, tested with tables of cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.config import load_config
from device_agent.errors import ConfigError
from device_agent.states import TRANSITIONS, Event, State, TransitionError, next_state

GOOD = """
device_id = "kiosk-1"
hardware_id = "rpi4"
state_dir = "/var/lib/edgepack-agent"
[server]
url = "https://s:8080"
[trust]
image_root = "root.json"
director_root = "/etc/edgepack/director-root.json"
[trial]
period_s = 10
"""


def test_good_config(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(GOOD)
    c = load_config(tmp_path / "a.toml")
    assert c.trial.period_s == 10.0 and c.limits.download_deadline_s == 900
    assert c.path(c.trust.image_root) == Path("/var/lib/edgepack-agent/root.json")
    assert c.path(c.trust.director_root) == Path("/etc/edgepack/director-root.json")


@pytest.mark.parametrize("change, fragment", [
    (("[trial]\nperiod_s = 10", "[trial]\nperiod = 10"), "unknown key(s) ['period']"),
    (("[trial]\nperiod_s = 10", "[trial]\nperiod_s = -1"), "must not be negative"),
    (("[trial]\nperiod_s = 10", '[trial]\nperiod_s = "ten"'), "must be float"),
    (('device_id = "kiosk-1"', 'device_id = "../etc"'), "device_id must match"),
    (('url = "https://s:8080"', 'url = "s:8080"'), "must start with http"),
    (('[trust]\nimage_root = "root.json"', "[trusted]"), "unknown top-level key"),
    (('state_dir = "/var/lib/edgepack-agent"', ""), "`state_dir` is required"),
    (("[trial]", "[api]\nlisten = \"nowhere\"\n[trial]"), "HOST:PORT or unix:"),
    (("[trial]", "[trial"), "not valid TOML"),
])
def test_bad_config_says_what_is_wrong(tmp_path: Path, change: tuple[str, str], fragment: str) -> None:
    (tmp_path / "a.toml").write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.toml")
    assert fragment in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Path("/nonexistent/agent.toml"))


def test_every_state_resumes_in_itself_and_idle_is_reachable_from_everywhere() -> None:
    for state in State:
        assert next_state(state, Event.BOOT) is state
    for state in State:
        seen, frontier = {state}, [state]
        while frontier:
            s = frontier.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is s and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert State.IDLE in seen


@pytest.mark.parametrize("state, event, expected", [
    (State.IDLE, Event.ASSIGNMENT, State.DOWNLOADING),
    (State.DOWNLOADING, Event.RETRY, State.IDLE),
    (State.SELFTEST, Event.FAILED, State.IDLE),
    (State.ACTIVATING, Event.FAILED, State.ROLLING_BACK),
    (State.TRIAL, Event.TRIAL_FAILED, State.ROLLING_BACK),
    (State.TRIAL, Event.TRIAL_PASSED, State.COMMITTING),
])
def test_edges(state: State, event: Event, expected: State) -> None:
    assert next_state(state, event) is expected


def test_no_edge_is_an_error() -> None:
    with pytest.raises(TransitionError, match="no transition from committing on assignment"):
        next_state(State.COMMITTING, Event.ASSIGNMENT)
