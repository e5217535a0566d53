"""The real-device suite: what the agent does on this device's CPU, memory, thermals and storage.

Run on a Raspberry Pi or kiosk (see docs/hardware-tests.md)::

    pytest hardware_tests/test_device.py --server URL --admin-token TOKEN --trust DIR -v -s

Every test prints one ``hwtest NAME: {json}`` line with its figures (``-s`` shows them; they are also
``record_property``-ed for ``--junitxml``). ``test_runtimes_present_and_chosen`` and
``test_bundle_verification_time`` need no server. The agent tests need an update server: ``--server``, or one
started here when ``edgepack[server]`` is installed. ``test_fleet_server_sees_device`` needs ``--server``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hardware_tests.conftest import Device
from hardware_tests.harness import AgentProcess, Fleet, agent_pid, bundle_manifest, rss_mb, wait_for

#: Generous: a Pi 4 has 1-8 GB, and the agent shares it with the kiosk application. x86 here: ~100 MB.
MAX_RSS_MB = 400.0
INSTALL_TIMEOUT_S = 300.0


def report(record_property: Callable[[str, object], None], name: str, figures: dict[str, Any]) -> None:
    print(f"\nhwtest {name}: {json.dumps(figures, default=str)}")
    for key, value in figures.items():
        record_property(key, value)


def _trust_store(device: Device, directory: Path) -> Any:
    from bundles.trust import TrustStore

    return TrustStore.open(directory, initial_root=device.trust / "root.json")


# ---- no server needed --------------------------------------------------------------------------------------
def test_runtimes_present_and_chosen(device: Device, bundle: Path, tmp_path: Path,
                                     record_property: Callable[[str, object], None]) -> None:
    """Which runtimes are installed, which variant the agent picks for this profile and why, and that every
    variant an installed runtime can run passes its golden vectors here."""
    from bundles.runtime import available_runtimes, load_runner
    from bundles.selftest import run_golden
    from bundles.verify import verify_archive
    from device_agent.update import choose_variant, installed_runtimes

    installed = installed_runtimes()
    assert installed, "no inference runtime is installed: pip install 'edgepack[agent]' (and [litert] on a Pi)"
    assert set(installed) == set(available_runtimes()), "the agent and the bundle library disagree on runtimes"
    vb = verify_archive(bundle, _trust_store(device, tmp_path / "trust"), tmp_path / "bundle",
                        hardware_id=device.hardware_id)
    chosen, why = choose_variant(vb.manifest, device.hardware_id, installed)
    golden: dict[str, Any] = {}
    for variant in vb.manifest.variants:
        if variant.runtime not in installed:
            golden[variant.id] = f"skipped: {variant.runtime} not installed"
            continue
        t0 = time.perf_counter()
        runner = load_runner(vb.path(variant.file), variant.runtime)
        t1 = time.perf_counter()
        try:
            run_golden(vb, variant.id, runner)
            t2 = time.perf_counter()
            golden[variant.id] = f"passed (session {1e3 * (t1 - t0):.1f} ms, golden {1e3 * (t2 - t1):.1f} ms)"
        except Exception as exc:  # reported per variant; judged below for the chosen one
            golden[variant.id] = f"FAILED: {type(exc).__name__}: {exc}"
    report(record_property, "runtimes", {"hardware_id": device.hardware_id, "installed": installed,
                                          "chosen": chosen.id, "why": why, "golden": golden})
    assert golden[chosen.id].startswith("passed"), f"the variant this device would serve fails here: {golden}"


def test_bundle_verification_time(device: Device, bundle: Path, tmp_path: Path,
                                  record_property: Callable[[str, object], None]) -> None:
    """Signature chain + every file's hash, as on sideloading (``bundles.verify.verify_archive``), 5 times."""
    from bundles.verify import verify_archive

    seconds, digests = [], set()
    for i in range(5):
        trust = _trust_store(device, tmp_path / f"trust{i}")
        t0 = time.perf_counter()
        vb = verify_archive(bundle, trust, tmp_path / f"bundle{i}", hardware_id=device.hardware_id)
        seconds.append(time.perf_counter() - t0)
        digests.add(vb.content_digest)
        shutil.rmtree(tmp_path / f"bundle{i}")
    size_mb = bundle.stat().st_size / 1e6
    median = statistics.median(seconds)
    report(record_property, "verification", {"bundle_mb": round(size_mb, 2), "median_s": round(median, 4),
                                              "min_s": round(min(seconds), 4), "mb_per_s": round(size_mb / median, 1)})
    assert len(digests) == 1, f"the same archive verified to different contents: {digests}"


# ---- the agent, against an update server -------------------------------------------------------------------
def deploy(fleet: Fleet, device: Device, bundle: Path, home: Path, role: str,
           **sections: dict[str, Any]) -> AgentProcess:
    """Push ``bundle``, enroll a fresh agent, start it and roll the bundle out to it; returns it serving."""
    m = bundle_manifest(bundle)
    fleet.push(bundle)
    agent = AgentProcess(home, device.new_device_id(role), device.hardware_id, fleet.url, device.trust,
                         sections=dict(sections))
    agent.enroll(fleet.enrollment_token())
    agent.start()
    rollout = fleet.roll_out(m["name"], m["version"], agent.device_id)
    agent.wait_serving(m["version"], INSTALL_TIMEOUT_S)
    fleet.wait_rollout(rollout)
    return agent


def golden_inputs(agent: AgentProcess) -> np.ndarray:
    """Raw inputs that fit the bundle being served: its own golden vectors (no dataset needed on a device)."""
    from bundles.golden import Golden

    serving = agent.record().serving()
    directory = agent.state_dir / "bundles" / serving.slot
    manifest = json.loads((directory / "manifest.json").read_bytes())
    return np.asarray(Golden.from_bytes((directory / manifest["golden"]["file"]).read_bytes()).raw_inputs())


def check_serves_verified(agent: AgentProcess, versions: set[str]) -> str:
    """The state file parses; the bundle it names is on disk byte for byte as signed; the API answers with it."""
    record = agent.record()
    serving = record.serving()
    assert serving is not None, f"nothing to serve after the restart: {record.to_dict()}\n{agent.log_tail()}"
    for rel, info in serving.files.items():
        data = (agent.state_dir / "bundles" / serving.slot / rel).read_bytes()
        found = (len(data), hashlib.sha256(data).hexdigest())
        assert found == (info.length, info.sha256), f"{rel} differs from its signed hash"
    wait_for(lambda: (s := agent.status()) and s["serving"], 120, "the restarted agent to serve", agent.log_tail)
    with agent.client() as client:
        answer = client.predict(golden_inputs(agent)[:2].tolist())
    version = str(answer["model"]["version"])
    assert version == serving.version and version in versions, (version, serving.version, versions)
    return version


@pytest.fixture(scope="module")
def deployed(fleet: Fleet, device: Device, bundle: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = deploy(fleet, device, bundle, tmp_path_factory.mktemp("agent"), "a")
    try:
        yield agent
    finally:
        agent.stop()


def test_activation_times(deployed: AgentProcess, device: Device, bundle: Path,
                          record_property: Callable[[str, object], None]) -> None:
    """The agent's own timings of its first install: download, verify, self-test, activation."""
    (activated,) = deployed.events("activated")
    (verified,) = deployed.events("verified")
    timings = activated["timings"]
    report(record_property, "activation", {"variant": activated["variant"], "why": verified["why"], **timings})
    for key in ("download_s", "verify_s", "session_ms", "golden_ms", "selftest_s", "activation_s"):
        assert key in timings, f"the activated event lacks {key}: {activated}"
    assert timings["activation_s"] >= timings["verify_s"], timings
    assert deployed.record().active.variant == activated["variant"] == verified["variant"]


def test_memory(deployed: AgentProcess, record_property: Callable[[str, object], None]) -> None:
    """Resident memory of the agent and of its inference worker after 200 predictions."""
    inputs = golden_inputs(deployed)
    with deployed.client() as client:
        for i in range(200):
            client.predict(inputs[i % len(inputs):i % len(inputs) + 1].tolist())
    status = deployed.status()
    assert status and status["worker"]["alive"], status
    agent, worker = rss_mb(agent_pid(deployed)), rss_mb(int(status["worker"]["pid"]))
    total = agent["rss_mb"] + worker["rss_mb"]
    report(record_property, "memory", {"agent": agent, "worker": worker, "total_rss_mb": round(total, 1),
                                        "variant": status["serving"]["variant"]})
    assert total < MAX_RSS_MB, f"agent + worker hold {total:.0f} MB, more than the {MAX_RSS_MB:.0f} MB budget"


def read_thermal() -> dict[str, Any]:
    """Every thermal zone's temperature (deg C) and, on a Pi, the firmware's throttling flags."""
    found: dict[str, Any] = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip()
            found[f"{zone.name}:{kind}"] = int((zone / "temp").read_text()) / 1000
        except (OSError, ValueError):
            continue
    if shutil.which("vcgencmd"):
        out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=10).stdout
        if "=" in out:
            found["throttled"] = int(out.strip().split("=", 1)[1], 16)
    return found


#: vcgencmd get_throttled bits (Raspberry Pi firmware documentation).
THROTTLE_BITS = {0: "under-voltage now", 1: "ARM frequency capped now", 2: "throttled now",
                 3: "soft temperature limit now", 16: "under-voltage has occurred",
                 17: "ARM frequency capping has occurred", 18: "throttling has occurred",
                 19: "soft temperature limit has occurred"}


def test_thermal_under_load(deployed: AgentProcess, record_property: Callable[[str, object], None]) -> None:
    """Temperatures before and after 20 s of back-to-back predictions; throttling is warned about, never failed."""
    before = read_thermal()
    if not before:
        pytest.skip("no /sys/class/thermal zones and no vcgencmd here: nothing to read")
    inputs = golden_inputs(deployed)
    n, end = 0, time.monotonic() + 20
    with deployed.client() as client:
        while time.monotonic() < end:
            client.predict(inputs.tolist())
            n += 1
    after = read_thermal()
    flags = [text for bit, text in THROTTLE_BITS.items() if after.get("throttled", 0) >> bit & 1]
    report(record_property, "thermal", {"before": before, "after": after, "requests": n, "throttling": flags})
    hot = {k: v for k, v in after.items() if k != "throttled" and v >= 80}
    if flags or hot:
        warnings.warn(f"thermal trouble on this device: {flags or ''} {hot or ''} - check cooling and the power "
                      "supply; measured latencies are not representative while throttled", stacklevel=1)


def _staged_bytes(agent: AgentProcess) -> int:
    return sum(p.stat().st_size for p in (agent.state_dir / "staging").rglob("*") if p.is_file())


def _kill_when(agent: AgentProcess, states: set[str], timeout: float, *, mid_download: bool = False) -> str:
    """Poll the state file; SIGKILL the agent (and its worker) the moment it is in one of ``states`` (and, with
    ``mid_download``, has some but not all of the bundle's bytes on disk)."""

    def hit() -> str | None:
        try:
            state = json.loads((agent.state_dir / "state.json").read_bytes())["state"]
        except (OSError, ValueError, KeyError):
            return None
        if state not in states or (mid_download and not _staged_bytes(agent)):
            return None
        return str(state)

    state = str(wait_for(hit, timeout, f"the agent to reach {sorted(states)}", agent.log_tail, interval=0.01))
    staged = _staged_bytes(agent)
    agent.kill9()
    return f"{state} ({staged} bytes staged)"


def test_power_loss_during_update(fleet: Fleet, device: Device, bundle: Path, update_bundle: Path, tmp_path: Path,
                                  record_property: Callable[[str, object], None]) -> None:
    """kill -9 mid-download and mid-verification of an update; after each restart the state file is valid and
    the agent serves a verified bundle; in the end the update completes."""
    old, new = (bundle_manifest(b)["version"] for b in (bundle, update_bundle))
    agent = deploy(fleet, device, bundle, tmp_path / "agent", "pl")
    try:
        agent.stop()
        # Slow steps and small chunks, so each state lasts long enough to be hit deliberately.
        agent.sections["debug"] = {"step_delay_s": 0.5, "download_chunk_bytes": 32768}
        agent.write_config()
        agent.start()
        wait_for(agent.status, 120, "the agent's API", agent.log_tail)
        fleet.push(update_bundle)
        rollout = fleet.roll_out(bundle_manifest(update_bundle)["name"], new, agent.device_id)
        kills = []
        for states, mid_download in (({"downloading"}, True), ({"verifying", "selftest"}, False)):
            kills.append(_kill_when(agent, states, INSTALL_TIMEOUT_S, mid_download=mid_download))
            t0 = time.perf_counter()
            agent.start()
            served = check_serves_verified(agent, {old, new})
            kills[-1] += f" -> restarted, serving verified {served} after {time.perf_counter() - t0:.1f} s"
        status = agent.wait_serving(new, INSTALL_TIMEOUT_S)
        fleet.wait_rollout(rollout)
        assert check_serves_verified(agent, {new}) == new
        record = agent.record()
        assert record.previous is None and record.pending is None and record.last_error is None, record.to_dict()
        assert not list((agent.state_dir / "staging").glob("*/*")), "leftovers of the interrupted download"
        report(record_property, "power_loss", {"kills": kills, "final": status["serving"]})
    finally:
        agent.stop()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.signal(signal.SIGKILL)


# ---- the fleet's own server ---------------------------------------------------------------------------------
def test_fleet_server_sees_device(request: pytest.FixtureRequest, deployed: AgentProcess, fleet: Fleet,
                                  record_property: Callable[[str, object], None]) -> None:
    """The fleet's server has this device's platform, runtimes and active bundle; telemetry reaches its broker."""
    if not request.config.getoption("--server"):
        pytest.skip("needs the fleet's update server and broker: pass --server URL --admin-token TOKEN")
    view = wait_for(lambda: (v := fleet.device(deployed.device_id))["active"] and v, 60,
                    "the server's inventory to show the active bundle", deployed.log_tail)
    status = deployed.status()
    assert status is not None
    assert view["active"] == status["serving"] and view["state"] == status["state"]
    assert set(view["runtimes"]) == set(status["runtimes"])
    enrollment = json.loads((deployed.state_dir / "enrollment.json").read_bytes())
    mqtt = (enrollment.get("mqtt") or {}).get("url")
    if mqtt:
        wait_for(lambda: (s := deployed.status()) and s["outbox"] == 0, 120, f"telemetry delivered to {mqtt}",
                 deployed.log_tail)
    report(record_property, "fleet", {"platform": view["platform"], "runtimes": view["runtimes"],
                                       "active": view["active"], "mqtt": mqtt or "none (the server gave no broker)"})
