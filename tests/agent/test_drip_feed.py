"""A drip-feeding server (TUF's slow-retrieval attack, or a congested link): a real HTTP server sends the
bundle one byte at a time. Each attempt ends at the overall deadline; the agent keeps its partial files and
resumes them, keeps checking in *during* the download, backs off exponentially between attempts, and after
``limits.download_stalled_after`` attempts reports ``install_failed`` (reason ``download_stalled``) once,
which the rollout's install-failure gate counts. When the link recovers the update completes."""

from __future__ import annotations

import json
from collections.abc import Callable

from device_agent.states import State
from tests.agent.conftest import DEVICE, HARDWARE, drive, outbox_events
from tests.agent.fakeserver import FakeUpdateServer

ATTEMPTS = 3


def _checkins(server: FakeUpdateServer) -> int:
    return sum(1 for m, p in server.requests if m == "POST" and p.endswith("/checkin"))


def test_drip_feed_counts_attempts_reports_once_and_keeps_checking_in(
        fake_server: FakeUpdateServer, bundle: Callable, make_agent: Callable, agent_config: Callable) -> None:
    bundle("1.0.0", 1)
    agent = make_agent(agent_config(limits={"download_deadline_s": 1.0, "download_stalled_after": ATTEMPTS,
                                            "backoff_initial_s": 0.4, "backoff_max_s": 5.0}))
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    drive(agent)
    bundle("1.1.0", 2)
    fake_server.poll_interval_s = 0.25  # the server's answer sets the device's poll interval
    fake_server.drip_s = 0.005          # about 200 bytes/s: the 14 kB bundle would take over a minute
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-drip")
    agent.check_in_now()
    parts, delays = [], []
    for attempt in range(1, ATTEMPTS + 1):
        assert agent.step() is State.DOWNLOADING
        before = _checkins(fake_server)
        assert agent.step() is State.IDLE  # the deadline ended the attempt
        assert _checkins(fake_server) - before >= 2  # checked in during the 1 s attempt (every 0.25 s)
        rec = agent.record
        assert rec.attempts is not None and rec.attempts.count == attempt and rec.pending is None
        parts.append(sum(p.stat().st_size for p in agent.store.staging.rglob("*.part")))
        delays.append(rec.last_error["retry_in_s"])
        stalled = [e for e in outbox_events(agent) if e["event"] == "install_failed"]
        if attempt < ATTEMPTS:
            assert rec.last_error["error"] == "slow_retrieval" and not stalled
        assert agent.status()["serving"]["version"] == "1.0.0"
    assert parts == sorted(parts) and parts[0] < parts[-1]  # partial files kept and resumed, never restarted
    assert delays[0] <= delays[1] <= delays[2] and delays[0] < delays[2]  # exponential backoff (jittered)
    (event,) = stalled
    detail = event["detail"]
    assert event["target"]["version"] == "1.1.0" and event["rollout_id"] == "r-drip"
    assert detail["error"] == "download_stalled" and detail["cause"] == "slow_retrieval"
    assert detail["attempts"] == ATTEMPTS and 0 < detail["bytes_have"] < detail["bytes_total"]
    assert f"{ATTEMPTS} download attempts failed" in detail["message"]
    # the operator sees it at the next check-in (edgepack devices show: last_error)
    assert agent.step() is State.DOWNLOADING
    assert fake_server.last_checkin["last_error"]["error"] == "download_stalled"
    assert agent.step() is State.IDLE
    assert [e["event"] for e in outbox_events(agent)].count("install_failed") == 1  # reported once
    # the link recovers: the download resumes where it was and the update completes
    fake_server.drip_s = None
    drive(agent)
    assert agent.record.active.version == "1.1.0" and agent.record.attempts is None
    assert json.loads(agent.predict(json.dumps({"inputs": [[[0.0] * 8] * 8]}).encode())[1])["model"]["version"] \
        == "1.1.0"
