"""Power loss: ``kill -9`` of the agent at randomized points across update cycles, in every state.

After every restart the state file must be valid and the agent must serve a verified model, the old or
the new one, never a partial one. The persisted state is read straight from ``state.json`` (atomic
writes: any reader sees a whole file). A small per-step pause (``debug.step_delay_s``) makes every state,
even the short ones, last long enough to be hit by a kill.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.client import AgentClient
from device_agent.states import State
from device_agent.store import StateRecord
from tests.agent.conftest import DEVICE, HARDWARE, AgentProcess
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data

KILLS = 56
STEP_DELAY = 0.12


def _record(state_dir: Path) -> StateRecord | None:
    try:
        return StateRecord.from_dict(json.loads((state_dir / "state.json").read_bytes()))
    except FileNotFoundError:
        return None


def _check_serving(agent: AgentProcess, state_dir: Path, versions: set[str]) -> str | None:
    """The agent serves exactly the bundle its record says, and that bundle's files are the signed ones."""
    record = _record(state_dir)
    assert record is not None
    expected = record.serving()
    if expected is None:
        return None
    for rel, info in expected.files.items():
        data = (state_dir / "bundles" / expected.slot / rel).read_bytes()
        assert len(data) == info.length and hashlib.sha256(data).hexdigest() == info.sha256, rel
    images, _ = digits_data()
    with AgentClient(agent.api) as client:
        answer = client.predict(images[:2].tolist())
    version = answer["model"]["version"]
    assert version in versions
    assert version in (expected.version, record.active.version if record.active else None)
    return str(version)


@pytest.mark.slow
def test_kill_9_at_random_points_in_every_state(fake_server: FakeUpdateServer, bundle: Callable,
                                                agent_process: Callable, tmp_path: Path) -> None:
    rng = random.Random(20261128)
    versions = ["1.0.0", "1.1.0"]
    for i, v in enumerate(versions):
        bundle(v, i + 1)
    state_dir = tmp_path / "state"
    agent = agent_process(debug={"step_delay_s": STEP_DELAY, "download_chunk_bytes": 2048},
                          trial={"period_s": 0.8, "health_interval_s": 0.2, "max_restarts": 3},
                          limits={"backoff_initial_s": 0.05, "backoff_max_s": 0.3})
    assigned = "1.0.0"
    fake_server.assign(DEVICE, HARDWARE, "digits", assigned)
    agent.start()
    targets = list(State)
    hits: Counter[str] = Counter()
    served: Counter[str | None] = Counter()
    kills = 0
    crashed: set[int] = set()
    deadline = time.monotonic() + 420
    while kills < KILLS:
        assert time.monotonic() < deadline, f"only {kills} kills; hits {dict(hits)}"
        target = targets[kills % len(targets)]
        waited = time.monotonic()
        while True:
            record = _record(state_dir)
            if record is not None and record.state is target:
                break
            if target is State.ROLLING_BACK and record is not None and record.state is State.TRIAL:
                pid = agent.status()["worker"]["pid"]  # a crash in the trial is what rolls back
                if pid and pid not in crashed:
                    crashed.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            refused = (record.refused or {}).get("bundle") if record is not None else None
            if record is not None and record.state is State.IDLE and record.pending is None and (
                    (record.active is not None and record.active.version == assigned)
                    or refused == ["digits", assigned]):
                assigned = versions[1 - versions.index(assigned)]  # settled: start another update cycle
                fake_server.assign(DEVICE, HARDWARE, "digits", assigned)
                agent.stop()  # a restart checks in at once (the poll interval is an hour)
                agent.start()
            if time.monotonic() - waited > 30:
                pytest.fail(f"state {target.value} not reached; at {record and record.state.value}\n{agent.log_tail()}")
            time.sleep(0.003)
        time.sleep(rng.uniform(0, 2 * STEP_DELAY))
        agent.stop(signal.SIGKILL)
        kills += 1
        at_kill = _record(state_dir)
        assert at_kill is not None  # the state file is always whole
        hits[at_kill.state.value] += 1
        agent.start()
        served[_check_serving(agent, state_dir, set(versions))] += 1

    assert set(hits) == {s.value for s in State}, hits
    assert sum(served[v] for v in versions) >= KILLS - 5  # after the first install, always a model
    # finally, left alone, the agent completes its cycle and keeps no leftovers
    settle = time.monotonic() + 60
    while time.monotonic() < settle:
        record = _record(state_dir)
        if record and record.state is State.IDLE and record.pending is None and record.previous is None:
            break
        time.sleep(0.1)
    record = _record(state_dir)
    assert record is not None and record.state is State.IDLE and record.active is not None
    assert [p.name for p in (state_dir / "bundles").iterdir()] == [record.active.slot]
    assert _check_serving(agent, state_dir, set(versions)) == record.active.version
    assert agent.stop() == 0
