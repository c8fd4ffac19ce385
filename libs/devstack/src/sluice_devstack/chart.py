"""A line chart as SVG, with no plotting library: the benchmarks' curves, readable in any browser."""

from __future__ import annotations

import html
from dataclasses import dataclass

_WIDTH, _HEIGHT = 760, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 80, 80, 40, 100
_COLOURS = ("#1f77b4", "#2ca02c", "#d62728", "#7f7f7f", "#ff7f0e", "#9467bd")


@dataclass(frozen=True)
class Series:
    name: str
    values: list[float]


def _ticks(top: float) -> list[float]:
    """About five round steps from 0 to at least ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    step = 10 ** len(str(int(top / 5))) / 10
    while top / step > 6:
        step *= 2 if str(step).lstrip("0.")[:1] in ("1", "5") else 2.5
    count = int(top // step) + 1
    return [i * step for i in range(count + 1)]


def line_chart(
    title: str,
    *,
    x_label: str,
    x: list[float],
    left_label: str,
    left: list[Series],
    right_label: str,
    right: list[Series],
) -> str:
    """Series on two y axes over the same x values (spaced evenly: the steps, not their sizes)."""
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    span = max(1, len(x) - 1)

    def px(i: int) -> float:
        return _LEFT + plot_w * i / span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="white"/>',
        f'<text x="{_WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{html.escape(title)}</text>',
        f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h + 38}" text-anchor="middle">{html.escape(x_label)}</text>',
    ]
    for i, value in enumerate(x):
        parts.append(f'<text x="{px(i)}" y="{_TOP + plot_h + 18}" text-anchor="middle">{value:g}</text>')
    colours = iter(_COLOURS)
    for row, (side, label, series) in enumerate((("left", left_label, left), ("right", right_label, right))):
        legend_x, legend_y = _LEFT, _HEIGHT - 36 + 20 * row  # a row of the legend per axis
        ticks = _ticks(max((v for s in series for v in s.values), default=0.0))
        top = ticks[-1]
        axis_x = _LEFT if side == "left" else _LEFT + plot_w
        anchor, offset = ("end", -6) if side == "left" else ("start", 6)
        for tick in ticks:
            y = _TOP + plot_h * (1 - tick / top)
            parts.append(f'<text x="{axis_x + offset}" y="{y + 4}" text-anchor="{anchor}">{tick:g}</text>')
            if side == "left":
                parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y}" y2="{y}" stroke="#ddd"/>')
        label_x = 18 if side == "left" else _WIDTH - 18
        parts.append(
            f'<text transform="translate({label_x},{_TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
            f"{html.escape(label)}</text>"
        )
        for s in series:
            colour = next(colours)
            dash = ' stroke-dasharray="6,4"' if side == "right" else ""
            values = s.values[: len(x)]
            points = " ".join(f"{px(i)},{_TOP + plot_h * (1 - v / top)}" for i, v in enumerate(values))
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            for i, v in enumerate(values):
                parts.append(f'<circle cx="{px(i)}" cy="{_TOP + plot_h * (1 - v / top)}" r="3" fill="{colour}"/>')
            parts.append(
                f'<line x1="{legend_x}" x2="{legend_x + 24}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" '
                f'stroke-width="2"{dash}/>'
            )
            parts.append(f'<text x="{legend_x + 30}" y="{legend_y + 4}">{html.escape(s.name)}</text>')
            legend_x += 40 + 7 * len(s.name)
    parts.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/></svg>')
    return "\n".join(parts)
