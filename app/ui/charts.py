"""Small inline SVG line charts drawn on the server (no JavaScript charting library, no build step).

    svg = line_chart({"pretext": [(1, 5.2), (2, 4.9)], "clustering": [...]},
                     title="Loss per epoch", x_label="epoch")

Returns markup safe to put into a Jinja template (values are numbers; names are escaped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.3g}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str = "",
    width: int = 460,
    height: int = 220,
    css_class: str = "chart",
) -> Markup:
    """One polyline per series; empty series are skipped. Returns "" when there is nothing to draw."""
    clean = {
        name: [(float(x), float(y)) for x, y in pts if y is not None and math.isfinite(float(y))]
        for name, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return Markup("")
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 48, 12, 26, 34
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg class="{escape(css_class)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="chart-frame"/>',
    ]
    for t in _nice_ticks(y0, y1):
        y = sy(t)
        parts.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="chart-grid"/>'
            f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" class="chart-tick">{_fmt(t)}</text>'
        )
    for t in _nice_ticks(x0, x1, 5):
        x = sx(t)
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle" class="chart-tick">{_fmt(t)}</text>')
    if x_label:
        parts.append(
            f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" '
            f'class="chart-tick">{escape(x_label)}</text>'
        )
    legend_x = left + 8
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2" '
            f'class="series" data-series="{escape(name)}"/>'
        )
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        parts.append(
            f'<rect x="{legend_x}" y="{top + 6 + 14 * i}" width="10" height="3" fill="{color}"/>'
            f'<text x="{legend_x + 14}" y="{top + 10 + 14 * i}" class="chart-legend">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
