"""systemd's watchdog sees the acting thread: pinged while the agent waits (idle for an hour between check-ins
is progress), silent while a step is stuck (a check-in to a server that does not answer)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bundles.assemble import BundleInfo
from tests.agent.conftest import DEVICE, HARDWARE, AgentProcess, wait_for
from tests.agent.fakeserver import FakeUpdateServer

INTERVAL_S = 2.0


def _pings(sock: socket.socket, seconds: float) -> list[float]:
    """Monotonic times of the WATCHDOG=1 messages received within ``seconds``."""
    seen, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(256) == b"WATCHDOG=1":
                seen.append(time.monotonic())
        except TimeoutError:
            break
    return seen


@pytest.mark.slow
def test_watchdog_is_pinged_while_waiting_and_not_while_stuck(
        fake_server: FakeUpdateServer, bundle: Callable[..., BundleInfo], agent_process: Callable[..., AgentProcess],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(INTERVAL_S * 1e6)))
    bundle("1.0.0", 1)
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    agent = agent_process(server={"request_timeout_s": 8})
    try:
        agent.start()
        wait_for("1.0.0 installed", lambda: (agent.status()["serving"] or {}).get("version") == "1.0.0", agent=agent)
        # idle: the next check-in is an hour away, and the agent waiting for it is alive
        assert len(_pings(sock, 3 * INTERVAL_S)) >= 4
        # a server that does not answer holds the check-in (the acting thread) for 8 s: no pings meanwhile
        fake_server.checkin_delay_s = 7.0
        fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
        agent.stop()
        agent.start(wait=False)
        wait_for("the agent booted", lambda: fake_server.last_checkin.get("state") is not None, agent=agent)
        fake_server.last_checkin = {}
        wait_for("a check-in in progress", lambda: fake_server.last_checkin, agent=agent)
        stuck = _pings(sock, 5.0)
        assert len(stuck) <= 1  # at most one sent before the beat went stale
        fake_server.checkin_delay_s = 0.0
        assert len(_pings(sock, 3 * INTERVAL_S)) >= 2  # answered (or timed out): pinged again
    finally:
        sock.close()
