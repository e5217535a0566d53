"""Charts as inline SVG, rendered on the server: no JavaScript library, no CDN, nothing to fetch.

Only SVG presentation attributes are used (no ``style=``), so the pages keep a strict Content-Security-Policy.
Each point carries a ``<title>`` (the browser shows it on hover). Values are escaped; colours come from the
fixed palette below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from markupsafe import Markup

PALETTE = ("#2563eb", "#9ca3af", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
DOTS_UP_TO = 48
"""Series with more points are drawn as a line without a hover dot per point (keeps pages small)."""
STATE_COLOURS = {"idle": "#16a34a", "serving": "#16a34a", "trial": "#0891b2", "downloading": "#2563eb",
                 "verifying": "#2563eb", "installing": "#2563eb", "error": "#dc2626", "rolling_back": "#ea580c"}


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[datetime, float | None]]
    colour: str = PALETTE[0]
    dashed: bool = False


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return float(m * exp)
    return float(10 * exp)


def line_chart(series: Sequence[Series], *, title: str, unit: str = "", threshold: float | None = None,
               band: Sequence[tuple[datetime, float, float]] = (), y_min: float | None = 0.0, width: int = 560,
               height: int = 170) -> Markup:
    """Lines over time, with an optional dashed threshold and a shaded interval band."""
    pad_l, pad_r, pad_t, pad_b = 48, 10, 22, 24
    title_w = 7 * len(title) + 16
    legend_w = sum(8 + 7 * len(s.name) for s in series)
    two_lines = pad_l + title_w + legend_w > width - pad_r  # a long legend goes on a line of its own
    if two_lines:
        pad_t += 14
    times = [t for s in series for t, _ in s.points] + [t for t, _, _ in band]
    values = [v for s in series for _, v in s.points if v is not None] + [x for _, lo, hi in band for x in (lo, hi)]
    if threshold is not None:
        values.append(threshold)
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text x="{pad_l}" y="14" class="chart-title">{escape(title)}</text>']
    if not times or not values:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="chart-empty">no data</text>'
                   "</svg>")
        return Markup("".join(out))
    t0, t1 = min(times).timestamp(), max(times).timestamp()
    t1 = t1 if t1 > t0 else t0 + 1
    lo = min(values) if y_min is None else min(y_min, min(values))
    hi = _nice_max(max(values)) if max(values) > lo else lo + 1
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(t: datetime) -> float:
        return pad_l + (t.timestamp() - t0) / (t1 - t0) * w

    def y(v: float) -> float:
        return pad_t + h - (v - lo) / (hi - lo) * h

    for i in range(5):
        v = lo + (hi - lo) * i / 4
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
                   f'<text x="{pad_l - 4}" y="{y(v) + 4:.1f}" text-anchor="end" class="tick">{_fmt(v)}{unit}</text>')
    span = t1 - t0
    for i in range(4):
        t = datetime.fromtimestamp(t0 + span * i / 3, min(times).tzinfo)
        label = t.strftime("%H:%M" if span <= 2 * 86400 else "%m-%d %H:%M")
        anchor = "start" if i == 0 else "end" if i == 3 else "middle"
        out.append(f'<text x="{x(t):.1f}" y="{height - 6}" text-anchor="{anchor}" class="tick">{label}</text>')
    if band:
        top = " ".join(f"{x(t):.1f},{y(h_):.1f}" for t, _, h_ in band)
        bottom = " ".join(f"{x(t):.1f},{y(l_):.1f}" for t, l_, _ in reversed(band))
        out.append(f'<polygon points="{top} {bottom}" fill="{PALETTE[0]}" fill-opacity="0.15"/>')
    if threshold is not None:
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                   f'stroke="{PALETTE[2]}" stroke-dasharray="5 4" stroke-width="1.5"><title>threshold '
                   f'{_fmt(threshold)}{unit}</title></line>')
    legend_x, legend_y, shown = width - pad_r, 28 if two_lines else 14, 0
    for s in reversed(series):
        if legend_x - 7 * len(s.name) < (pad_l if two_lines else pad_l + title_w):
            break
        out.append(f'<text x="{legend_x}" y="{legend_y}" text-anchor="end" fill="{s.colour}" class="legend">'
                   f'{escape(s.name)}</text>')
        legend_x -= 8 + 7 * len(s.name)
        shown += 1
    if shown < len(series):
        out.append(f'<text x="{legend_x}" y="{legend_y}" text-anchor="end" class="legend">'
                   f'+{len(series) - shown} more</text>')
    for s in series:
        # a missing value (no data in that step) is skipped: the line joins its neighbours
        runs: list[list[tuple[float, float, datetime, float]]] = [
            [(x(t), y(value), t, value) for t, value in s.points if value is not None]]
        dash = ' stroke-dasharray="4 3"' if s.dashed else ""
        dense = sum(len(run) for run in runs) > DOTS_UP_TO
        for run in runs:
            if len(run) > 1:
                pts = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in run)
                hint = (f"<title>{escape(s.name)}: {_fmt(min(r[3] for r in run))} to {_fmt(max(r[3] for r in run))}"
                        f"{unit}, last {_fmt(run[-1][3])}{unit}</title>") if dense else ""
                out.append(f'<polyline points="{pts}" fill="none" stroke="{s.colour}" stroke-width="1.8"{dash}>'
                           f"{hint}</polyline>")
            for px, py, t, v in ([] if dense and len(run) > 1 else run):
                out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{2.2 if len(run) == 1 else 1.4}" '
                           f'fill="{s.colour}"><title>{escape(s.name)} {t:%Y-%m-%d %H:%M}: {_fmt(v)}{unit}</title>'
                           "</circle>")
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(items: Sequence[tuple[str, float]], *, title: str, compare: dict[str, float] | None = None,
              width: int = 560, height: int = 170, limit: int = 20) -> Markup:
    """Vertical bars (e.g. a class histogram as shares), optionally beside a comparison (grey)."""
    items = list(items)[:limit]
    pad_l, pad_r, pad_t, pad_b = 40, 10, 22, 30
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text x="{pad_l}" y="14" class="chart-title">{escape(title)}</text>']
    if not items:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="chart-empty">no data</text>'
                   "</svg>")
        return Markup("".join(out))
    top = _nice_max(max([v for _, v in items] + list((compare or {}).values())))
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    slot = w / len(items)
    for i, (label, value) in enumerate(items):
        x0 = pad_l + i * slot
        bars = [(value, PALETTE[0], "this version")]
        if compare is not None:
            bars.append((compare.get(label, 0.0), PALETTE[1], "control"))
        bw = slot * 0.8 / len(bars)
        for j, (v, colour, who) in enumerate(bars):
            bh = v / top * h
            out.append(f'<rect x="{x0 + slot * 0.1 + j * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{bw:.1f}" '
                       f'height="{bh:.1f}" fill="{colour}"><title>{escape(label)} ({who}): {_fmt(v)}</title></rect>')
        out.append(f'<text x="{x0 + slot / 2:.1f}" y="{height - 12}" text-anchor="middle" class="tick">'
                   f'{escape(label[:8])}</text>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end" class="tick">{_fmt(top)}</text></svg>')
    return Markup("".join(out))


def stacked_bar(parts: Sequence[tuple[str, int, str]], *, width: int = 320, height: int = 14) -> Markup:
    """One horizontal bar split into coloured parts (label, count, colour), e.g. devices by state."""
    total = sum(n for _, n, _ in parts) or 1
    out = [f'<svg class="bar" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    x = 0.0
    for label, n, colour in parts:
        w = n / total * width
        out.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{colour}">'
                   f'<title>{escape(label)}: {n}</title></rect>')
        x += w
    out.append("</svg>")
    return Markup("".join(out))


def state_colour(state: str | None) -> str:
    return STATE_COLOURS.get(state or "", PALETTE[7])
