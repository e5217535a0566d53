"""Dashboard page times with a big fleet in PostgreSQL: 10,000 devices, 50 versions, 7 days of telemetry.

The database is filled directly (it would take days to make that telemetry through the broker): 5 models x 10
versions, every device on one of its model's newest versions, a rollout per version (2,000 members each; 5 still
active), per-version health buckets for 7 days (hour buckets with 64-feature drift histograms; minute buckets for
the last 2 days, the retention), 20 events and a drift row per device, gate history every 30 s for the active
rollouts over 7 days, 5,000 audit entries. Then the real server (`edgepack-server serve`, one worker) renders each
page; the figure is the server time it reports (`Server-Timing: app;dur=...`, from authentication to the
rendered HTML), with the wall time seen by the client beside it.

    python bench/bench_dashboard.py                 # prints the table; --write-docs updates docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_server import Server  # noqa: E402
from tests.support import services  # noqa: E402

MODELS = [f"model-{c}" for c in "abcde"]
VERSIONS = [f"1.{i}.0" for i in range(10)]
N_DEVICES = 10_000
DAYS = 7
GOAL_MS = 300.0


def seed(db_url: str, now: datetime) -> dict[str, Any]:
    from sqlalchemy import insert

    from tests.support.factories import reference_profile
    from update_server.db import make_engine, make_sessionmaker, migrate
    from update_server.models import (
        HIST_DTYPE,
        LATENCY_COLUMNS,
        AuditEntry,
        Bundle,
        Device,
        DeviceDrift,
        DriftReference,
        GateSample,
        Rollout,
        RolloutDevice,
        TelemetryAggregate,
        TelemetryEvent,
        VersionHealth,
    )

    rng = random.Random(1)
    engine = make_engine(db_url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    profile = reference_profile()
    from bundles.drift import DriftProfile

    digest = DriftProfile.from_dict(profile).digest
    bins = [len(f["expected"]) for f in profile["features"]]

    def hist(samples: int, shift: float) -> bytes:
        """Counts as a device sends them, stored as the server stores them (flat int64)."""
        out = []
        for f, k in zip(profile["features"], bins, strict=True):
            weights = [max(e + (shift if i == k - 1 else 0.0), 1e-6) for i, e in enumerate(f["expected"])]
            total = sum(weights)
            out += [int(samples * w / total) for w in weights]
        return np.asarray(out, dtype=HIST_DTYPE).tobytes()

    t0 = time.monotonic()
    versions = [(m, v) for m in MODELS for v in VERSIONS]
    counts: dict[str, int] = {}
    with sessions() as s, s.begin():
        s.execute(insert(Bundle), [{"id": i + 1, "name": m, "version": v, "release_counter": int(v.split(".")[1]) + 1,
                                    "content_digest": "0" * 64, "archive_size": 1000, "hardware_ids": ["x86-kiosk"],
                                    "manifest": {"name": m, "version": v}, "files": [], "targets_version": 1,
                                    "uploaded_at": now - timedelta(days=DAYS + 1), "uploaded_by": "bench"}
                                   for i, (m, v) in enumerate(versions)])
        s.execute(insert(DriftReference), [{"bundle_name": m, "bundle_version": v, "digest": digest,
                                            "profile": profile, "loaded_at": now} for m, v in versions])
        devices = []
        for i in range(N_DEVICES):
            m = MODELS[i % len(MODELS)]
            v = VERSIONS[-1] if rng.random() < 0.7 else VERSIONS[-2]
            devices.append({"id": f"kiosk-{i:05d}", "hardware_id": "x86-kiosk", "credential_hash": f"{i:064x}",
                            "group_name": f"site-{i % 40}", "tags": {}, "platform": "linux-x86_64",
                            "agent_version": "0.1.0", "runtimes": {"onnxruntime": "1.20"},
                            "state": rng.choice(["idle"] * 20 + ["trial", "downloading", "error"]),
                            "last_error": "SelfTestError: golden vector 3 differs" if rng.random() < 0.01 else None,
                            "active_name": m, "active_version": v, "active_release_counter": 10,
                            "active_variant": "onnx-fp32", "enrolled_at": now - timedelta(days=30),
                            "last_seen_at": now - timedelta(seconds=rng.randint(0, 600)), "desired_reason": "none",
                            "desired_seq": 0, "signed_seq": -1, "assignment_version": 0})
        s.execute(insert(Device), devices)
        counts["devices"] = len(devices)
        rollouts, members = [], []
        for j, (m, v) in enumerate(versions):
            rid = f"r-{j:012x}"
            active = v == VERSIONS[-1]
            state = "running" if active and m != MODELS[0] else ("halted" if active else "completed")
            spec = {"phases": [{"percent": p, "min_soak_s": 3600, "min_devices": 5} for p in (1, 10, 50, 100)],
                    "gates": {"max_install_failure_rate": 0.05, "max_crash_rate": 0.05, "max_error_rate": 0.02,
                              "min_accuracy": None, "max_accuracy_drop": 0.02, "max_p95_latency_regression": 0.25,
                              "min_requests": 100, "min_feedback": 50, "max_input_drift": 0.25,
                              "min_drift_samples": 1000}, "on_breach": "halt"}
            started = now - timedelta(days=DAYS) + timedelta(hours=j * 3)
            rollouts.append({"id": rid, "bundle_id": j + 1, "model_name": m, "target_version": v, "selector": {},
                             "spec": spec, "state": state, "current_phase": 2 if active else 3,
                             "phase_started_at": now - timedelta(hours=1), "created_at": started,
                             "created_by": "bench", "started_at": started,
                             "finished_at": None if active else started + timedelta(hours=20),
                             "halt": {"at": (now - timedelta(hours=1)).isoformat(),
                                      "reason": "gate breached: crash_rate 0.08 > 0.05",
                                      "breached": [{"name": "crash_rate", "status": "breached", "value": 0.08,
                                                    "threshold": 0.05, "comparison": "<=", "detail": "4/50 devices"}]}
                             if state == "halted" else None, "last_decision": None})
            members += [{"rollout_id": rid, "device_id": d["id"], "bucket": rng.random() * 100,
                         "phase_index": rng.randrange(4), "previous_bundle_id": None, "joined_at": started}
                        for d in devices if d["active_name"] == m]
        s.execute(insert(Rollout), rollouts)
        counts["rollouts"] = len(rollouts)
    with sessions() as s, s.begin():
        for i in range(0, len(members), 20000):
            s.execute(insert(RolloutDevice), members[i:i + 20000])
        counts["rollout_members"] = len(members)
    health = []
    for m, v in versions:
        for res, n in ((3600, DAYS * 24), (60, 2 * 24 * 60)):
            start = datetime.fromtimestamp(int(now.timestamp()) // res * res, timezone.utc)
            for k in range(n):
                row: dict[str, Any] = {"bundle_name": m, "bundle_version": v, "resolution": res,
                                       "bucket_start": start - timedelta(seconds=k * res), "windows": 200,
                                       "requests": 20000, "errors": 30, "crashes": 1, "feedback_count": 400,
                                       "feedback_correct": 380, "classes": {str(c): 2000 for c in range(10)},
                                       "input_samples": 0, "input_profile": None, "input_hist": None,
                                       **{c: (5000 if c in ("lat_2", "lat_3") else 1000) for c in LATENCY_COLUMNS}}
                if res == 3600:
                    row.update(input_samples=20000, input_profile=digest, input_hist=hist(20000, 0.0))
                health.append(row)
    with sessions() as s, s.begin():
        for i in range(0, len(health), 5000):
            s.execute(insert(VersionHealth), health[i:i + 5000])
        counts["health_buckets"] = len(health)
    events, aggs, drift = [], [], []
    for i, d in enumerate(devices):
        for k in range(20):
            events.append({"message_id": f"{i:016x}{k:016x}", "device_id": d["id"], "rollout_id": None,
                           "event": rng.choice(["downloading", "verified", "activated", "committed", "crash"]),
                           "bundle_version": d["active_version"], "target_name": d["active_name"],
                           "target_version": d["active_version"], "detail": {"phase": "serving"},
                           "sent_at": now - timedelta(hours=k * 8), "received_at": now - timedelta(hours=k * 8)})
        aggs.append({"rollout_id": "", "device_id": d["id"], "bundle_name": d["active_name"],
                     "bundle_version": d["active_version"], "phase_index": -1, "windows": 10000, "requests": 10 ** 6,
                     "errors": 100, "crashes": 1, "feedback_count": 1000, "feedback_correct": 950, "events": 20,
                     "install_failures": 0, "first_at": now - timedelta(days=DAYS), "last_at": now,
                     **{c: 1000 for c in LATENCY_COLUMNS}})
        drift.append({"device_id": d["id"], "bundle_name": d["active_name"], "bundle_version": d["active_version"],
                      "input_profile": digest, "input_samples": 50000, "input_hist": hist(50000, 0.0),
                      "first_at": now - timedelta(days=DAYS), "last_at": now})
    with sessions() as s, s.begin():
        for rows, model in ((events, TelemetryEvent), (aggs, TelemetryAggregate), (drift, DeviceDrift)):
            for i in range(0, len(rows), 10000):
                s.execute(insert(model), rows[i:i + 10000])
        counts.update(events=len(events), device_drift=len(drift))
    gates_view = [{"name": n, "status": "ok", "value": 0.01, "threshold": 0.05, "comparison": "<=", "detail": ""}
                  for n in ("install_failure_rate", "crash_rate", "error_rate", "accuracy", "accuracy_drop",
                            "p95_latency_regression", "input_drift")]
    samples = [{"rollout_id": r["id"], "at": now - timedelta(seconds=30 * k), "phase": 2, "verdict": "none",
                "gates": gates_view} for r in rollouts if r["finished_at"] is None for k in range(DAYS * 24 * 120)]
    with sessions() as s, s.begin():
        for i in range(0, len(samples), 20000):
            s.execute(insert(GateSample), samples[i:i + 20000])
        s.execute(insert(AuditEntry), [{"at": now - timedelta(minutes=k), "actor": "bench", "action": "rollout.pause",
                                        "subject": rollouts[k % 50]["id"], "rollout_id": rollouts[k % 50]["id"],
                                        "reason": "bench", "detail": {"from": "running", "to": "paused"}}
                                       for k in range(5000)])
        counts.update(gate_samples=len(samples), audit=5000)
    counts["seed_s"] = round(time.monotonic() - t0, 1)
    counts["pages"] = {"rollout_running": rollouts[-1]["id"], "rollout_halted": rollouts[9]["id"],
                       "device": devices[0]["id"], "version": f"{MODELS[1]}/{VERSIONS[-1]}"}
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS bench_seed (figures text)"))
        conn.execute(text("INSERT INTO bench_seed VALUES (:f)"), {"f": json.dumps(counts)})
        conn.commit()
    engine.dispose()
    return counts


def _seeded(db_url: str) -> dict[str, Any] | None:
    """The seed figures of a database filled by an earlier run (kept in a table of its own), or None."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS bench_seed (figures text)"))
            conn.commit()
            row = conn.execute(text("SELECT figures FROM bench_seed")).first()
            return json.loads(row[0]) if row else None
    finally:
        engine.dispose()


def measure(server: Server, paths: dict[str, str], repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=120) as c:
        for name, path in paths.items():
            c.get(path).raise_for_status()  # warm-up (first use of each query plan)
            dur, wall = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = c.get(path)
                wall.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                dur.append(float(r.headers["server-timing"].split("dur=")[1]))
            dur.sort()
            out[name] = {"path": path, "median_ms": round(statistics.median(dur), 1),
                         "p95_ms": round(dur[int(len(dur) * 0.95) - 1], 1), "max_ms": round(dur[-1], 1),
                         "wall_median_ms": round(statistics.median(wall), 1), "bytes": len(r.content)}
            print(f"{name:22s} {out[name]}", flush=True)
    return out


def render(results: dict[str, Any], argv: str) -> str:
    c, m = results["seed"], results["machine"]
    lines = ["## Dashboard pages", "", f"Command: `python bench/bench_dashboard.py{' ' + argv if argv else ''}`", "",
             f"PostgreSQL filled with {c['devices']:,} devices, {c['rollouts']} versions (5 models x 10) each with a "
             f"rollout ({c['rollout_members']:,} memberships), {c['health_buckets']:,} health buckets (7 days of "
             f"hour buckets with 64-feature drift histograms, 2 days of minute buckets), {c['events']:,} device "
             f"events, {c['device_drift']:,} device drift rows, {c['gate_samples']:,} gate samples and "
             f"{c['audit']:,} audit entries. The server runs as `edgepack-server serve` (one worker). Server time is "
             "what the server reports in `Server-Timing` (sign-in check, queries, rendering), over "
             f"{results['repeats']} requests per page after one warm-up, first with `metrics_cache_s=0` (every "
             "request computes everything: the figures that count), then with the default 10 s (drift results, "
             "which sum many stored histograms, are reused between the pages, `/metrics` and the gate loop); "
             f"host: {m['cpus']} cores shared with other work (load average {m['load_avg_1m']} at the end).", "",
             "| page | path | median ms | p95 ms | max ms | client wall median ms | HTML bytes | with the 10 s drift "
             "cache: median / max ms | p95 ≤ 300 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["pages"].items():
        c = results["cached"][name]
        lines.append(f"| {name} | `{r['path']}` | {r['median_ms']} | {r['p95_ms']} | {r['max_ms']} | "
                     f"{r['wall_median_ms']} | {r['bytes']:,} | {c['median_ms']} / {c['max_ms']} | "
                     f"{'yes' if r['p95_ms'] <= GOAL_MS else '**no**'} |")
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    start = text.find("## Dashboard pages")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + 3)
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--db-url", help="an existing PostgreSQL database to use (seeded first when it is empty); "
                                         "kept afterwards, for profiling")
    args = parser.parse_args()
    from bundles.keys import KeyStore

    now = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-ui-") as tmp, \
            (contextlib.nullcontext(args.db_url) if args.db_url else services.postgres_database()) as db_url:
        work = Path(tmp)
        keys = KeyStore.init(work / "keys")
        seeded = _seeded(db_url) or seed(db_url, now)
        print(f"seeded: {json.dumps(seeded)}", flush=True)
        p = seeded["pages"]
        paths = {"overview": "/ui/", "rollouts": "/ui/rollouts",
                 "rollout (running)": f"/ui/rollouts/{p['rollout_running']}",
                 "rollout (halted)": f"/ui/rollouts/{p['rollout_halted']}", "models": "/ui/models",
                 "version (24 h)": f"/ui/models/{p['version']}?range=24h",
                 "version (7 d)": f"/ui/models/{p['version']}?range=7d",
                 "version (6 h)": f"/ui/models/{p['version']}?range=6h", "devices": "/ui/devices",
                 "devices (filtered)": f"/ui/devices?version={p['version']}&page=20",
                 "device": f"/ui/devices/{p['device']}", "audit log": "/ui/audit"}
        runs = {}
        for label, cache in (("uncached", "0"), ("cached", "10")):
            server = Server(work, keys.directory, db_url, EDGEPACK_GATE_INTERVAL_S="3600",
                            EDGEPACK_METRICS_CACHE_S=cache)
            try:
                print(f"-- {label} (metrics_cache_s={cache})", flush=True)
                runs[label] = measure(server, paths, args.repeats)
            finally:
                server.stop()
    results = {"seed": seeded, "pages": runs["uncached"], "cached": runs["cached"], "repeats": args.repeats,
               "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    section = render(results, "")
    print(section)
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
