"""Line charts as inline SVG, drawn in Python: a report that needs no script, no font and no network."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape

# Tableau's ten: distinct on screen and in print, in a fixed order so a run keeps its colour.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MAX_POINTS = 2000  # per series; longer series keep each bucket's minimum and maximum
MARKERS_UP_TO = 40  # series this short also get a dot at every point (validation curves)

WIDTH, HEIGHT = 640, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 40, 40


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (step, value)
    color: str = ""
    dashed: bool = False


def line_chart(title: str, series: list[Series], x_label: str = "step", y_label: str = "") -> str:
    """One ``<svg>`` with axes, ticks, a grid, a legend and a line per series (gaps where a value is not finite)."""
    series = [Series(s.name, _finite(s.points), s.color or PALETTE[i % len(PALETTE)], s.dashed) for i, s in enumerate(series)]
    series = [s for s in series if s.points]
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    if not xs:
        raise ValueError(f"chart {title!r} has no finite points")
    x_ticks, (x0, x1) = nice_ticks(min(xs), max(xs), min_step=1.0)  # steps are whole numbers
    y_ticks, (y0, y1) = nice_ticks(min(ys), max(ys))
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return TOP + ph - (y - y0) / (y1 - y0) * ph

    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{LEFT}" y="16">{escape(title)}</text>',
    ]
    for t in y_ticks:
        y = sy(t)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{format_number(t, y_step)}</text>')
    for t in x_ticks:
        x = sx(t)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + ph}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle">{format_number(t, x_step)}</text>')
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/>')
    out.append(f'<text class="axis-label" x="{LEFT + pw / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle">{escape(x_label)}</text>')
    if y_label:
        out.append(
            f'<text class="axis-label" transform="translate(12 {TOP + ph / 2:.1f}) rotate(-90)" '
            f'text-anchor="middle">{escape(y_label)}</text>'
        )
    for s in series:
        points = downsample(s.points)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(
            f'<path class="series" d="{_path(points, sx, sy)}" stroke="{s.color}"{dash}><title>{escape(s.name)}</title></path>'
        )
        if len(points) <= MARKERS_UP_TO:
            out += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{s.color}">'
                f"<title>{escape(s.name)} at {format_number(x, 1)}: {format_number(y, 0)}</title></circle>"
                for x, y in points
                if math.isfinite(y)
            ]
    out += _legend(series)
    out.append("</svg>")
    return "\n".join(out)


def nice_ticks(lo: float, hi: float, count: int = 5, min_step: float = 0.0) -> tuple[list[float], tuple[float, float]]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi], and the axis range they span."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite; got {lo}, {hi}")
    if hi == lo:  # one value: a small band around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = max(min_step, next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw))
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [i * step for i in range(start, stop + 1)]
    return ticks, (ticks[0], ticks[-1])


def format_number(value: float, step: float = 0.0) -> str:
    """A tick or table value: the decimals the tick step needs (``step`` 0: four significant digits);
    k/M/G for large numbers, 1.0e-4 style for tiny ones."""
    if value == 0:
        return "0"
    a = abs(value)
    if a >= 1e4:
        div, suffix = next((d, s) for d, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if a >= d)
        if not step:
            return f"{value / div:.3g}{suffix}"
        return f"{value / div:.{_decimals(step / div)}f}{suffix}"
    if a < 1e-3:
        return f"{value:.1e}".replace("e-0", "e-")
    return f"{value:.{_decimals(step)}f}" if step else f"{value:.4g}"


def _decimals(step: float) -> int:
    """Ticks are 1, 2 or 5 times a power of ten: a step of 0.02 needs two decimals, 5 none."""
    return max(0, min(6, -math.floor(math.log10(step) + 1e-9)))


def downsample(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ``limit`` points that keep the shape: each bucket's first, lowest and highest point."""
    if len(points) <= limit:
        return points
    per = math.ceil(len(points) / (limit // 3))
    out = []
    for i in range(0, len(points), per):
        bucket = points[i : i + per]
        keep = {0, min(range(len(bucket)), key=lambda j: bucket[j][1]), max(range(len(bucket)), key=lambda j: bucket[j][1])}
        out += [bucket[j] for j in sorted(keep)]
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points sorted by step; a value that is not finite stays as NaN, a gap in the line."""
    out = []
    for x, y in sorted(points, key=lambda p: p[0]):
        if isinstance(x, (int, float)) and math.isfinite(x) and isinstance(y, (int, float)) and not isinstance(y, bool):
            out.append((float(x), float(y) if math.isfinite(y) else math.nan))
    return out if any(math.isfinite(y) for _, y in out) else []


def _path(points: list[tuple[float, float]], sx: Callable[[float], float], sy: Callable[[float], float]) -> str:
    parts, pen_down = [], False
    for x, y in points:
        if not math.isfinite(y):
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{sx(x):.1f} {sy(y):.1f}")
        pen_down = True
    return " ".join(parts)


def _legend(series: list[Series]) -> list[str]:
    out: list[str] = []
    x: float = WIDTH - RIGHT
    # right-aligned, laid out from the right edge; text width estimated at 6.5 px a character
    for s in reversed(series):
        width = 22 + 6.5 * len(s.name)
        x -= width + 10
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<line x1="{x:.1f}" x2="{x + 16:.1f}" y1="26" y2="26" stroke="{s.color}" stroke-width="2"{dash}/>')
        out.append(f'<text class="legend" x="{x + 20:.1f}" y="30">{escape(s.name)}</text>')
    return out


CHART_CSS = """
svg.chart { max-width: 100%; height: auto; background: #fff; font-family: system-ui, sans-serif; }
svg.chart .chart-title { font-size: 14px; font-weight: 600; fill: #222; }
svg.chart .tick, svg.chart .legend, svg.chart .axis-label { font-size: 11px; fill: #444; }
svg.chart .grid { stroke: #e6e6e6; stroke-width: 1; }
svg.chart .frame { fill: none; stroke: #999; stroke-width: 1; }
svg.chart .series { fill: none; stroke-width: 1.8; stroke-linejoin: round; stroke-linecap: round; }
"""
