"""Fixtures of the agent tests: real signed bundles, a protocol stand-in server, agents in-process."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bundles.assemble import BundleInfo
from bundles.keys import KeyStore
from device_agent.config import AgentConfig, config_from_dict
from device_agent.machine import Agent
from device_agent.states import State
from tests.agent.fakeserver import FakeUpdateServer
from tests.support.factories import make_digits_bundle

DEVICE = "kiosk-0001"
HARDWARE = "x86-kiosk"


@pytest.fixture
def fake_server(keys: KeyStore) -> Iterator[FakeUpdateServer]:
    server = FakeUpdateServer(keys)
    yield server
    server.close()


@pytest.fixture
def bundle(keys: KeyStore, tmp_path: Path, fake_server: FakeUpdateServer) -> Callable[..., BundleInfo]:
    """``bundle("1.1.0", 2, **kw)``: a real signed digits bundle, published on the fake server."""

    def make(version: str = "1.0.0", release_counter: int = 1, publish: bool = True, **kw: Any) -> BundleInfo:
        info = make_digits_bundle(keys, tmp_path / f"digits-{version}.edgepack", version=version,
                                  release_counter=release_counter, **kw)
        if publish:
            fake_server.publish(info)
        return info

    return make


def agent_config_dict(state_dir: Path, server_url: str, keys: KeyStore, **sections: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "device_id": DEVICE, "hardware_id": HARDWARE, "state_dir": str(state_dir),
        "server": {"url": server_url, "credential": "secret-credential", "poll_interval_s": 3600},
        "trust": {"image_root": str(keys.root_path), "director_root": str(keys.director_root_path)},
        "api": {"listen": "127.0.0.1:0"},
        "trial": {"period_s": 0.5, "health_interval_s": 0.2},
        "limits": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "download_deadline_s": 30},
        "telemetry": {"window_s": 3600},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return doc


@pytest.fixture
def agent_config(tmp_path: Path, fake_server: FakeUpdateServer, keys: KeyStore) -> Callable[..., AgentConfig]:
    def make(**sections: dict[str, Any]) -> AgentConfig:
        return config_from_dict(agent_config_dict(tmp_path / "state", fake_server.url, keys, **sections))

    return make


@pytest.fixture
def make_agent(agent_config: Callable[..., AgentConfig]) -> Iterator[Callable[..., Agent]]:
    """Agents in this process without a broker (telemetry stays in the outbox, where tests read it)."""
    agents: list[Agent] = []

    def make(config: AgentConfig | None = None, **kw: Any) -> Agent:
        kw.setdefault("publisher", None)
        agent = Agent(config or agent_config(), **kw)
        agents.append(agent)
        agent.boot()
        return agent

    yield make
    for agent in agents:
        agent.close()


def drive(agent: Agent, *, until: State = State.IDLE, max_steps: int = 20) -> list[State]:
    """Check in now, then step until the agent is back in ``until``; returns the states visited."""
    agent.check_in_now()
    seen = [agent.step()]
    while seen[-1] is not until and len(seen) < max_steps:
        seen.append(agent.step())
    assert seen[-1] is until, f"agent stuck: {seen}"
    return seen


def outbox_events(agent: Agent) -> list[dict[str, Any]]:
    return [json.loads(e.read()) for e in agent.telemetry.outbox.pending() if e.kind == "event"]


def event_names(agent: Agent) -> list[str]:
    return [e["event"] for e in outbox_events(agent)]


def rebuild_bundle(keys: KeyStore, source: BundleInfo, out: Path, *, version: str, release_counter: int,
                   replace_files: dict[str, bytes] | None = None, **manifest_changes: Any) -> BundleInfo:
    """A new signed bundle made from ``source``'s files, with some files or manifest fields replaced."""
    from bundles.archive import TARGETS_PREFIX, BundleArchive
    from bundles.assemble import assemble_bundle

    prefix = f"{TARGETS_PREFIX}{source.name}/{source.version}/"
    with BundleArchive(source.path) as arc:
        files = {m[len(prefix):]: arc.read_bounded(m, 1 << 30) for m in arc.names(prefix)}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.update(version=version, release_counter=release_counter, **manifest_changes)
    files.update(replace_files or {})
    return assemble_bundle(out, keystore=keys, manifest=manifest, files=files)


def toml_dumps(doc: dict[str, Any]) -> str:
    """Just enough TOML for agent configs: top-level scalars and one level of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


class AgentProcess:
    """``edgepack-agent run`` as a real process (for restarts, kill -9 and broker outages)."""

    def __init__(self, config_path: Path, api: str, log_path: Path) -> None:
        self.config_path, self.api, self.log_path = config_path, api, log_path
        self.proc: Any = None

    def start(self, wait: bool = True) -> AgentProcess:
        import subprocess
        import sys

        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--config",
                                      str(self.config_path)], stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_api()
        return self

    def wait_api(self, timeout: float = 60.0) -> None:
        import time

        from device_agent.client import AgentClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with AgentClient(self.api, timeout=2) as c:
                    c.status()
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"agent API did not come up:\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        from device_agent.client import AgentClient

        with AgentClient(self.api, timeout=10) as c:
            return c.status()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, sig: int | None = None, timeout: float = 30.0) -> int:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig or signal.SIGTERM)
        return int(self.proc.wait(timeout))


@pytest.fixture
def agent_process(tmp_path: Path, fake_server: FakeUpdateServer,
                  keys: KeyStore) -> Iterator[Callable[..., AgentProcess]]:
    from tests.support.services import free_port

    procs: list[AgentProcess] = []

    def make(**sections: dict[str, Any]) -> AgentProcess:
        api = f"127.0.0.1:{free_port()}"
        doc = agent_config_dict(tmp_path / "state", fake_server.url, keys,
                                api={"listen": api, **sections.pop("api", {})}, **sections)
        path = tmp_path / "agent.toml"
        path.write_text(toml_dumps(doc))
        proc = AgentProcess(path, api, tmp_path / "agent.log")
        procs.append(proc)
        return proc

    yield make
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


class RestartAlways:
    """systemd's ``Restart=always`` around an :class:`AgentProcess`: restarts it whenever it exits.

    ``exits`` lists the exit codes seen (a crash on boot shows up here); ``before_start`` runs before each
    (re)start (a test that kills the agent on every boot hooks in there)."""

    def __init__(self, agent: AgentProcess, *, delay_s: float = 0.2) -> None:
        import threading

        self.agent = agent
        self.delay_s = delay_s
        self.exits: list[int] = []
        self.starts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="restart-always", daemon=True)

    def __enter__(self) -> RestartAlways:
        self.agent.start(wait=False)
        self.starts = 1
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            proc = self.agent.proc
            if proc is not None and proc.poll() is not None:
                self.exits.append(proc.returncode)
                if self._stop.wait(self.delay_s):
                    return
                self.agent.start(wait=False)
                self.starts += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.proc.kill()
            self.agent.proc.wait()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(size_bytes)``: a real tmpfs of that size mounted as the agent's state directory
    (``tmp_path / "state"``), unmounted at teardown. Needs root (``mount -t tmpfs``): skipped without it,
    a failure in CI (.ci/run runs as root)."""
    import os
    import subprocess

    from tests.support.services import service_missing

    mounted: list[Path] = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            service_missing("root (to mount a small tmpfs as a full disk)")
        path = tmp_path / "state"
        path.mkdir(exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            service_missing(f"mount -t tmpfs ({r.stderr.strip()})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory: Path, *, leave: int = 0) -> Path:
    """Write ``directory/filler`` until only ``leave`` bytes stay free (0: until the disk says ENOSPC)."""
    import errno
    import shutil

    filler = directory / "filler"
    with open(filler, "ab") as fh:
        while True:
            room = shutil.disk_usage(directory).free - leave
            if room <= 0:
                break
            try:
                fh.write(b"\0" * min(room, 1 << 20))
                fh.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler


def process_events(state_dir: Path) -> list[dict[str, Any]]:
    """Telemetry events a running agent process has written to its outbox (read without touching it)."""
    events = []
    for path in sorted((state_dir / "outbox").glob("[0-9]*-event-*.json")):
        try:
            events.append(json.loads(path.read_bytes()))
        except (OSError, ValueError):
            continue  # sent and deleted meanwhile
    return events


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, agent: AgentProcess | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` (and the agent's log) otherwise."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{agent.log_tail() if agent else ''}")
