"""A full disk, as it happens in the field: the state directory is a real, small tmpfs that fills up.

The agent runs as a real process under a restart-always loop (systemd's ``Restart=always``). Whatever
fills the disk (a bundle too large for it, another program, a filler written in the middle of a download),
the agent never crashes, keeps serving its last good model, deletes its partial files, reports
``install_failed`` with reason ``disk_full`` (needed vs. free bytes) and shows it as ``last_error`` at
check-in, and installs on its own once space returns. A bundle that can never fit is refused before a
byte of it is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bundles.assemble import BundleInfo
from bundles.keys import KeyStore
from device_agent.client import AgentClient
from tests.agent.conftest import (
    DEVICE,
    HARDWARE,
    AgentProcess,
    RestartAlways,
    fill_disk,
    process_events,
    rebuild_bundle,
    wait_for,
)
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import digits_data

MB = 1024 * 1024
DISK = 8 * MB
PADDING = int(2.5 * MB)


def _padded(keys: KeyStore, base: BundleInfo, tmp_path: Path, version: str, rc: int, size: int) -> BundleInfo:
    """A real signed bundle made bigger by a signed padding file of ``size`` random bytes."""
    return rebuild_bundle(keys, base, tmp_path / f"digits-{version}.edgepack", version=version, release_counter=rc,
                          replace_files={"data/padding.bin": os.urandom(size)})


def _serving(agent: AgentProcess) -> str | None:
    images, _ = digits_data()
    with AgentClient(agent.api, timeout=10) as client:
        return str(client.predict(images[:1].tolist())["model"]["version"])


def _settled_on(agent: AgentProcess, version: str) -> bool:
    status = agent.status()
    return status["state"] == "idle" and (status["serving"] or {}).get("version") == version


def _disk_full_events(state_dir: Path, version: str) -> list[dict[str, Any]]:
    return [e for e in process_events(state_dir) if e["event"] == "install_failed"
            and (e.get("target") or {}).get("version") == version and e["detail"].get("error") == "disk_full"]


def _downloaded(fake_server: FakeUpdateServer, version: str) -> list[str]:
    return [p for m, p in fake_server.requests if m == "GET" and f"/digits/{version}/" in p and "padding" in p]


@pytest.mark.slow
def test_full_disk_waits_reports_and_recovers_without_a_crash(
        small_disk: Callable[[int], Path], fake_server: FakeUpdateServer, bundle: Callable[..., BundleInfo],
        agent_process: Callable[..., AgentProcess], keys: KeyStore, tmp_path: Path) -> None:
    state = small_disk(DISK)
    base = bundle("1.0.0", 1)
    big = _padded(keys, base, tmp_path, "1.1.0", 2, PADDING)
    other = _padded(keys, base, tmp_path, "1.2.0", 3, PADDING)
    huge = _padded(keys, base, tmp_path, "1.3.0", 4, DISK + MB)
    for b in (big, other, huge):
        fake_server.publish(b)
    fake_server.poll_interval_s = 0.5
    # 64 KB chunks with a short pause after each: a 2.5 MB download takes a few seconds, long enough to fill
    # the disk in the middle of it
    agent = agent_process(limits={"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "disk_reserve_bytes": 256 * 1024},
                          debug={"step_delay_s": 0.05, "download_chunk_bytes": 64 * 1024})
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    with RestartAlways(agent) as loop:
        wait_for("1.0.0 installed", lambda: _settled_on(agent, "1.0.0"), agent=agent)

        # 1. Another program leaves 1 MB free; a 2.5 MB bundle is assigned: not downloaded, reported, retried.
        filler = fill_disk(state, leave=MB)
        fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-big")
        (event,) = wait_for("install_failed disk_full", lambda: _disk_full_events(state, "1.1.0"), agent=agent)
        detail = event["detail"]
        assert event["rollout_id"] == "r-big"
        assert detail["needed_bytes"] >= PADDING and detail["free_bytes"] < detail["needed_bytes"]
        assert "retrying" in detail["message"] and detail.get("permanent") is None
        wait_for("disk_full at check-in", lambda: (fake_server.last_checkin.get("last_error") or {}).get("error")
                 == "disk_full", agent=agent)
        assert _serving(agent) == "1.0.0"
        assert not _downloaded(fake_server, "1.1.0")  # the free space was checked before downloading
        assert not any((state / "staging").rglob("*"))

        # 2. Space returns: the agent installs on its own (backoff), and reported the failure once.
        filler.unlink()
        wait_for("1.1.0 installed after space returned", lambda: _settled_on(agent, "1.1.0"), agent=agent)
        assert len(_disk_full_events(state, "1.1.0")) == 1
        assert _serving(agent) == "1.1.0"

        # 3. The disk fills up in the middle of a download (written by someone else meanwhile).
        fake_server.assign(DEVICE, HARDWARE, "digits", "1.2.0")
        wait_for("a partial download", lambda: any(p.stat().st_size > 256 * 1024
                                                   for p in (state / "staging").rglob("*.part")), agent=agent)
        filler = fill_disk(state)
        (event,) = wait_for("install_failed disk_full mid-download", lambda: _disk_full_events(state, "1.2.0"),
                            agent=agent)
        assert event["detail"]["phase"] in ("download", "persist")
        assert _serving(agent) == "1.1.0"
        wait_for("partial files deleted", lambda: not any((state / "staging").rglob("*.part")), agent=agent)
        filler.unlink()
        wait_for("1.2.0 installed after space returned", lambda: _settled_on(agent, "1.2.0"), agent=agent)

        # 4. A bundle larger than the whole disk is refused for good, before any download.
        fake_server.assign(DEVICE, HARDWARE, "digits", "1.3.0", rollout_id="r-huge")
        (event,) = wait_for("permanent disk_full", lambda: _disk_full_events(state, "1.3.0"), agent=agent)
        assert event["detail"]["permanent"] is True and event["detail"]["total_bytes"] <= DISK
        assert "will not be retried" in event["detail"]["message"]
        record = json.loads((state / "state.json").read_bytes())
        assert record["refused"]["bundle"] == ["digits", "1.3.0"] and record["state"] == "idle"
        assert not _downloaded(fake_server, "1.3.0")
        assert _serving(agent) == "1.2.0"
        assert loop.exits == [], f"the agent exited {loop.exits}\n{agent.log_tail()}"


@pytest.mark.slow
def test_a_disk_too_full_to_save_the_state_neither_crashes_nor_stops_serving(
        small_disk: Callable[[int], Path], fake_server: FakeUpdateServer, bundle: Callable[..., BundleInfo],
        agent_process: Callable[..., AgentProcess]) -> None:
    state = small_disk(2 * MB)
    bundle("1.0.0", 1)
    bundle("1.1.0", 2)
    fake_server.poll_interval_s = 0.5
    agent = agent_process(limits={"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "disk_reserve_bytes": 64 * 1024})
    fake_server.assign(DEVICE, HARDWARE, "digits", "1.0.0")
    with RestartAlways(agent) as loop:
        wait_for("1.0.0 installed", lambda: _settled_on(agent, "1.0.0"), agent=agent)
        saved = (state / "state.json").read_bytes()
        filler = fill_disk(state)  # not one byte left: no state file, no metadata, no outbox message fits
        fake_server.assign(DEVICE, HARDWARE, "digits", "1.1.0", rollout_id="r-1")
        wait_for("disk_full at check-in", lambda: (fake_server.last_checkin.get("last_error") or {}).get("error")
                 == "disk_full", agent=agent)
        assert _serving(agent) == "1.0.0"
        assert agent.status()["last_error"]["error"] == "disk_full"
        # a power cut now: the agent boots on the full disk (saving its state fails) and serves again
        agent.proc.send_signal(signal.SIGKILL)
        wait_for("restarted", lambda: loop.starts == 2 and agent.proc.poll() is None, agent=agent)
        agent.wait_api()
        assert _serving(agent) == "1.0.0"
        assert (state / "state.json").read_bytes() == saved  # never half written
        assert loop.exits == [-signal.SIGKILL]
        filler.unlink()
        wait_for("1.1.0 installed once space returned", lambda: _settled_on(agent, "1.1.0"), agent=agent)
        assert _serving(agent) == "1.1.0"
    assert loop.exits == [-signal.SIGKILL], agent.log_tail()
    assert shutil.disk_usage(state).total <= 2 * MB
