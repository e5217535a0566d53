"""Fleet simulation benchmark: 1,000 simulated devices (the real agent, in-process) against one update
server (its own process, SQLite by default) and one Mosquitto, with injected faults.

A good rollout must go 1 -> 10 -> 50 -> 100 % and complete; a bad model must be halted by the accuracy gate
in its first phase and rolled back. Figures per rollout: time per phase, devices per phase, gate values at
each decision, telemetry ingested per second, CPU of the server, broker and simulator processes. Ratios
against baselines measured in the same run:

* phase time / the phase's configured soak (1.0 would be a phase that advanced the instant it could);
* telemetry ingested / telemetry the devices published meanwhile (1.0 = ingestion keeps up).

    python bench/bench_fleet.py                          # examples/fleet/fleet-1000.toml, SQLite
    python bench/bench_fleet.py --database postgresql --write-docs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepack.fleet.scenario import load_scenario  # noqa: E402
from edgepack.fleet.simulator import run_scenario  # noqa: E402
from edgepack.fleet.summary import Summary, gate_text, render  # noqa: E402

SECTION = "## Fleet simulation"


def _soaks(scn: Any, bundle: str) -> list[float]:
    plan = next(p for p in scn.rollouts if p.bundle == bundle)
    return [float(x) for x in plan.phase_soak_s] or [plan.min_soak_s] * len(plan.phases)


def markdown(summary: Summary, scn: Any, command: str) -> str:
    h = summary.host
    lines = [SECTION, "",
             f"Command: `{command}` (scenario `examples/fleet/fleet-1000.toml`, one run).", "",
             f"Host: {h['cpus']} cores (shared with other work), {h['memory_gb']} GB, Python {h['python']}. "
             f"{summary.devices} devices, each the real `device_agent.machine.Agent` with its own state directory "
             f"(tmpfs), credential (real enrollment) and MQTT connection, spread over {scn.fleet.processes} "
             f"process(es) of {scn.fleet.step_threads} stepping threads each; the worker runs in-process "
             f"({summary.sessions['loaded']} onnxruntime sessions, one per bundle per process, shared by "
             f"{summary.sessions['device_loads']} device loads). Server: `edgepack-server serve` in its own process, "
             f"database {summary.database}; "
             f"a private Mosquitto. Enrollment of the fleet: {summary.enroll_s} s; whole run {summary.wall_s} s.", "",
             f"Faults injected: {', '.join(f'{k} {v}' for k, v in summary.faults.items())}. "
             f"Users: {summary.load['calls']} prediction calls ({summary.load['feedback']} labelled predictions).", "",
             "| rollout | final state | expected | time s | msgs/s ingested | ingested / published | server CPU % "
             "| broker CPU % | simulator CPU % | devices after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.rollouts:
        ratio = f"{r.telemetry_ingested / r.telemetry_published:.2f}" if r.telemetry_published else "-"
        lines.append(f"| {r.bundle} | {r.final_state} | {r.expected or '-'} | {r.duration_s} | {r.messages_per_s:.0f} "
                     f"| {ratio} | {r.server_cpu_pct:.0f} | {r.broker_cpu_pct:.0f} | {r.simulator_cpu_pct:.0f} | "
                     + ", ".join(f"{v}: {n}" for v, n in sorted(r.versions_after.items())) + " |")
    lines.append("")
    for r in summary.rollouts:
        soaks = _soaks(scn, r.bundle)
        lines += [f"### {r.bundle}: {r.final_state}" + (f" ({r.halt_reason})" if r.halt_reason else ""), "",
                  "| phase | % | devices | reporting | time s | soak s | time / soak | outcome | server CPU % "
                  "| gates at the decision |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p, soak in zip(r.phases, soaks, strict=False):
            over = f"{p.duration_s / soak:.2f}" if p.duration_s is not None and soak else "-"
            gates = "; ".join(gate_text(g) for g in p.gates if g["status"] not in ("off",))
            lines.append(f"| {p.index} | {p.percent:g} | {p.devices} | {p.reporting} | "
                         f"{p.duration_s if p.duration_s is not None else '-'} | {soak:g} | {over} | {p.outcome} | "
                         f"{p.server_cpu_pct if p.server_cpu_pct is not None else '-'} | {gates} |")
        lines.append("")
    lines += ["Reading the figures: a phase lasts its soak plus the time its devices need to receive the notice, "
              "download, verify, self-test, pass the trial and report a first window on the target; for the "
              "first phase the soak is long on purpose, so that its ~10 devices gather the 200 labelled "
              "predictions the accuracy gates need before the phase may advance. Server CPU is in % of one core "
              "(user + system of its process); the simulator's CPU includes the 1,000 agents, their MQTT "
              "clients and the simulated users. The latency-regression gate is off in this scenario: a simulated "
              "device's latency measures this host's GIL, not the model.", ""]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text()
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        nxt = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text.rstrip("\n") + ("\n" + doc[nxt:] if nxt >= 0 else "\n")
    path.write_text(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", type=Path, default=ROOT / "examples" / "fleet" / "fleet-1000.toml")
    ap.add_argument("--devices", type=int)
    ap.add_argument("--database")
    ap.add_argument("--json", type=Path, default=Path("fleet-bench.json"))
    ap.add_argument("--write-docs", action="store_true", help='replace "## Fleet simulation" in docs/benchmarks.md')
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scn = load_scenario(args.scenario)
    if args.devices:
        scn = dataclasses.replace(scn, fleet=dataclasses.replace(scn.fleet, devices=args.devices))
    if args.database:
        scn = dataclasses.replace(scn, server=dataclasses.replace(scn.server, database=args.database))
    summary = run_scenario(scn, json_out=args.json, progress=lambda s: print(s, flush=True))
    render(summary)
    command = "python " + " ".join(["bench/bench_fleet.py", *sys.argv[1:]])
    text = markdown(summary, scn, command)
    if args.write_docs:
        write_docs(text)
    else:
        print(text)
    print(json.dumps({"ok": summary.ok}))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
