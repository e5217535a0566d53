"""The loop guard: an agent killed (``kill -9``) on every boot in one state of an update gives the update up.

A real agent process runs under a restart-always loop; a watcher kills it each time it boots into the
given state (the boot is counted in ``state.json`` before the state's step runs, which is what the watcher
waits for). Past ``limits.boot_loop_limit`` boots the agent does not run that step again: before
activation it refuses the update (``install_failed``, reason ``boot_loop``), from activation on it rolls
back (``rolled_back``, reason ``boot_loop``); either way it keeps serving the last good model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bundles.assemble import BundleInfo
from device_agent.client import AgentClient
from tests.agent.conftest import DEVICE, HARDWARE, AgentProcess, RestartAlways, process_events, wait_for
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data

LIMIT = 2


def _record(state_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((state_dir / "state.json").read_bytes()))
    except (OSError, ValueError):
        return None


def _kill_on_every_boot(agent: AgentProcess, state_dir: Path, state: str, stop: threading.Event,
                        killed: list[int]) -> None:
    """kill -9 the agent on entering ``state``, then each time it has counted one more boot there, up to LIMIT."""
    last = -1  # boots counted in ``state`` at the last kill: a new process is killed once it counted its own
    while not stop.wait(0.01):
        rec = _record(state_dir)
        proc = agent.proc
        if rec is None or proc is None or proc.poll() is not None:
            continue
        boots = ((rec.get("pending") or {}).get("boots") or {}).get(state, 0)
        if rec["state"] == state and last < boots <= LIMIT:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
            last = boots


def _serving(agent: AgentProcess) -> str:
    images, _ = digits_data()
    with AgentClient(agent.api, timeout=10) as client:
        return str(client.predict(images[:1].tolist())["model"]["version"])


@pytest.mark.slow
@pytest.mark.parametrize("state, event", [("verifying", "install_failed"), ("activating", "rolled_back")])
def test_killed_on_every_boot_in_one_state_the_update_is_abandoned(
        state: str, event: str, fake_server: FakeUpdateServer, bundle: Callable[..., BundleInfo],
        agent_process: Callable[..., AgentProcess], tmp_path: Path) -> None:
    bundle("1.0.0", 1)
    bundle("1.1.0", 2)
    state_dir = tmp_path / "state"
    agent = agent_process(debug={"step_delay_s": 0.15}, limits={"boot_loop_limit": LIMIT})
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    stop, killed = threading.Event(), []
    with RestartAlways(agent, delay_s=0.1) as loop:
        wait_for("1.0.0 installed", lambda: (s := agent.status())["state"] == "idle"
                 and (s["serving"] or {}).get("version") == "1.0.0", agent=agent)
        watcher = threading.Thread(target=_kill_on_every_boot, args=(agent, state_dir, state, stop, killed))
        watcher.start()
        try:
            fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-loop")
            agent.stop()  # a restart checks in at once (the poll interval is an hour); the loop restarts it
            ev = wait_for(f"{event} boot_loop", lambda: next(
                (e for e in process_events(state_dir) if e["event"] == event
                 and e["detail"].get("error") == "boot_loop"), None), timeout=90, agent=agent)
        finally:
            stop.set()
            watcher.join()
        assert len(killed) == LIMIT + 1  # killed on entering the state, then on each of LIMIT boots in it
        assert ev["target"]["version"] == "1.1.0" and ev["rollout_id"] == "r-loop"
        assert ev["detail"]["state"] == state and ev["detail"]["boots"] == LIMIT + 1
        assert ev["detail"]["limit"] == LIMIT
        wait_for("idle on the last good model", lambda: agent.status()["state"] == "idle", agent=agent)
        assert _serving(agent) == "1.0.0"
        rec = _record(state_dir)
        assert rec is not None and rec["active"]["version"] == "1.0.0" and rec["pending"] is None
        assert rec["refused"]["bundle"] == ["digits", "1.1.0"]  # not tried again until the server says so
        assert rec["last_error"]["error"] == "boot_loop"
        assert [p.name for p in (state_dir / "bundles").iterdir()] == [rec["active"]["slot"]]
        assert not any((state_dir / "staging").iterdir())
        assert loop.exits[-(LIMIT + 1):] == [-signal.SIGKILL] * (LIMIT + 1)
