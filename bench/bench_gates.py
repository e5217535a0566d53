"""Gates: false halts, power and speed over thousands of synthetic rollouts, in-process, on the pure functions.

No server, no agents: a fleet of ``--devices`` devices (default 1,000; phases 1/10/50/100 % with a
``--canary``-device first phase) is drawn with realistic noise, and every 10-minute step each device adds
a window of telemetry (requests, errors, labels, correct labels, a latency histogram, crashes). Devices
differ: request rates (log-normal), accuracy (Beta around the model's, sd ~1.7 points), latency (log-normal
per device), and only some of them send labels at all (label sparsity). Each step the rollout is decided by
``update_server.rollout_policy.decide`` (intervals, device weighting, data required), and by the gates as
they were before (point estimate against the threshold after fixed counts; a gate without data neither
passes nor blocks), on the same telemetry.

Releases: ``good`` (same as the fleet), ``drop5`` (5 points less accurate), ``crash5`` (5 % of prediction
calls kill the worker). Reported per policy: false-halt rate over good rollouts; the share of drop5 halted in
the first phase; whether crash5 is halted before a device outside the first phase installs it; the devices
and labels on the target when a bad release is halted; how long the first phase of a good one waits.

    python bench/bench_gates.py [--good 200] [--bad 200] [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from update_server.gates import DeviceTable, GateSpec, GroupStats  # noqa: E402
from update_server.rollout_policy import (  # noqa: E402
    LATENCY_BOUNDS_MS,
    PhaseSpec,
    Progress,
    RolloutSpec,
    RolloutState,
    RolloutStats,
    Verdict,
    decide,
    percentile_from_histogram,
)

STEP_S = 600.0
SEEDS = {"good": 1_000_000, "drop5": 2_000_000, "crash5": 3_000_000}
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
BUCKETS = len(LATENCY_BOUNDS_MS) + 1


@dataclass(frozen=True)
class Fleet:
    devices: int = 1000
    canary: int = 10
    phases: tuple[float, ...] = (1, 10, 50, 100)
    soak_s: float = 3600.0
    max_phase_steps: int = 432  # 3 days: a phase still waiting then counts as stuck
    requests_per_step: float = 60.0  # median prediction calls per device per 10 minutes
    label_share: float = 0.2  # share of calls labelled on a labelling device ...
    labelled_devices: float = 0.5  # ... and the share of devices whose users label at all
    accuracy: float = 0.90
    error_rate: float = 0.002
    install_failure: float = 0.002
    background_crash_per_call: float = 2e-6


@dataclass
class Outcome:
    verdict: str  # completed, halted, stuck
    phase: int
    devices: int
    labels: int
    phase0_steps: int
    outside_installed: bool
    crashed: int = 0


def _phase_sizes(f: Fleet) -> list[int]:
    cum = [max(f.canary, round(f.devices * p / 100)) for p in f.phases]
    cum[-1] = f.devices
    return [b - a for a, b in zip([0, *cum[:-1]], cum, strict=True)]


class Sim:
    """One rollout on a synthetic fleet; ``policy`` decides each step."""

    def __init__(self, f: Fleet, release: str, rng: np.random.Generator) -> None:
        self.f, self.release, self.rng = f, release, rng
        n = f.devices
        sizes = _phase_sizes(f)
        self.phase_of = np.repeat(np.arange(len(sizes)), sizes)
        self.rate = f.requests_per_step * rng.lognormal(0, 0.5, n)
        self.label_share = np.where(rng.random(n) < f.labelled_devices, f.label_share, 0.0)
        conc = 300.0
        self.acc_c = rng.beta(f.accuracy * conc, (1 - f.accuracy) * conc, n)
        self.acc_t = np.clip(self.acc_c - (0.05 if release == "drop5" else 0.0), 0, 1)
        self.crash_t = 0.05 if release == "crash5" else f.background_crash_per_call
        med = 3.0 * rng.lognormal(0, 0.25, n)
        edges = np.array([0, *LATENCY_BOUNDS_MS, np.inf])
        from scipy.stats import lognorm
        cdf = lognorm.cdf(edges[None, :], 0.35, scale=med[:, None])
        self.lat_p = np.diff(cdf, axis=1)
        self.lat_p /= self.lat_p.sum(axis=1, keepdims=True)
        z = np.zeros((2, n))
        self.req, self.err, self.fb, self.ok = z.copy(), z.copy(), z.copy(), z.copy()
        self.lat = np.zeros((2, n, BUCKETS))
        self.crashed = np.zeros(n, bool)
        self.failed = np.zeros(n, bool)
        self.on_target = np.zeros(n, bool)
        self.installed = np.zeros(n, bool)

    def open_phase(self, phase: int) -> None:
        new = (self.phase_of <= phase) & ~self.installed
        self.installed |= new
        fails = new & (self.rng.random(self.f.devices) < self.f.install_failure)
        self.failed |= fails
        self.on_target |= new & ~fails

    def step(self) -> None:
        f, rng, n = self.f, self.rng, self.f.devices
        g = self.on_target.astype(int)  # 1 = target, 0 = control
        req = rng.poisson(self.rate)
        crash_p = np.where(self.on_target, self.crash_t, f.background_crash_per_call)
        crashed_now = rng.random(n) < 1 - (1 - crash_p) ** req
        self.crashed |= crashed_now & self.on_target
        err = rng.binomial(req, f.error_rate)
        fb = rng.binomial(req, self.label_share)
        ok = rng.binomial(fb, np.where(self.on_target, self.acc_t, self.acc_c))
        lat = rng.multinomial(req, self.lat_p)
        idx = np.arange(n)
        self.req[g, idx] += req
        self.err[g, idx] += err
        self.fb[g, idx] += fb
        self.ok[g, idx] += ok
        self.lat[g, idx] += lat

    def group(self, g: int, *, with_table: bool = True) -> GroupStats:
        mask = self.on_target if g == 1 else self.req[0] > 0
        if g == 1:
            mask = mask | self.failed  # a device that failed to install reported an event about the target
        table = DeviceTable(self.req[g][mask], self.err[g][mask], self.fb[g][mask], self.ok[g][mask],
                            self.lat[g][mask]) if with_table else None
        reporting = int((self.req[g][mask] > 0).sum())
        return GroupStats(devices_reporting=reporting, requests=int(self.req[g][mask].sum()),
                          errors=int(self.err[g][mask].sum()), feedback_count=int(self.fb[g][mask].sum()),
                          feedback_correct=int(self.ok[g][mask].sum()),
                          latency_counts=tuple(int(c) for c in self.lat[g][mask].sum(axis=0)),
                          crashed_devices=int((self.crashed & self.on_target).sum()) if g == 1 else 0,
                          devices_with_events=int(self.installed.sum()) if g == 1 else 0,
                          failed_devices=int(self.failed.sum()) if g == 1 else 0, per_device=table)

    def stats(self, phase: int, started: datetime) -> RolloutStats:
        members = {int(p): int((self.phase_of == p).sum()) for p in range(len(self.f.phases))}
        reporting = {int(p): int(((self.phase_of == p) & self.on_target & (self.req[1] > 0)).sum())
                     for p in range(len(self.f.phases))}
        return RolloutStats(progress=Progress(RolloutState.RUNNING, phase, started), members_by_phase=members,
                            reporting_by_phase=reporting, target=self.group(1), control=self.group(0))


def legacy_decide(spec: RolloutSpec, stats: RolloutStats, now: datetime, min_feedback: int) -> Verdict:
    """The gates as they were: point estimates after fixed counts; a gate without data neither passes nor blocks."""
    g, t, c = spec.gates, stats.target, stats.control
    breached = False
    if t.devices_with_events and g.max_install_failure_rate is not None:
        breached |= t.failed_devices / t.devices_with_events > g.max_install_failure_rate
    den = max(t.devices_reporting, t.crashed_devices)
    if den and g.max_crash_rate is not None:
        breached |= t.crashed_devices / den > g.max_crash_rate
    if t.requests >= g.min_requests and g.max_error_rate is not None:
        breached |= t.errors / t.requests > g.max_error_rate
    if t.feedback_count >= min_feedback and c.feedback_count >= min_feedback and g.max_accuracy_drop is not None:
        breached |= c.feedback_correct / c.feedback_count - t.feedback_correct / t.feedback_count \
            > g.max_accuracy_drop
    if sum(t.latency_counts) >= g.min_requests and sum(c.latency_counts) >= g.min_requests \
            and g.max_p95_latency_regression is not None:
        p_t = percentile_from_histogram(t.latency_counts, 0.95) or 0.0
        p_c = percentile_from_histogram(c.latency_counts, 0.95) or 1.0
        breached |= p_t / p_c - 1 > g.max_p95_latency_regression
    if breached:
        return Verdict.HALT
    phase = stats.progress.current_phase
    assert stats.progress.phase_started_at is not None
    if (now - stats.progress.phase_started_at).total_seconds() < spec.phases[phase].min_soak_s:
        return Verdict.NONE
    return Verdict.COMPLETE if phase + 1 >= len(spec.phases) else Verdict.ADVANCE


def run(f: Fleet, release: str, seed: int, policy: str, gates: GateSpec) -> Outcome:
    rng = np.random.default_rng(seed)
    sim = Sim(f, release, rng)
    spec = RolloutSpec(phases=tuple(PhaseSpec(p, f.soak_s, 5) for p in f.phases), gates=gates)
    phase, step, phase_steps, phase0_steps = 0, 0, 0, 0
    started = T0
    sim.open_phase(0)
    while True:
        sim.step()
        step += 1
        phase_steps += 1
        now = T0 + timedelta(seconds=step * STEP_S)
        stats = sim.stats(phase, started)
        if policy == "new":
            verdict = decide(spec, stats, now).verdict
        else:
            stats = replace(stats, target=replace(stats.target, per_device=None),
                            control=replace(stats.control, per_device=None))
            verdict = legacy_decide(spec, stats, now, min_feedback=int(policy.split("-")[1]))
        outside = bool((sim.installed & (sim.phase_of > 0)).any())
        if verdict is Verdict.HALT:
            return Outcome("halted", phase, stats.target.devices_with_events, stats.target.feedback_count,
                           phase0_steps or phase_steps, outside, stats.target.crashed_devices)
        if verdict in (Verdict.ADVANCE, Verdict.COMPLETE):
            if phase == 0:
                phase0_steps = phase_steps
            if verdict is Verdict.COMPLETE:
                return Outcome("completed", phase, stats.target.devices_with_events, stats.target.feedback_count,
                               phase0_steps, outside)
            phase, phase_steps, started = phase + 1, 0, now
            sim.open_phase(phase)
        elif phase_steps >= f.max_phase_steps:
            return Outcome("stuck", phase, stats.target.devices_with_events, stats.target.feedback_count,
                           phase0_steps or phase_steps, outside)


def summarize(outcomes: dict[str, list[Outcome]]) -> dict[str, Any]:
    good, drop, crash = outcomes["good"], outcomes["drop5"], outcomes["crash5"]
    halted_drop = [o for o in drop if o.verdict == "halted"]
    halted_crash = [o for o in crash if o.verdict == "halted"]

    def med(xs: list[float]) -> float:
        return float(np.median(xs)) if xs else float("nan")

    return {
        "false_halts": sum(o.verdict == "halted" for o in good) / len(good),
        "good_stuck": sum(o.verdict == "stuck" for o in good) / len(good),
        "good_phase0_h": med([o.phase0_steps * STEP_S / 3600 for o in good if o.verdict == "completed"]),
        "drop5_halted_phase0": sum(o.verdict == "halted" and o.phase == 0 for o in drop) / len(drop),
        "drop5_completed": sum(o.verdict == "completed" for o in drop) / len(drop),
        "drop5_held_phase0": sum(o.verdict == "stuck" and o.phase == 0 for o in drop) / len(drop),
        "drop5_labels": med([o.labels for o in halted_drop]),
        "drop5_devices": med([o.devices for o in halted_drop]),
        "crash5_before_outside": sum(o.verdict == "halted" and not o.outside_installed for o in crash) / len(crash),
        "crash5_devices": med([o.crashed for o in halted_crash]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--good", type=int, default=200)
    parser.add_argument("--bad", type=int, default=200)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--canary", type=int, default=10)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    f = Fleet(devices=args.devices, canary=args.canary)
    gates = GateSpec(max_p95_latency_regression=0.25)
    t0 = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    for policy, canary in (("new", args.canary), ("new", 30), ("legacy-50", args.canary),
                           ("legacy-200", args.canary), ("legacy-200", 30)):
        fleet = replace(f, canary=canary)
        outcomes: dict[str, list[Outcome]] = {}
        for release, count in (("good", args.good), ("drop5", args.bad), ("crash5", args.bad)):
            outcomes[release] = [run(fleet, release, SEEDS[release] + i, policy, gates) for i in range(count)]
        rows[f"{policy}@{canary}"] = summarize(outcomes)
        print(policy, canary, rows[f"{policy}@{canary}"], f"{time.perf_counter() - t0:.0f} s", flush=True)
    table = render(rows, args, time.perf_counter() - t0)
    print(table)
    if args.write_docs:
        write_docs(table)


NAMES = {"new": "now: intervals, device weighting, data required",
         "legacy-50": "before: point estimates, `min_feedback` 50, no data passes",
         "legacy-200": "before, `min_feedback` 200 (the fleet examples' choice)"}


def render(rows: dict[str, dict[str, Any]], args: Any, seconds: float) -> str:
    lines = [
        f"{args.devices} devices, phases 1/10/50/100 % (the first phase holds the number of devices in the "
        f"first column), 1 h soak, 10-minute windows; {args.good} good rollouts, {args.bad} 5-point-worse, "
        f"{args.bad} crashing (5 % of prediction calls); default gates (`false_halt_rate` 0.01, accuracy_drop "
        f"<= 0.02 + margin 0.03, crash_rate <= 0.05, error_rate <= 0.02, p95 latency +25 %); half the devices "
        f"label 20 % of their calls, devices' accuracy differs (sd 1.7 points). Wall time {seconds:.0f} s.",
        "",
        "| gates | first phase devices | false halts (good) | good: first phase (median h) | "
        "5-pt worse halted in phase 1 | 5-pt worse still held in phase 1 after 3 days | 5-pt worse completed | "
        "labels on the target at halt (median) | 5 %-crash halted before any device outside phase 1 installs it "
        "| crashed devices at halt (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        policy, canary = key.split("@")
        lines.append(
            f"| {NAMES[policy]} | {canary} | {100 * r['false_halts']:.1f} % | {r['good_phase0_h']:.1f} | "
            f"{100 * r['drop5_halted_phase0']:.1f} % | {100 * r['drop5_held_phase0']:.1f} % | "
            f"{100 * r['drop5_completed']:.1f} % | {r['drop5_labels']:.0f} | {100 * r['crash5_before_outside']:.1f} % "
            f"| {r['crash5_devices']:.0f} |")
    return "\n".join(lines)


NOTES = """Goals: false halts <= 1 %, a 5-point-worse release halted in the first phase in >= 95 % of rollouts.

How to read it. *Before*, a gate without data passed and a gate with data compared a point estimate with
its threshold at every look, so sampling noise halted good releases (the false-halt column). *Now* nothing
advances on a gate that lacks data, and a halt needs the always-valid interval past the threshold, so false
halts stay under `false_halt_rate` (0.01) however often the loop looks; the price is labels: a halt needs a
few thousand labels on the target instead of a few hundred. Devices differ, so a first phase of 10 devices
of which about 5 send labels is itself a small sample of the fleet: its interval cannot shrink below that
sampling spread (about +-3 points at alpha 0.002), which is as large as the gap between a 5-point drop and
the 2-point limit. Such a release is then *held* in the first phase (it never advances) rather than halted,
and the goal is met with a 30-device first phase (`canary_devices`), or with more devices that label. The
crashing build is halted at its first window either way (its devices all crash); the new gates wait for 3
crashed devices, the old ones halted on 1 (and so also on one unlucky background crash)."""


def write_docs(table: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    head = "## Rollout gates (synthetic rollouts)"
    block = (f"{head}\n\n`python bench/bench_gates.py --write-docs` (in-process: the pure gate functions on "
             "synthetic device telemetry, no agents; method in [server.md](server.md#rollouts), "
             "\"How gates decide\").\n\n"
             f"{table}\n\n{NOTES}\n")
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        text = text[:start] + block + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    main()
