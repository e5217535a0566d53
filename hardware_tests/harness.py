"""What the hardware suites drive: an update server, the agent as a process (here or in the emulated root), bundles.

Everything is the real thing: ``edgepack-server serve`` as a process (or the fleet's server behind ``--server``),
``edgepack-agent enroll`` and ``edgepack-agent run`` as processes, talking the protocol over HTTP, and signed
bundles verified by the agent against the trust roots it was given. The admin side uses only the stdlib
(``urllib.request``), because a device installs ``edgepack[agent]``, which has no httpx.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DIGITS_DIR = REPO / "examples" / "digits"
DIGITS_BUNDLE = DIGITS_DIR / "out" / "digits-cnn-1.0.0.edgepack"
DIGITS_KEYS = DIGITS_DIR / "keys"


class HarnessError(AssertionError):
    """A step of a hardware test did not happen; the message says which and shows the evidence."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, evidence: Callable[[], str] = str,
             interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}\n{evidence()}")
        time.sleep(interval)


def build_digits_bundle(out_dir: Path) -> Path:
    """``edgepack build`` of examples/digits into ``out_dir`` (for when examples/digits/out has no bundle)."""
    spec = (DIGITS_DIR / "edgepack.toml").read_text()
    work = out_dir / "digits-spec"
    shutil.copytree(DIGITS_DIR, work, ignore=shutil.ignore_patterns("out"))
    (work / "edgepack.toml").write_text(spec)
    run = subprocess.run([sys.executable, "-m", "edgepack.cli", "build", "-c", str(work / "edgepack.toml")],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise HarnessError(f"edgepack build of examples/digits failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return next((work / "out").glob("*.edgepack"))


def resign_bundle(source: Path, keys_dir: Path, out: Path, *, version: str, release_counter: int,
                  **manifest_changes: Any) -> Path:
    """A new signed bundle with ``source``'s files and some manifest fields changed, signed with ``keys_dir``.

    ``keys_dir`` must be a private copy: signing updates its cumulative ``repo/targets.json``."""
    from bundles.archive import TARGETS_PREFIX, BundleArchive
    from bundles.assemble import assemble_bundle
    from bundles.keys import KeyStore
    from bundles.manifest import Manifest

    with BundleArchive(source) as arc:
        (manifest_member,) = [n for n in arc.names(TARGETS_PREFIX) if n.endswith("/manifest.json")]
        prefix = manifest_member[: -len("manifest.json")]
        files = {m[len(prefix):]: arc.read_bounded(m, 1 << 30) for m in arc.names(prefix)}
    manifest = json.loads(files.pop("manifest.json"))
    Manifest.from_dict(manifest)  # the source's manifest is valid before we touch it
    manifest.update(version=version, release_counter=release_counter, **manifest_changes)
    return assemble_bundle(out, keystore=KeyStore.load(keys_dir), manifest=manifest, files=files).path


def bundle_manifest(path: Path) -> dict[str, Any]:
    from bundles.archive import TARGETS_PREFIX, BundleArchive

    with BundleArchive(path) as arc:
        (member,) = [n for n in arc.names(TARGETS_PREFIX) if n.endswith("/manifest.json")]
        doc: dict[str, Any] = json.loads(arc.read_bounded(member, 1 << 24))
        return doc


# ---- the update server ---------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """An update server seen through its admin API (the fleet's own, or a :class:`LocalServer`)."""

    url: str
    admin_token: str

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             ok: Sequence[int] = (200, 201, 204)) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.admin_token}",
            "Content-Type": "application/octet-stream" if raw is not None else "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        except urllib.error.URLError as exc:
            raise HarnessError(f"cannot reach the update server at {self.url}: {exc.reason}") from exc
        doc = json.loads(payload) if payload else None
        if status not in ok:
            raise HarnessError(f"{method} {path} -> HTTP {status}: {payload[:500]!r}")
        return status, doc

    def push(self, bundle: Path) -> bool:
        """Upload a signed bundle; False when the server already holds this name and version (200: the same
        signed files, 409: other content)."""
        status, _ = self.call("POST", "/api/v1/bundles", raw=bundle.read_bytes(), ok=(200, 201, 409))
        return status == 201

    def enrollment_token(self) -> str:
        _, doc = self.call("POST", "/api/v1/admin/enrollment-tokens", {"uses": 1, "tags": {"purpose": "hwtest"}})
        return str(doc["token"])

    def roll_out(self, name: str, version: str, device_id: str) -> str:
        """Assign ``name version`` to this one device at once: one phase of 100 %, no soak, and no device
        needs to report telemetry on it (``min_devices`` 0), so the rollout also completes without a broker."""
        _, doc = self.call("POST", "/api/v1/rollouts", {
            "bundle": {"name": name, "version": version}, "selector": {"device_ids": [device_id]},
            "phases": [100], "min_soak_s": 0, "min_devices": 0, "start": True,
            "reason": f"hardware test {device_id}"})
        return str(doc["id"])

    def wait_rollout(self, rollout_id: str, timeout: float = 120) -> dict[str, Any]:
        """Until the rollout is completed (the next one for the same bundle name may start then)."""

        def done() -> dict[str, Any] | None:
            _, doc = self.call("GET", f"/api/v1/rollouts/{rollout_id}")
            if doc["state"] in ("aborted", "rolled_back", "halted"):
                raise HarnessError(f"rollout {rollout_id} ended {doc['state']}: {doc}")
            return dict(doc) if doc["state"] == "completed" else None

        return dict(wait_for(done, timeout, f"rollout {rollout_id} to complete"))

    def device(self, device_id: str) -> dict[str, Any]:
        _, doc = self.call("GET", f"/api/v1/devices/{device_id}")
        return dict(doc)


class LocalServer(Fleet):
    """``edgepack-server serve`` as a process on this machine: SQLite, no broker, 1 s poll interval."""

    def __init__(self, keys_dir: Path, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.env = {**os.environ, "EDGEPACK_DATA_DIR": str(data_dir), "EDGEPACK_KEYS_DIR": str(keys_dir / "online"),
                    "EDGEPACK_HOST": "127.0.0.1", "EDGEPACK_PORT": str(port), "EDGEPACK_POLL_INTERVAL_S": "1",
                    "EDGEPACK_GATE_INTERVAL_S": "0.5", "EDGEPACK_DEFAULT_MIN_SOAK_S": "0",
                    "EDGEPACK_DEFAULT_MIN_DEVICES": "1", "EDGEPACK_MQTT_URL": ""}
        made = subprocess.run([sys.executable, "-m", "update_server.cli", "create-token", "--name", "hwtest"],
                              env=self.env, capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            raise HarnessError(f"edgepack-server create-token failed:\n{made.stderr[-2000:]}")
        super().__init__(f"http://127.0.0.1:{port}", made.stdout.strip().splitlines()[-1])
        self.log_path = data_dir / "server.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "update_server.cli", "serve", "--log-level",
                                          "warning"], env=self.env, stdout=log, stderr=log)
        wait_for(self._up, 60, "the update server to answer", lambda: self.log_path.read_text()[-2000:])

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise HarnessError(f"the update server exited with {self.proc.returncode}:\n"
                               f"{self.log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/tuf/image/timestamp.json", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # answering, just nothing published yet
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the agent -------------------------------------------------------------------------------------------------
def toml_dumps(doc: dict[str, Any]) -> str:
    """Enough TOML for an agent config: top-level scalars and one level of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, (int, float)) else json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += [f"\n[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


@dataclass
class AgentProcess:
    """One device: ``edgepack-agent`` run by ``launcher`` (this Python, or the aarch64 root through qemu).

    ``home`` is this machine's view of the agent's directory, ``guest_home`` the agent's own view of it
    (the same path on the host; ``/data`` inside the emulated root). The config, the trust roots, the state
    directory and the log all live there, so the test reads the agent's files directly.
    """

    home: Path
    device_id: str
    hardware_id: str
    server_url: str
    trust_dir: Path
    launcher: list[str] = field(default_factory=lambda: [sys.executable])
    guest_home: str = ""
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.guest_home = self.guest_home or str(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        trust = self.home / "trust"
        trust.mkdir(exist_ok=True)
        for name in ("root.json", "director-root.json"):
            if not (self.trust_dir / name).is_file():
                raise HarnessError(f"{self.trust_dir} has no {name}: pass --trust with the trust/ folder of the "
                                   "key directory the server's bundles are signed with (root.json, director-root.json)")
            shutil.copyfile(self.trust_dir / name, trust / name)
        self.api = f"127.0.0.1:{free_port()}"
        self.state_dir = self.home / "state"
        self.log_path = self.home / "agent.log"
        self.write_config()

    def write_config(self) -> None:
        """(Re)write agent.toml from the defaults below and ``sections``; takes effect at the next start."""
        g = self.guest_home
        doc: dict[str, Any] = {
            "device_id": self.device_id, "hardware_id": self.hardware_id, "state_dir": f"{g}/state",
            "server": {"url": self.server_url, "poll_interval_s": 2.0},
            "trust": {"image_root": f"{g}/trust/root.json", "director_root": f"{g}/trust/director-root.json"},
            "api": {"listen": self.api},
            "trial": {"period_s": 2.0, "health_interval_s": 0.5},
            "limits": {"backoff_initial_s": 0.5, "backoff_max_s": 5.0},
        }
        if self.server_url.startswith("http://"):  # a lab server: the agent refuses plain HTTP off loopback
            doc["server"]["allow_plain"] = True       # unless told (docs/agent.md)
        for name, values in self.sections.items():
            doc[name] = {**doc.get(name, {}), **values}
        (self.home / "agent.toml").write_text(toml_dumps(doc))

    def _argv(self, *args: str) -> list[str]:
        return [*self.launcher, "-m", "device_agent.cli", *args, "--config", f"{self.guest_home}/agent.toml"]

    def enroll(self, token: str, timeout: float = 600) -> None:
        run = subprocess.run([*self._argv("enroll", "--token", token), "--tag", "purpose=hwtest"],
                             capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise HarnessError(f"edgepack-agent enroll failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")

    def start(self) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            # Its own session: a qemu launcher is a chain of shells, and a kill must reach the agent itself.
            self.proc = subprocess.Popen(self._argv("run"), stdout=log, stderr=log, start_new_session=True)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        """Power loss: SIGKILL to the agent and everything it started, with no chance to clean up."""
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        try:  # the agent alone, as systemd would (KillMode=mixed): it stops its workers itself
            os.kill(agent_pid(self), signal.SIGTERM)
        except (HarnessError, ProcessLookupError):
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(30)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "agent log (tail):\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no agent log)"

    def client(self, timeout: float = 120) -> Any:
        from device_agent.client import AgentClient

        return AgentClient(self.api, timeout=timeout)

    def status(self) -> dict[str, Any] | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"the agent exited with {self.proc.returncode}\n{self.log_tail()}")
        try:
            with self.client(timeout=30) as c:
                return dict(c.status())
        except OSError:
            return None

    def wait_serving(self, version: str, timeout: float, *, settled: bool = True) -> dict[str, Any]:
        """Until the agent serves ``version`` (and, with ``settled``, is back in idle: trial committed)."""

        def ready() -> dict[str, Any] | None:
            s = self.status()
            if s and s["serving"] and s["serving"]["version"] == version and (not settled or s["state"] == "idle"):
                return s
            return None

        return dict(wait_for(ready, timeout, f"{self.device_id} serving {version}", self.log_tail))

    def record(self) -> Any:
        """The persisted state record, parsed and validated the way the agent parses it at boot."""
        from device_agent.store import StateRecord

        return StateRecord.from_dict(json.loads((self.state_dir / "state.json").read_bytes()))

    def events(self, name: str) -> list[dict[str, Any]]:
        """The ``detail`` of every telemetry event ``name`` the agent logged, oldest first.

        Read from the log rather than the outbox: with a broker the outbox empties as messages are delivered."""
        pattern = re.compile(rf"INFO device_agent\.telemetry: event {re.escape(name)} target=.*? detail=(\{{.*\}})$")
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = pattern.search(line)
            if m:
                found.append(ast.literal_eval(m[1]))
        return found


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


def agent_pid(agent: AgentProcess) -> int:
    """The agent's own process: the deepest ``device_agent.cli run`` under the launcher, which under qemu is a
    chain (bash, unshare, chroot + env, sh) whose command lines all name the agent's."""
    assert agent.proc is not None
    found = None
    for pid in [agent.proc.pid, *_descendants(agent.proc.pid)]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"device_agent.cli" in cmdline and b"run" in cmdline:
            found = pid
    if found is None:
        raise HarnessError(f"no device_agent.cli run process under pid {agent.proc.pid}")
    return found


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in map(int, children):
        out += [child, *_descendants(child)]
    return out
