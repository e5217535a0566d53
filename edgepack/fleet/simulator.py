"""Run a scenario: start the services, enroll and boot the fleet, run each rollout, summarise.

Each rollout is created and started through the server's admin API, exactly as an operator would; from
then on nothing but the server's gate loop decides: the simulator only watches (status every half
second, CPU samples at each phase change) and, once the rollout is over, reads the audit log, whose
timestamps time the phases and whose entries hold the gate values at each decision.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack import tls
from edgepack._local import Broker
from edgepack.fleet.fleet import Fleet
from edgepack.fleet.scenario import RolloutPlan, Scenario, gate_values
from edgepack.fleet.services import (
    Database,
    ServerProcess,
    default_state_root,
    prepare_bundles,
    start_private_broker,
)
from edgepack.fleet.shards import ShardedFleet
from edgepack.fleet.summary import PhaseSummary, RolloutSummary, Summary

log = logging.getLogger(__name__)
FINAL = {"completed", "rolled_back", "aborted"}


class CpuMeter:
    """CPU seconds (user + system) of a set of processes, sampled on demand."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        import psutil

        self.procs = {name: [psutil.Process(pid) for pid in group] for name, group in pids.items() if group}

    def sample(self) -> tuple[float, dict[str, float]]:
        out = {}
        for name, group in self.procs.items():
            try:
                out[name] = sum(t.user + t.system for t in (p.cpu_times() for p in group))
            except Exception:  # a process is gone: no figure
                out[name] = math.nan
        return time.monotonic(), out

    @staticmethod
    def pct(a: tuple[float, dict[str, float]], b: tuple[float, dict[str, float]], name: str) -> float:
        wall = b[0] - a[0]
        if wall <= 0 or name not in a[1]:
            return 0.0
        return round(100.0 * (b[1][name] - a[1][name]) / wall, 1)


@dataclass
class Services:
    server: ServerProcess
    broker: Broker | None
    database: Database
    meter: CpuMeter


def _counter(admin: Any, name: str) -> int:
    return int(admin.get("/api/v1/admin/stats").json()["counters"].get(name, 0))


def _min_devices(plan: RolloutPlan, n: int) -> list[dict[str, Any]]:
    soaks = [float(x) for x in plan.phase_soak_s] or [plan.min_soak_s] * len(plan.phases)
    return [{"percent": p, "min_soak_s": soak, "min_devices": max(1, math.floor(plan.min_reporting * n * p / 100.0))}
            for p, soak in zip(plan.phases, soaks, strict=True)]


def run_rollout(scn: Scenario, plan: RolloutPlan, fleet: Any, svc: Services,
                progress: Callable[[str], None]) -> RolloutSummary:
    admin = svc.server.admin()
    ingested0, published0 = _counter(admin, "telemetry_ingested"), fleet.published()
    r = admin.post("/api/v1/rollouts", json={
        "bundle": {"name": scn.model, "version": plan.bundle}, "phases": _min_devices(plan, scn.fleet.devices),
        "gates": gate_values(plan), "on_breach": plan.on_breach, "start": True, "canary_devices": plan.canary_devices,
        "reason": f"fleet-sim {scn.name}"})
    if r.status_code != 201:
        raise RuntimeError(f"creating the rollout of {plan.bundle} failed: HTTP {r.status_code} {r.text[:500]}")
    rid = r.json()["id"]
    c0 = svc.meter.sample()
    phase_cpu = {0: c0}
    phase_end_cpu: dict[int, Any] = {}
    progress(f"rollout {rid} of {plan.bundle} started ({r.json()['phases'][0]['devices']} devices in phase 0)")
    deadline = time.monotonic() + plan.timeout_s
    phase, status = 0, r.json()
    timed_out = False
    while True:
        time.sleep(0.5)
        status = admin.get(f"/api/v1/rollouts/{rid}").json()
        if status["current_phase"] != phase:
            now = svc.meter.sample()
            phase_end_cpu[phase] = now
            phase = status["current_phase"]
            phase_cpu[phase] = now
            progress(f"  {plan.bundle}: phase {phase} ({status['phases'][phase]['percent']} %), "
                     f"devices {fleet.versions()}")
        if status["state"] in FINAL or (status["state"] == "halted" and plan.on_breach == "halt"):
            break
        if time.monotonic() > deadline:
            timed_out = True
            admin.post(f"/api/v1/rollouts/{rid}/abort", json={"reason": f"fleet-sim timeout {plan.timeout_s} s"})
            status = admin.get(f"/api/v1/rollouts/{rid}").json()
            break
    c1 = svc.meter.sample()
    phase_end_cpu.setdefault(phase, c1)
    ingested = _counter(admin, "telemetry_ingested") - ingested0
    published = fleet.published() - published0
    audit = sorted(admin.get(f"/api/v1/rollouts/{rid}/audit").json(), key=lambda e: e["id"])
    progress(f"  {plan.bundle}: {status['state']}" + (f" ({status['halt']['reason']})" if status.get("halt") else ""))
    t_settle = time.monotonic()
    while time.monotonic() - t_settle < plan.settle_s and not fleet.settled(plan.bundle, status["state"]):
        time.sleep(0.5)
    settle = time.monotonic() - t_settle
    summary = _summarise(plan, rid, status, audit, timed_out, phase_cpu, phase_end_cpu, c0, c1, ingested)
    summary.telemetry_published = published
    summary.versions_after, summary.settle_s = fleet.versions(), round(settle, 1)
    return summary


def _at(entry: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(entry["at"]).timestamp()


def _summarise(plan: RolloutPlan, rid: str, status: dict[str, Any], audit: list[dict[str, Any]], timed_out: bool,
               phase_cpu: dict[int, Any], phase_end_cpu: dict[int, Any], c0: Any, c1: Any,
               ingested: int) -> RolloutSummary:
    start = next((e for e in audit if e["action"] == "rollout.start"), None)
    decisions = [e for e in audit if e["action"] in ("rollout.advance", "rollout.complete", "rollout.halt")]
    halt = next((e for e in audit if e["action"] == "rollout.halt"), None)
    phases: list[PhaseSummary] = []
    entered = _at(start) if start else None
    for p in status["phases"]:
        i = p["index"]
        leaving = next((e for e in decisions if e["detail"].get("phase_from") == i), None)
        gates: list[dict[str, Any]] = []
        duration: float | None = None
        if entered is None:
            outcome = "not reached"
        elif leaving is None:
            outcome = "timeout" if timed_out else "aborted"
        else:
            outcome = {"rollout.advance": "advanced", "rollout.complete": "completed",
                       "rollout.halt": "halted"}[leaving["action"]]
            duration = round(_at(leaving) - entered, 2)
            gates = leaving["detail"].get("gates") or leaving["detail"].get("breached") or []
        cpu = (CpuMeter.pct(phase_cpu[i], phase_end_cpu[i], "server")
               if i in phase_cpu and i in phase_end_cpu else None)
        phases.append(PhaseSummary(i, p["percent"], p["devices"], p["reporting"], duration, outcome, cpu, gates))
        entered = _at(leaving) if leaving is not None and leaving["action"] == "rollout.advance" else None
    breached = [g["name"] for g in (halt["detail"].get("breached", []) if halt else [])]
    halt_phase = halt["detail"].get("phase_to") if halt else None
    end = decisions[-1] if decisions else None
    duration = round((_at(end) if end else time.time()) - (_at(start) if start else time.time()), 2)
    final = status["state"]
    problems = []
    if timed_out:
        problems.append(f"timed out after {plan.timeout_s:.0f} s in phase {status['current_phase']}")
    if plan.expect and final != plan.expect:
        problems.append(f"final state {final}, expected {plan.expect}")
    if plan.expect_gate and plan.expect_gate not in breached:
        problems.append(f"expected gate {plan.expect_gate} to halt it; breached: {breached or 'none'}")
    if plan.expect_halt_phase is not None and halt_phase != plan.expect_halt_phase:
        problems.append(f"expected a halt in phase {plan.expect_halt_phase}, halted in {halt_phase}")
    wall = c1[0] - c0[0]
    return RolloutSummary(
        bundle=plan.bundle, rollout_id=rid, final_state=final, expected=plan.expect,
        expectation_met=not problems, expectation_detail="; ".join(problems) or "as expected",
        members=sum(p["devices"] for p in status["phases"]), duration_s=duration,
        halt_reason=(status.get("halt") or {}).get("reason"), halt_phase=halt_phase, breached=breached,
        phases=phases, telemetry_ingested=ingested, messages_per_s=round(ingested / wall, 1) if wall > 0 else 0.0,
        telemetry_published=0,
        server_cpu_pct=CpuMeter.pct(c0, c1, "server"), broker_cpu_pct=CpuMeter.pct(c0, c1, "broker"),
        simulator_cpu_pct=CpuMeter.pct(c0, c1, "simulator"), versions_after={}, settle_s=0.0)


def _host() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_1m": os.getloadavg()[0]}


def run_scenario(scn: Scenario, *, json_out: Path | None = None, keep: bool = False,
                 progress: Callable[[str], None] = lambda s: None) -> Summary:
    """Run every rollout of ``scn`` against fresh services; returns (and optionally writes) the summary."""
    import threading

    threading.stack_size(512 * 1024)  # ~3 threads per device (MQTT loop, telemetry sender, windows)
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgepack-fleet-server-"))
    state_root = default_state_root(scn.fleet.state_dir)
    broker: Broker | None = None
    database: Database | None = None
    server: ServerProcess | None = None
    fleet: Any = None
    try:
        progress(f"building/reading {len(scn.bundles)} bundles")
        keys, bundle_files = prepare_bundles(scn, work)
        tls_files = tls.init(work / "tls", hosts=["127.0.0.1", "localhost"])  # HTTPS and MQTT over TLS
        if scn.server.broker == "private":
            broker = start_private_broker(work, tls_files)
            mqtt_url = broker.url
        else:
            mqtt_url = scn.server.broker
        database = Database(scn.server.database, work)
        server = ServerProcess(scn, work, keys_dir=keys.directory, database_url=database.url, broker=broker,
                               mqtt_url=mqtt_url, tls_files=tls_files).start()
        ca_file = str(tls_files.ca_cert)
        progress(f"server {server.url} (pid {server.proc.pid if server.proc else '?'}), broker {mqtt_url}, "
                 f"database {scn.server.database}")
        with server.admin() as admin:
            for version, path in bundle_files.items():
                r = admin.post("/api/v1/bundles", content=path.read_bytes())
                if r.status_code != 201:
                    raise RuntimeError(f"pushing bundle {version} failed: HTTP {r.status_code} {r.text[:500]}")
            r = admin.post("/api/v1/admin/enrollment-tokens", json={"uses": scn.fleet.devices})
            token = r.json()["token"]
        if scn.fleet.processes > 1:
            fleet = ShardedFleet(scn, server_url=server.url, keys=keys, state_root=state_root,
                                 processes=scn.fleet.processes, ca_file=ca_file)
            sim_pids = [os.getpid(), *fleet.pids]
        else:
            fleet = Fleet(scn, server_url=server.url, keys=keys, state_root=state_root, ca_file=ca_file)
            sim_pids = [os.getpid()]
        enroll_s = fleet.enroll_and_boot(token)
        progress(f"{scn.fleet.devices} devices enrolled and booted in {enroll_s:.1f} s "
                 f"({scn.fleet.processes} process(es))")
        meter = CpuMeter({"server": [server.proc.pid] if server.proc else [],
                          "broker": [broker.pid] if broker and broker.pid else [],
                          "simulator": sim_pids})
        svc = Services(server, broker, database, meter)
        fleet.start()
        results = []
        for i, plan in enumerate(scn.rollouts):
            if i == 0:
                fleet.arm_faults()
            results.append(run_rollout(scn, plan, fleet, svc, progress))
        with server.admin() as admin:
            counters = admin.get("/api/v1/admin/stats").json()["counters"]
        report = fleet.report()
        summary = Summary(
            scenario=scn.name, devices=scn.fleet.devices, database=scn.server.database, enroll_s=round(enroll_s, 1),
            wall_s=round(time.monotonic() - t_start, 1), rollouts=results,
            load=report["load"], faults=report["faults"], sessions=report["sessions"],
            agent_errors=report["agent_errors"], server_counters=counters, host=_host())
        if json_out is not None:
            summary.write(json_out)
        return summary
    finally:
        if fleet is not None:
            fleet.stop()
        if server is not None:
            server.stop()
        if broker is not None:
            broker.stop()
        if database is not None:
            database.drop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
            if not scn.fleet.state_dir:
                shutil.rmtree(state_root, ignore_errors=True)
        else:
            progress(f"kept server work dir {work} and device state {state_root}")
