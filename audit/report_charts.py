"""Chart geometry for the HTML audit report, computed on the server.

Functions here return plain numbers and short labels; ``templates/audit/report.html`` draws them as inline
SVG (autoescaped, inside ``{% localize off %}`` so coordinates keep a decimal point), so the page needs no
script, no font and no network to show its charts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

WIDTH, HEIGHT = 760, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 14, 30  # room for the y-axis labels on the left, x labels below
Y_TICKS = 4
MAX_X_LABELS = 8  # more would overlap at this width
BAR_FILL = 0.8  # share of a time slot its bar covers
ROW_H = 22  # one horizontal bar
LABEL_W = 190  # room for a reason's name left of its bar
MAX_ROWS = 20
MAX_LABEL_CHARS = 28


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    cls: str
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "middle"
    cls: str = "axis"


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class LegendItem:
    cls: str
    label: str


@dataclass(frozen=True)
class Series:
    """One stacked layer of a time chart: its legend label, CSS class and one value per bucket."""

    label: str
    cls: str
    values: list[int]


@dataclass
class Chart:
    """Everything the template needs to draw one chart."""

    title: str
    width: int
    height: int
    rects: list[Rect] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    legend: list[LegendItem] = field(default_factory=list)
    empty: str = ""


def tick_step(maximum: float, ticks: int = Y_TICKS) -> float:
    """Return a round axis step (1, 2, 2.5 or 5 times a power of ten, at least 1) covering ``maximum``."""
    raw = maximum / ticks
    if raw <= 1:
        return 1
    power = 10 ** math.floor(math.log10(raw))
    multiples = (1, 2, 2.5, 5, 10) if power >= 10 else (1, 2, 5, 10)
    return next(m * power for m in multiples if m * power >= raw)


def compact(value: float) -> str:
    """Format a count for an axis label: 950, 1.2k, 3.4M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:g}"


def _r(value: float) -> float:
    return round(value, 1)


def _y_axis(step: float, plot_h: float) -> tuple[list[Line], list[Label]]:
    lines, labels = [], []
    for i in range(Y_TICKS + 1):
        y = _r(TOP + plot_h - i * plot_h / Y_TICKS)
        lines.append(Line(LEFT, y, WIDTH - RIGHT, y))
        labels.append(Label(LEFT - 6, _r(y + 4), compact(i * step), anchor="end"))
    return lines, labels


def time_chart(title: str, starts: list[datetime], series: list[Series], label_format: str) -> Chart:
    """Return a stacked bar chart with one bar per time bucket."""
    chart = Chart(title, WIDTH, HEIGHT, legend=[LegendItem(s.cls, s.label) for s in series])
    count = len(starts)
    totals = [sum(s.values[i] for s in series) for i in range(count)]
    if not any(totals):
        chart.empty = "Nothing in this period."
    step = tick_step(max(totals, default=0))
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(count, 1)
    chart.lines, chart.labels = _y_axis(step, plot_h)
    for i, start in enumerate(starts):
        when = start.strftime(label_format)
        base = float(TOP + plot_h)
        for layer in series:
            value = layer.values[i]
            if not value:
                continue
            height = value / (step * Y_TICKS) * plot_h
            base -= height
            x = _r(LEFT + (i + (1 - BAR_FILL) / 2) * slot)
            title_text = f"{when} · {layer.label}: {value:,}"
            chart.rects.append(Rect(x, _r(base), _r(slot * BAR_FILL), _r(height), layer.cls, title_text))
    every = max(1, math.ceil(count / MAX_X_LABELS))
    chart.labels += [
        Label(_r(LEFT + (i + 0.5) * slot), HEIGHT - 10, starts[i].strftime(label_format))
        for i in range(0, count, every)
    ]
    return chart


def bar_rows_chart(title: str, rows: list[tuple[str, str, int]], legend: list[LegendItem]) -> Chart:
    """Return a horizontal bar chart of (label, CSS class, count) rows, largest first."""
    rows = sorted(rows, key=lambda row: (-row[2], row[0]))[:MAX_ROWS]
    chart = Chart(title, WIDTH, TOP + max(len(rows), 1) * ROW_H + 10, legend=legend)
    if not rows:
        chart.empty = "Nothing in this period."
        return chart
    largest = rows[0][2]
    bar_max = WIDTH - LABEL_W - 80  # leave room for the count after the longest bar
    for i, (label, cls, count) in enumerate(rows):
        top = TOP + i * ROW_H
        width = count / largest * bar_max if largest else 0
        text = label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"
        chart.rects.append(Rect(LABEL_W, top + 4, _r(width), ROW_H - 8, cls, f"{label}: {count:,}"))
        chart.labels.append(Label(LABEL_W - 8, top + 15, text, anchor="end", cls="name"))
        chart.labels.append(Label(_r(LABEL_W + width + 6), top + 15, f"{count:,}", anchor="start"))
    return chart
