"""Drift: what counting costs on the device, what comparing costs on the server, and how noisy PSI is.

* Device: ``bundles.drift.DriftCounter.observe`` per prediction (one 64-pixel digits image), against the
  baseline of the same counts made feature by feature with ``numpy.searchsorted`` (the obvious loop).
* Server: ``update_server.drift.compare`` (vectorized) against the per-feature Python formulas (``psi`` and
  ``ks_distance``), same counts, same results.
* Noise: the worst-feature PSI of inputs drawn from the digits data itself (nothing changed), 20 draws per
  sample size, and of a real shift (fainter ink: every pixel x 0.6 or x 0.8).
* Size: the bytes of ``input_stats`` in a 120-request window (moments and drift counts).

    python bench/bench_drift.py [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_call_us(fn: Any, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    from bundles.drift import DriftCounter, DriftProfile, bin_counts
    from tests.server.dashboard_scenario import input_stats
    from tests.support.factories import digits_data, reference_profile
    from update_server.drift import Reference, compare, ks_distance, psi

    images, _ = digits_data()
    x = (images.reshape(-1, 64) / 16.0).astype(np.float32)
    profile = reference_profile()
    parsed = DriftProfile.from_dict(profile)
    counter = DriftCounter(parsed)
    one = {"input": x[:1]}
    rng = np.random.default_rng(0)

    def naive() -> None:
        for f in parsed.features:
            bin_counts(f.edges, x[:1, f.index].astype(np.float64))

    device = {"vectorized_us": round(per_call_us(lambda: counter.observe(one, {}), 2000), 1),
              "per_feature_loop_us": round(per_call_us(naive, 500), 1)}
    device["ratio"] = round(device["per_feature_loop_us"] / device["vectorized_us"], 1)
    counter.take()
    counter.observe({"input": x[:1000]}, {})
    hist = counter.take()
    assert hist is not None
    ref = Reference.of(profile)
    server = {"vectorized_us": round(per_call_us(lambda: compare(profile, hist["counts"], 1000, 1, ref=ref), 500), 1),
              "python_us": round(per_call_us(lambda: [(psi(f["expected"], c), ks_distance(f["expected"], c))
                                                      for f, c in zip(profile["features"], hist["counts"],
                                                                      strict=True)], 200), 1)}
    server["ratio"] = round(server["python_us"] / server["vectorized_us"], 1)

    def drift(rows: np.ndarray) -> float:
        c = DriftCounter(parsed)
        c.observe({"input": rows.astype(np.float32)}, {})
        h = c.take()
        assert h is not None
        value = compare(profile, h["counts"], h["samples"], 1).value
        assert value is not None
        return value

    noise = {}
    for n in (200, 500, 1000, 2000):
        values = [drift(x[rng.choice(len(x), n)]) for _ in range(20)]
        noise[n] = {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}
    shift = {f"x{k}": round(drift(np.round(images[1200:1700].reshape(-1, 64) * k) / 16.0), 2) for k in (0.8, 0.6)}
    stats = input_stats(x[:120].astype(np.float64), profile)
    stats["min"], stats["max"] = x[:120].min(axis=0).round(6).tolist(), x[:120].max(axis=0).round(6).tolist()
    moments = {k: stats[k] for k in ("count", "mean", "std", "min", "max")}
    size = {"moments_bytes": len(json.dumps(moments)), "hist_bytes": len(json.dumps(stats["hist"])),
            "total_bytes": len(json.dumps(stats))}
    results = {"device": device, "server": server, "noise": noise, "shift": shift, "size": size,
               "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    print(json.dumps(results, indent=2))
    section = render(results)
    print(section)
    if args.write_docs:
        path = ROOT / "docs" / "benchmarks.md"
        text = path.read_text()
        start = text.find("## Drift")
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            nxt = text.find("\n## ", start + 3)
            text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
        path.write_text(text.rstrip("\n") + "\n")


def render(r: dict[str, Any]) -> str:
    d, s, z, m = r["device"], r["server"], r["size"], r["machine"]
    lines = ["## Drift", "", "Command: `python bench/bench_drift.py`", "",
             f"Host: {m['cpus']} cores shared with other work (load average {m['load_avg_1m']}). The digits drift "
             "profile: 64 pixel features, deciles of the held-out images.", "",
             "| what | edgepack | baseline (same run) | ratio |", "|---|---|---|---|",
             f"| device: count one prediction's inputs (`DriftCounter.observe`) | {d['vectorized_us']} µs | "
             f"{d['per_feature_loop_us']} µs (a `searchsorted` per feature) | {d['ratio']}x |",
             f"| server: PSI + KS of 64 features (`drift.compare`) | {s['vectorized_us']} µs | "
             f"{s['python_us']} µs (the per-feature Python formulas) | {s['ratio']}x |", "",
             "Worst-feature PSI of inputs drawn from the digits data itself (nothing changed), 20 draws each:", "",
             "| inputs | median | max |", "|---|---|---|"]
    lines += [f"| {n:,} | {v['median']} | {v['max']} |" for n, v in r["noise"].items()]
    lines += ["", f"A real shift, fainter ink on 500 held-out images: every pixel x 0.8: PSI {r['shift']['x0.8']}; "
              f"x 0.6: {r['shift']['x0.6']}. Hence `drift_min_samples` = 1,000 and the threshold 0.25.", "",
              f"`input_stats` of a 120-request window: moments {z['moments_bytes']:,} bytes, drift counts "
              f"{z['hist_bytes']:,} bytes, {z['total_bytes']:,} bytes in all (JSON).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
