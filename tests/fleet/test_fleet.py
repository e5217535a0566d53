"""The fleet simulator against the real server and a real Mosquitto.

150 simulated devices (the real agent, in-process) with dropped connections, slow links and offline
periods: a good rollout goes through every phase and completes; a bad model (trained on shuffled labels)
is halted by the accuracy gate in its first phase and rolled back; a build whose worker keeps crashing is
halted by the crash gate. The 1,000-device run is bench/bench_fleet.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgepack.fleet.scenario import ScenarioError, load_scenario, scenario_from_dict
from tests.support.services import service_missing

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"
GATES = {"max_p95_latency_regression": "off", "min_accuracy": 0.8, "max_accuracy_drop": 0.08, "min_feedback": 200}


def _scenario(tmp_path: Path) -> dict[str, Any]:
    staged = {"phases": [10, 40, 100], "phase_soak_s": [15, 3, 3], "min_reporting": 0.8, "timeout_s": 150,
              # an upper bound: the wait ends as soon as every device is where the rollout's end sends it. A rolled
              # back device that had committed the bad build downloads and trials the old one again, which on
              # two shared, loaded cores took longer than 20 s (one device was still on 1.3.0)
              "settle_s": 120, "canary_devices": 3}
    return {
        "name": "ci-150", "seed": 3,
        "fleet": {"devices": 150, "hardware_ids": ["x86-kiosk", "rpi4"], "step_threads": 12, "poll_interval_s": 10,
                  "window_s": 2.0, "trial_s": 1.5, "requests_per_s": 0.25, "batch": 8,
                  "state_dir": str(tmp_path / "devices")},
        "server": {"database": "sqlite", "broker": "private", "gate_interval_s": 0.5},
        "faults": {"http_drop": 0.02, "mqtt_drops_per_device_hour": 20, "slow_fraction": 0.1, "slow_latency_ms": 100,
                   "slow_kbps": 512, "offline_fraction": 0.05, "offline_s": 8, "offline_start_s": [2, 20]},
        "bundles": {"1.0.0": {"release_counter": 1}, "1.1.0": {"release_counter": 2},
                    "1.2.0": {"release_counter": 3, "quality": "bad"},
                    "1.3.0": {"release_counter": 4, "crash_per_device_minute": 20.0}},
        "rollout": [
            {"bundle": "1.0.0", "phases": [100], "min_soak_s": 0, "min_reporting": 0.85,
             "gates": {"max_p95_latency_regression": "off"}, "allow_unproven": ["accuracy_drop"], "timeout_s": 120,
             "expect": "completed"},
            {"bundle": "1.1.0", **staged, "gates": GATES, "expect": "completed"},
            {"bundle": "1.2.0", **staged, "gates": GATES, "expect": "rolled_back", "expect_gate": "accuracy",
             "expect_halt_phase": 0},
            {"bundle": "1.3.0", **staged, "gates": {**GATES, "max_install_failure_rate": 0.9},
             "expect": "rolled_back", "expect_gate": "crash_rate", "expect_halt_phase": 0},
        ],
    }


@pytest.mark.slow
@pytest.mark.mqtt
def test_a_simulated_fleet_completes_a_good_rollout_and_halts_bad_ones(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        service_missing("the mosquitto binary (apt-get install mosquitto)")  # a failure in CI, never a skip
    from edgepack.fleet.simulator import run_scenario

    scn = scenario_from_dict(_scenario(tmp_path))
    summary = run_scenario(scn, json_out=tmp_path / "summary.json")
    base, good, bad, crashy = summary.rollouts
    assert not summary.agent_errors, summary.agent_errors
    assert base.final_state == "completed", base
    assert base.versions_after.get("1.0.0", 0) >= 140, base.versions_after

    assert good.final_state == "completed", good.expectation_detail
    assert [p.outcome for p in good.phases] == ["advanced", "advanced", "completed"]
    assert all(p.duration_s is not None and p.duration_s >= 3 for p in good.phases)
    final_gates = {g["name"]: g for g in good.phases[-1].gates}
    assert final_gates["accuracy"]["status"] == "ok" and final_gates["accuracy"]["value"] > 0.85
    assert good.versions_after.get("1.1.0", 0) >= 135, good.versions_after  # a few may still be offline

    assert bad.final_state == "rolled_back" and bad.halt_phase == 0, bad.expectation_detail
    assert "accuracy" in bad.breached
    assert [p.outcome for p in bad.phases] == ["halted", "not reached", "not reached"]
    halted = {g["name"]: g for g in bad.phases[0].gates}
    assert halted["accuracy"]["value"] < 0.5 and halted["accuracy"]["threshold"] == 0.8
    assert bad.versions_after.get("1.2.0", 0) == 0, bad.versions_after  # every device went back

    assert crashy.final_state == "rolled_back" and crashy.halt_phase == 0 and "crash_rate" in crashy.breached
    assert crashy.versions_after.get("1.3.0", 0) == 0, crashy.versions_after

    assert summary.ok
    assert all(r.telemetry_ingested > 0 and r.messages_per_s > 0 and r.server_cpu_pct > 0 for r in summary.rollouts)
    # one onnxruntime session per bundle for the whole fleet, each device still loading (checking) its own files
    assert summary.sessions["loaded"] <= 4 < 150 <= summary.sessions["device_loads"]
    faults = summary.faults
    assert faults["http_dropped"] > 0 and faults["offline_periods"] > 0 and faults["mqtt_dropped"] > 0
    assert faults["crashes_injected"] > 0
    assert summary.load["feedback"] > 1000
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["ok"] is True and [r["final_state"] for r in written["rollouts"]] == [
        "completed", "completed", "rolled_back", "rolled_back"]


def test_example_scenarios_are_valid() -> None:
    for path in sorted(EXAMPLES.glob("*.toml")):
        scn = load_scenario(path)
        assert scn.rollouts and scn.fleet.devices >= 1, path


@pytest.mark.parametrize(("change", "message"), [
    ({"fleet": {"devices": 10, "devcies": 3}}, "unknown key(s) ['devcies']"),
    ({"fleet": {"devices": "many"}}, "[fleet] devices must be a number"),
    ({"faults": {"http_drop": 1.5}}, "http_drop is a fraction"),
    ({"rollout": [{"bundle": "9.9.9"}]}, "bundle '9.9.9' is not in [bundles]"),
    ({"rollout": [{"bundle": "1.0.0", "phases": [50, 10, 100]}]}, "phases must grow strictly"),
    ({"rollout": [{"bundle": "1.0.0", "gates": {"min_acuracy": 0.9}}]}, "unknown gate(s) ['min_acuracy']"),
    ({"rollout": [{"bundle": "1.0.0", "phases": [50, 100], "phase_soak_s": [1]}]}, "one number >= 0 per phase"),
    ({"rollout": [{"bundle": "1.0.0", "expect": "done"}]}, "expect must be one of"),
    ({"rollout": []}, "has no [[rollout]]"),
    ({"server": {"settings": {"ingest_flsh_s": 1}}}, "[server] settings has unknown key(s) ['ingest_flsh_s']"),
    ({"seed": "x"}, "seed must be a whole number"),
    ({"rollout": [{"bundle": "1.0.0", "allow_unproven": ["acuracy"]}]}, "allow_unproven names unknown gate(s)"),
    ({"bundles": {"1.0.0": {"release_counter": 1, "crash_per_inference": 2}}}, "crash_per_inference is a fraction"),
    ({"fleet": {"labelled_devices": 1.5}}, "labelled_devices is a fraction"),
])
def test_bad_scenarios_are_refused_with_the_key_named(change: dict[str, Any], message: str) -> None:
    doc = {"bundles": {"1.0.0": {"release_counter": 1}}, "rollout": [{"bundle": "1.0.0"}], **change}
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(doc)
    assert message in str(err.value)


def test_summary_shows_each_gate_with_its_interval() -> None:
    from edgepack.fleet.summary import gate_text

    g = {"name": "accuracy_drop", "status": "breached", "value": 0.0556, "lower": 0.0203, "upper": 0.0909,
         "threshold": 0.02, "comparison": "<="}
    assert gate_text(g) == "accuracy_drop 0.0556 [0.0203, 0.0909] (<= 0.02) BREACHED"
    assert gate_text({**g, "status": "no_data", "value": None, "lower": None}) == "accuracy_drop - (<= 0.02) no data"
