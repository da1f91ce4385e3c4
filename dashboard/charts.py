"""Line charts as inline SVG computed on the server: no script, works offline, and every label
goes through the template's escaping like any other text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WIDTH, HEIGHT = 560, 180
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 28


@dataclass
class Chart:
    title: str
    points: str = ""  # SVG polyline points
    dots: list[tuple[float, float]] = field(default_factory=list)
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    last: str = ""
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_width: int = WIDTH - LEFT - RIGHT
    plot_height: int = HEIGHT - TOP - BOTTOM

    @property
    def empty(self) -> bool:
        return not self.dots


def nice_step(span: float, ticks: int = 4) -> float:
    """A 1, 2 or 5 times a power of ten step that cuts `span` into about `ticks` parts."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * power >= raw:
            return m * power
    return 10 * power


def human(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))


TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
              43200, 86400, 172800, 604800)


def time_step(span: float, ticks: int = 5) -> float:
    """A step a clock reads well (10 s, 5 min, 1 h…) that cuts `span` into about `ticks`."""
    return next((s for s in TIME_STEPS if s * ticks >= span), TIME_STEPS[-1])


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60}s" if s % 60 else "")
    if s < 86400:
        return f"{s // 3600}h" + (f"{s % 3600 // 60}m" if s % 3600 // 60 else "")
    return f"{s / 86400:.3g}d"


def line_chart(title: str, series: list[dict[str, Any]], key: str,
               integer: bool = False) -> Chart:
    """`key` of each point against its time `t`, from the first point on; `integer`: a count,
    whose axis has no fractional ticks."""
    pts = []
    for p in series:
        t, v = p.get("t"), p.get(key)
        if isinstance(t, (int, float)) and isinstance(v, (int, float)) and \
                math.isfinite(t) and math.isfinite(v):
            pts.append((float(t), float(v)))
    chart = Chart(title)
    if not pts:
        return chart
    t0, t1 = pts[0][0], max(p[0] for p in pts)
    y_max = max(p[1] for p in pts)
    y_min = min(0.0, min(p[1] for p in pts))
    step = nice_step(y_max - y_min)
    if integer:
        step = max(1.0, math.ceil(step))
    top = max(step, math.ceil(y_max / step) * step)
    span_t = max(t1 - t0, 1.0)
    pw, ph = chart.plot_width, chart.plot_height

    def sx(t: float) -> float:
        return round(LEFT + (t - t0) / span_t * pw, 1)

    def sy(v: float) -> float:
        return round(TOP + ph - (v - y_min) / (top - y_min) * ph, 1)

    chart.dots = [(sx(t), sy(v)) for t, v in pts]
    chart.points = " ".join(f"{x},{y}" for x, y in chart.dots)
    v = y_min
    while v <= top + step / 2:
        chart.y_ticks.append((sy(v), human(v)))
        v += step
    t_step = time_step(span_t)
    t = 0.0
    while t <= span_t + t_step / 2:
        if t <= span_t:
            chart.x_ticks.append((sx(t0 + t), _duration(t)))
        t += t_step
    chart.last = human(pts[-1][1])
    return chart
