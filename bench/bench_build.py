"""Benchmark `edgepack build` on both examples in one run.

For each example: the build's wall time (the CLI in a fresh process: imports, training/export,
conversion, evaluation, measurement, signing), and per variant the metric, its delta to the
fp32 original, its task-matched checks, the size ratio and the latency ratio against the fp32
variant of the same format (and, for pruned/student variants, against the original variant of the same
kind), measured in the same interleaved rounds on this host. Goals (from the issue) are checked and printed; nothing
here asserts on time.

    python bench/bench_build.py                 # prints the markdown section
    python bench/bench_build.py --write-docs    # also replaces "## Build (converter)" in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {"digits": REPO / "examples" / "digits" / "edgepack.toml",
            "minilm": REPO / "examples" / "minilm" / "edgepack.toml"}
SECTION = "## Build (converter)"


def run_example(spec: Path, tmp: Path) -> tuple[dict[str, Any], float]:
    cmd = [sys.executable, "-m", "converter.cli", "build", "-c", str(spec), "--out", str(tmp / "out"),
           "--keys", str(tmp / "keys"), "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"build of {spec} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    report["bench_downloads"] = per_variant_downloads(Path(report["bundle"]["path"])) if report.get("bundle") else {}
    # CPU seconds of the build and its children (measurement processes included): unlike wall time, this
    # does not grow when other work shares the host's two cores.
    report["bench_cpu_seconds"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)
    report["bench_load_average"] = os.getloadavg()[0]
    return report, wall


def per_variant_downloads(archive: Path) -> dict[str, dict[str, int]]:
    """What a device of each profile downloads (bundles.verify.variant_files) against its model's size."""
    import zipfile

    from bundles.manifest import Manifest
    from bundles.verify import variant_files

    with zipfile.ZipFile(archive) as zf:
        members = {i.filename: i.file_size for i in zf.infolist() if i.filename.startswith("targets/")}
        prefix = next(m for m in members if m.endswith("/manifest.json")).rsplit("/", 1)[0] + "/"
        manifest = Manifest.from_bytes(zf.read(prefix + "manifest.json"))
    sizes = {m[len(prefix):]: n for m, n in members.items()}
    out = {}
    for profile, order in manifest.profiles.items():
        vid = order[0]
        need = variant_files(manifest, sizes, vid)
        out[profile] = {"variant": vid, "bytes": sum(sizes[r] for r in need), "files": len(need),
                        "model_bytes": sizes[manifest.variant(vid).file], "all_bytes": sum(sizes.values())}
    return out


def _metric(name: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.2f} %" if name in ("accuracy", "f1", "agreement") else f"{v:.4f}"


def _delta(name: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 100:+.2f} pt" if name in ("accuracy", "f1", "agreement") else f"{v:+.4f}"


def _checks(v: dict[str, Any]) -> str:
    from converter.report import fmt_check

    return "; ".join(fmt_check(c) for c in v.get("checks") or []) or "-"


def _range(x: Any, rng: Any) -> str:
    if x is None:
        return "-"
    return f"{x}x" + (f" [{rng[0]}-{rng[1]}]" if rng else "")


def table(name: str, report: dict[str, Any], wall: float) -> list[str]:
    m = report["metric"]
    lines = [f"### {name}: `{report['name']}` (metric {m['name']}, fp32 original {_metric(m['name'], m['reference'])}"
             f" on {m['samples']} samples of {m.get('dataset', 'the evaluation set')}; build wall time "
             f"**{wall:.1f} s**, CPU time {report.get('bench_cpu_seconds')} s, 1-min load average at the end "
             f"{report.get('bench_load_average', 0):.1f})", "",
             "| variant | status | metric | delta | checks | size | deflated | smaller than fp32 "
             "| p50 ms [round range] | speed-up vs fp32 [range] | stage variant vs original | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        lat = v.get("latency") or {}
        size = v.get("size_bytes")
        comp = v.get("compressed_bytes")
        spread = lat.get("spread_ms")
        p50 = "-" if not lat else f"{lat['p50_ms']:.3f}"
        if spread:
            p50 += f" [{spread[0]:.3f}-{spread[1]:.3f}]"
        base = v.get("vs_base") or {}
        vs = "-" if not base else (f"{base['smaller_x']}x smaller, "
                                   f"{_range(base.get('speedup_x'), base.get('speedup_range'))} speed vs "
                                   f"{base['variant']}")
        lines.append(
            f"| {v['id']} | {v['status']} | {_metric(m['name'], v.get('value'))} | {_delta(m['name'], v.get('delta'))} "
            f"| {_checks(v)} | {'-' if size is None else f'{size / 1e6:.3f} MB'} "
            f"| {'-' if comp is None else f'{comp / 1e6:.3f} MB'} | {v.get('smaller_x', '-')}x | {p50} "
            f"| {_range(v.get('speedup_x'), v.get('speedup_range'))} | {vs} "
            f"| {lat.get('model_rss_bytes', 0) / 1e6:.1f} |")
    stages = report.get("stages") or {}
    for kind, info in stages.items():
        keys = ("sparsity", "student", "teacher_params", "student_params", "epochs", "samples", "seconds")
        lines.append("")
        lines.append(f"Stage `{kind}`: {info.get('status')}; "
                     + ", ".join(f"{k} {info[k]}" for k in keys if k in info))
    return lines


def _var(r: dict[str, Any], vid: str) -> dict[str, Any] | None:
    return next((v for v in r["variants"] if v["id"] == vid), None)


def _check(v: dict[str, Any] | None, name: str) -> float | None:
    return next((c["value"] for c in (v or {}).get("checks") or [] if c["name"] == name), None)


def goals(reports: dict[str, tuple[dict[str, Any], float]]) -> list[str]:
    d, dwall = reports["digits"]
    mm, mwall = reports["minilm"]
    out = ["| goal | measured | met |", "|---|---|---|"]
    best = None
    for vid in ("pruned-tflite-int8", "pruned-onnx-int8", "student-tflite-int8", "student-onnx-int8"):
        v = _var(d, vid)
        if v and v.get("vs_base") and v.get("drop") is not None:
            cand = (v["vs_base"]["smaller_x"], v)
            if v["drop"] <= 0.005 and (best is None or cand[0] > best[0]):
                best = cand
    if best is not None:
        v = best[1]
        out.append(f"| digits: a pruned/distilled int8 variant >= 2x smaller than today's int8 | {v['id']}: "
                   f"{v['vs_base']['smaller_x']}x smaller than {v['vs_base']['variant']} | "
                   f"{v['vs_base']['smaller_x'] >= 2.0} |")
        out.append(f"| ... at <= 0.5 pt accuracy loss vs fp32 | {_delta('accuracy', v['delta'])} | "
                   f"{v['drop'] <= 0.005} |")
    else:
        out.append("| digits: a pruned/distilled int8 variant >= 2x smaller, <= 0.5 pt loss | none within budget "
                   "| False |")
    q = _var(mm, "onnx-int8-dynamic") or {}
    worst, nn = _check(q, "worst_cosine"), _check(q, "nn_agreement")
    out.append(f"| MiniLM int8: worst-case cosine >= 0.98 | {worst if worst is None else f'{worst:.4f}'} | "
               f"{worst is not None and worst >= 0.98} |")
    out.append(f"| MiniLM int8: nearest-neighbour agreement >= 90 % | {nn if nn is None else f'{nn * 100:.1f} %'} | "
               f"{nn is not None and nn >= 0.9} |")
    smaller = q.get("smaller_x") or 0
    out.append(f"| MiniLM int8: >= 3.5x smaller than fp32 | {smaller}x | {smaller >= 3.5} |")
    st = _var(mm, "student-onnx-int8-dynamic") or {}
    sb = st.get("vs_base") or {}
    out.append(f"| MiniLM student >= 1.8x faster than the int8 teacher | "
               f"{_range(sb.get('speedup_x'), sb.get('speedup_range'))} | {(sb.get('speedup_x') or 0) >= 1.8} |")
    if st:
        out.append(f"| MiniLM student quality (reported) | mean cosine {st.get('value')}, worst "
                   f"{_check(st, 'worst_cosine')}, NN agreement {_check(st, 'nn_agreement')} | - |")
    for label, r in (("digits", d), ("MiniLM", mm)):
        for profile, dl in sorted((r.get("bench_downloads") or {}).items()):
            ratio = dl["bytes"] / dl["model_bytes"]
            goal = " (goal <= 1.1x)" if label == "MiniLM" else ""
            out.append(f"| {label} {profile} device downloads only its variant{goal} | {dl['bytes']:,} bytes in "
                       f"{dl['files']} files for the {dl['model_bytes']:,}-byte {dl['variant']} = {ratio:.3f}x "
                       f"(whole bundle {dl['all_bytes']:,} bytes) | {ratio <= 1.1 if label == 'MiniLM' else '-'} |")
    for label, (r, wall) in (("digits", (d, dwall)), ("MiniLM", (mm, mwall))):
        cpu = r.get("bench_cpu_seconds")
        out.append(f"| {label} whole build <= 300 s | wall {wall:.1f} s (CPU {cpu} s, load average "
                   f"{r.get('bench_load_average', 0):.1f}) | {wall <= 300} |")
    return out


def reading(reports: dict[str, tuple[dict[str, Any], float]]) -> str:
    """The prose under the tables, with every figure taken from this run's reports."""
    parts = []
    for name, (r, _) in reports.items():
        for fmt in ("onnx", "tflite"):
            f16 = _var(r, f"{fmt}-fp16")
            if f16 and f16.get("speedup_x") is not None:
                parts.append(f"{name} {fmt}-fp16 ran at {f16['speedup_x']}x the speed of {fmt}-fp32 "
                             f"(per-round range {f16['speedup_range'][0]}-{f16['speedup_range'][1]}x)")
    fp16 = ("; ".join(parts) + ". ") if parts else ""
    return ("Reading the figures: latency is one sample per call, one thread, every variant in its own "
            "process, timed in interleaved rounds; a speed-up is the median of the per-round ratios, with "
            "their range, so both sides were timed in the same seconds on this shared host. " + fp16 +
            "The CPU profiles do not ship fp16 because they declare no fp16 compute, whatever this host "
            "measures. Pruned variants keep dense tensors: same file size, smaller deflated size, no "
            "faster kernels. MiniLM latency is for the first evaluation sentence padded to its own length. "
            "The build wall time is the CLI in a fresh process, imports, training and export included; the "
            "host is shared with other work, so wall times vary by run.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    reports = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        for name, spec in EXAMPLES.items():
            (Path(tmp) / name).mkdir()
            reports[name] = run_example(spec, Path(tmp) / name)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    lines = [SECTION, "", "Command: `python bench/bench_build.py --write-docs` (builds both examples, one run, "
             "fresh keys, fresh output dirs).", "",
             f"Host: {cpu}, {os.cpu_count()} cores (shared), Python {platform.python_version()}. Latency: one sample "
             "per call, one thread, 200 calls per variant in 10 interleaved rounds, every variant in its own process; "
             "ratios are against the fp32 variant of the same format, measured in the same rounds. Peak MB: what "
             "loading and running the model added to that process's peak RSS (VmHWM). Deflated: the model file "
             "compressed with zlib level 9.", ""]
    for name, (report, wall) in reports.items():
        lines += [*table(name, report, wall), ""]
    lines += ["### Goals", "", *goals(reports), ""]
    lines += [reading(reports), ""]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        path = REPO / "docs" / "benchmarks.md"
        doc = path.read_text() if path.exists() else "# Benchmarks\n\n"
        if SECTION in doc:
            start = doc.index(SECTION)
            nxt = doc.find("\n## ", start + len(SECTION))
            doc = doc[:start] + text + ("\n" + doc[nxt + 1:] if nxt != -1 else "")
        else:
            doc = doc.rstrip("\n") + "\n\n" + text
        path.write_text(doc)


if __name__ == "__main__":
    main()
