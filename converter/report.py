"""The build report: a rich table in the terminal, build-report.json and build-report.md.

The report is written for every build, including a failed one: it is where the user reads
which variant was refused by how much, and which step failed with what fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_POINTS = {"accuracy", "f1", "agreement"}


def fmt_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}%" if metric in _POINTS else f"{value:.4f}"


def fmt_delta(metric: str, delta: float | None) -> str:
    if delta is None:
        return "-"
    return f"{delta * 100:+.2f} pt" if metric in _POINTS else f"{delta:+.4f}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


_CHECK_LABEL = {"worst_cosine": "worst cos", "p5_cosine": "p5 cos", "nn_agreement": "NN agree",
                "class_accuracy_drop": "worst class loses"}


def fmt_check(c: dict[str, Any]) -> str:
    """``worst cos 0.9871 >= 0.98 ok``: one task-matched check, compact."""
    name, value, limit = c["name"], c["value"], c["limit"]
    if name == "nn_agreement":
        text = f"{value * 100:.1f}% >= {limit * 100:.0f}%"
    elif name == "class_accuracy_drop":
        text = f"{value * 100:.1f} pt <= {limit * 100:.1f} pt"
    else:
        text = f"{value:.4f} >= {limit:.4f}"
    return f"{_CHECK_LABEL.get(name, name)} {text} {'ok' if c['passed'] else 'FAILED'}"


def _latency(lat: dict[str, Any]) -> str:
    spread = lat.get("spread_ms")
    text = f"{lat['p50_ms']:.3f} / {lat['p95_ms']:.3f}"
    return text + (f" [{spread[0]:.3f}-{spread[1]:.3f}]" if spread else "")


def _speedup(v: dict[str, Any]) -> str:
    x, rng = v.get("speedup_x"), v.get("speedup_range")
    if x is None:
        return "-"
    return f"{x:.2f}x" + (f" [{rng[0]:.2f}-{rng[1]:.2f}]" if rng else "")


def rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per variant, shared by the terminal table and the markdown report."""
    metric = report.get("metric", {}).get("name", "")
    out = []
    for v in report.get("variants", []):
        lat = v.get("latency") or {}
        out.append([
            v["id"], v["status"], fmt_metric(metric, v.get("value")), fmt_delta(metric, v.get("delta")),
            "; ".join(fmt_check(c) for c in v.get("checks") or []) or "-",
            _size(v.get("size_bytes")), _size(v.get("compressed_bytes")), _ratio(v.get("smaller_x")),
            "-" if not lat else _latency(lat), _speedup(v),
            _size(lat.get("model_rss_bytes")) if lat else "-", _vs_base(v),
        ])
    return out


def _vs_base(v: dict[str, Any]) -> str:
    base = v.get("vs_base")
    if not base:
        return "-"
    text = f"{base['smaller_x']:.2f}x smaller"
    if base.get("speedup_x") is not None:
        lo, hi = base["speedup_range"]
        text += f", {base['speedup_x']:.2f}x [{lo:.2f}-{hi:.2f}] speed"
    return f"{text} vs {base['variant']}"


HEADERS = ["variant", "status", "metric", "delta", "checks", "size", "deflated", "smaller",
           "p50/p95 ms [round spread]", "speed-up [range]", "peak mem", "stage variant vs original"]


def preprocessing_line(report: dict[str, Any]) -> str:
    """Where the preprocessing's learned parameters come from (the [fit] training set, or nothing to learn)."""
    pre = report.get("preprocessing") or {}
    learned = ", ".join(pre.get("learned") or [])
    if pre.get("fitted_on") and learned:
        line = (f"Preprocessing fitted on [fit] ({pre.get('samples')} samples from {pre.get('source')}): "
                f"{learned}.")
    elif pre.get("fitted_on"):
        line = f"Preprocessing has nothing to learn; [fit] ({pre.get('samples')} samples) was read but not used."
    else:
        line = "Preprocessing has nothing to learn (no [fit] data needed)."
    return line + (f" Warning: {pre['warning']}." if pre.get("warning") else "")


def print_table(report: dict[str, Any], console: Any) -> None:
    """Render the variant table, profile choices, errors and the bundle line with rich."""
    from rich.markup import escape
    from rich.table import Table

    metric = report.get("metric", {})
    title = (f"{report['name']} {report['version']} - {metric.get('name')} of fp32 original "
             f"{fmt_metric(metric.get('name', ''), metric.get('reference'))}, "
             f"budget {fmt_delta(metric.get('name', ''), -metric.get('budget', 0.0))}")
    table = Table(title=title)
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("variant", "status") else "right")
    styles = {"shipped": "green", "passed": "cyan", "refused": "red", "failed": "red"}
    for row in rows(report):
        table.add_row(*row, style=styles.get(row[1]))
    if report.get("variants"):  # a build stopped before any variant (a bad path, missing keys) has no table
        console.print(table)
    if report.get("preprocessing"):
        console.print(escape(preprocessing_line(report)))
    for name, prof in report.get("profiles", {}).items():
        console.print(f"profile [bold]{name}[/]: prefers {prof['ship'][0] if prof['ship'] else '(nothing)'}"
                      f", ships {', '.join(prof['ship']) or '-'}")
    for v in report.get("variants", []):
        if v.get("error"):
            console.print(f"[red]{v['id']}[/]: {escape(v['error']['message'])} "
                          f"[dim]Fix: {escape(str(v['error'].get('fix')))}[/]")
    for err in report.get("errors", []):
        console.print(f"[red]build error[/] {escape('[' + err['step'] + ']')} {escape(err['message'])} "
                      f"Fix: {escape(str(err.get('fix')))}")
    bundle = report.get("bundle")
    if bundle:
        console.print(f"[green]bundle[/] {bundle['path']}  content digest {bundle['content_digest']}")
    console.print(f"build wall time {report.get('wall_seconds', 0):.1f} s")


def markdown(report: dict[str, Any]) -> str:
    """The markdown report (build-report.md)."""
    metric = report.get("metric", {})
    name = metric.get("name", "")
    lines = [f"# Build report: {report['name']} {report['version']}", "",
             f"Status: **{report['status']}**. Metric: {name} on {metric.get('samples')} evaluation samples "
             f"({metric.get('dataset', 'evaluation set')}); "
             f"fp32 original {fmt_metric(name, metric.get('reference'))}; budget: at most "
             f"{fmt_delta(name, metric.get('budget', 0.0)).lstrip('+')} loss.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    lines += ["", preprocessing_line(report)]
    if metric.get("output_chosen_by"):
        lines.append(f"The metric reads the model output `{metric.get('output')}` ({metric['output_chosen_by']}).")
    lines += ["", "Sizes and speed-ups are against the fp32 variant of the same format. Latency: one sample "
              "per call, one thread, on the build host, every variant in its own process, timed in "
              "interleaved rounds; the bracket is the range of the per-round medians. A speed-up is the "
              "median of the per-round ratios to fp32, with their range. Peak memory is what loading and "
              "running the model added to a fresh process. Checks are task-matched gates on the same "
              "evaluation set (see the variant's error when one fails).", "", "## Profiles", ""]
    for pname, prof in report.get("profiles", {}).items():
        lines.append(f"- **{pname}**: ships {', '.join(prof['ship']) or 'nothing'} (first = preferred)")
        for vid, why in sorted(prof.get("excluded", {}).items()):
            lines.append(f"  - not {vid}: {why}")
    stages = report.get("stages") or {}
    if stages:
        lines += ["", "## Stages", ""]
        for kind, info in stages.items():
            details = ", ".join(f"{k} {v}" for k, v in sorted(info.items()) if k not in ("status", "error"))
            lines.append(f"- **{kind}**: {info.get('status')}; {details}")
    problems = [v for v in report.get("variants", []) if v.get("error")] + [
        {"id": "build", "error": e} for e in report.get("errors", [])]
    if problems:
        lines += ["", "## Problems", ""]
        for p in problems:
            e = p["error"]
            lines.append(f"- `{p['id']}` [{e['step']}] {e['message']} **Fix:** {e.get('fix')}")
    bundle = report.get("bundle")
    lines += ["", "## Bundle", ""]
    lines.append(f"`{bundle['path']}`, content digest `{bundle['content_digest']}`" if bundle
                 else "No bundle was written.")
    lines += ["", f"Build wall time: {report.get('wall_seconds', 0):.1f} s", ""]
    return "\n".join(lines)


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write build-report.json and build-report.md into the output directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / "build-report.json", out_dir / "build-report.md"
    _atomic_write(jpath, json.dumps(report, indent=2, sort_keys=True) + "\n")
    _atomic_write(mpath, markdown(report))
    return jpath, mpath
