"""What happened in a simulated run: per rollout, its phases, its gates at each decision, the load it took.

Built from the server's own record (rollout status and audit log, whose timestamps time the phases) and
from measurements taken during the run (CPU of the server, broker and simulator processes; telemetry
ingested). Printed as rich tables and written as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PhaseSummary:
    index: int
    percent: float
    devices: int
    """Members of this phase (cohort)."""
    reporting: int
    """Of them, devices that reported a telemetry window on the target."""
    duration_s: float | None
    """From entering the phase to the decision that left it (advance, complete or halt); None if never entered."""
    outcome: str
    """``advanced``, ``completed``, ``halted``, ``timeout`` or ``not reached``."""
    server_cpu_pct: float | None = None
    """Server CPU during the phase, in % of one core."""
    gates: list[dict[str, Any]] = field(default_factory=list)
    """Every gate's value and threshold at the decision that ended the phase."""


@dataclass
class RolloutSummary:
    bundle: str
    rollout_id: str
    final_state: str
    expected: str
    expectation_met: bool
    expectation_detail: str
    members: int
    duration_s: float
    halt_reason: str | None
    halt_phase: int | None
    breached: list[str]
    phases: list[PhaseSummary]
    telemetry_ingested: int
    messages_per_s: float
    """Telemetry messages the server ingested (new, after de-duplication) per second of the rollout."""
    telemetry_published: int
    """Messages the devices published (broker acknowledged) meanwhile: the baseline ingestion keeps up with."""
    server_cpu_pct: float
    broker_cpu_pct: float
    simulator_cpu_pct: float
    versions_after: dict[str, int]
    """Devices per serving version once the rollout ended and devices settled."""
    settle_s: float


@dataclass
class Summary:
    scenario: str
    devices: int
    database: str
    enroll_s: float
    wall_s: float
    rollouts: list[RolloutSummary]
    load: dict[str, int]
    faults: dict[str, int]
    sessions: dict[str, int]
    agent_errors: list[str]
    server_counters: dict[str, int]
    host: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(r.expectation_met for r in self.rollouts) and not self.agent_errors

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=1, default=str)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{v:.0f}"
    return str(v)


def gate_text(g: dict[str, Any]) -> str:
    """``accuracy 0.1947 [0.15, 0.24] (>= 0.8) BREACHED``: value, always-valid interval, threshold, status."""
    mark = {"ok": "ok", "breached": "BREACHED", "no_data": "no data", "off": "off"}.get(g["status"], g["status"])
    if g["status"] == "off":
        return f"{g['name']} off"
    interval = f" [{_fmt(g['lower'], 4)}, {_fmt(g['upper'], 4)}]" if g.get("lower") is not None else ""
    return (f"{g['name']} {_fmt(g.get('value'), 4)}{interval} ({g.get('comparison', '')} "
            f"{_fmt(g.get('threshold'), 4)}) {mark}")


def render(summary: Summary, console: Any = None) -> None:
    """Print the summary as rich tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(width=200)
    console.print(f"[bold]fleet simulation[/bold] {summary.scenario}: {summary.devices} devices, "
                  f"database {summary.database}, enrollment {summary.enroll_s:.1f} s, wall {summary.wall_s:.1f} s")
    table = Table(title="rollouts")
    for col in ("bundle", "final state", "expected", "time s", "members", "msgs/s", "server CPU %",
                "broker CPU %", "sim CPU %", "devices after"):
        table.add_column(col)
    for r in summary.rollouts:
        style = "green" if r.expectation_met else "red"
        table.add_row(r.bundle, f"[{style}]{r.final_state}[/{style}]", r.expected or "-", f"{r.duration_s:.1f}",
                      str(r.members), f"{r.messages_per_s:.0f}", f"{r.server_cpu_pct:.0f}",
                      f"{r.broker_cpu_pct:.0f}", f"{r.simulator_cpu_pct:.0f}",
                      ", ".join(f"{v}: {n}" for v, n in sorted(r.versions_after.items())))
    console.print(table)
    for r in summary.rollouts:
        t = Table(title=f"{r.bundle} ({r.rollout_id}): {r.final_state}"
                        + (f" - {r.halt_reason}" if r.halt_reason else ""))
        for col in ("phase", "%", "devices", "reporting", "time s", "outcome", "server CPU %", "gates at decision"):
            t.add_column(col)
        for p in r.phases:
            t.add_row(str(p.index), _fmt(p.percent), str(p.devices), str(p.reporting), _fmt(p.duration_s, 1),
                      p.outcome, _fmt(p.server_cpu_pct, 0),
                      "; ".join(gate_text(g) for g in p.gates if g["status"] != "off"))
        console.print(t)
        if not r.expectation_met:
            console.print(f"[red]expectation not met:[/red] {escape(str(r.expectation_detail))}")
    console.print(f"load: {summary.load}")
    console.print(f"faults: {summary.faults}")
    console.print(f"shared sessions: {summary.sessions}")
    for err in summary.agent_errors[:5]:
        console.print(f"[red]agent error[/red] {escape(str(err))}")
