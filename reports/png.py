"""PNG files of the report's figures: each plotly figure of `reports.figures`, drawn by matplotlib.

The PNG is read off the same figure object the interactive page shows, so the two cannot drift
apart; only what those figures use is translated. Figures are saved through matplotlib's Agg
canvas, never through `pyplot`: no global backend is switched and no figure is left open.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 120
PX_PER_INCH = 100  # plotly's layout size in pixels -> matplotlib's figure size in inches
SYMBOLS = {"x": "x", "diamond": "D", "star": "*"}  # plotly's marker symbols; others are dots
DASHES = {"dash": "--", "dot": ":"}


def save(fig: go.Figure, path: Path) -> Path:
    """The matplotlib twin of `fig`, a plotly figure of `reports.figures`, as a PNG at `path`."""
    layout = fig.layout
    out = Figure(
        figsize=((layout.width or 800) / PX_PER_INCH, (layout.height or 500) / PX_PER_INCH)
    )
    ax = out.add_subplot()
    ticks = _categories(fig)
    bars = [t for t in fig.data if t.type == "bar"]
    for trace in fig.data:
        if trace.type == "heatmap":
            _heatmap(out, ax, trace)
        elif trace.type == "bar":
            _bar(ax, trace, bars.index(trace), len(bars), ticks)
        else:
            _scatter(ax, trace, ticks)
    labels = {a.y: a.text for a in layout.annotations if a.yref == "y"}  # a reference line's
    for shape in layout.shapes:
        ax.axhline(shape.y0, color=shape.line.color, linestyle=DASHES.get(shape.line.dash, "-"),
                   linewidth=1.2, label=labels.get(shape.y0))  # fmt: skip
    for note in layout.annotations:
        if note.xref == "paper":  # a message in place of data
            ax.text(note.x, note.y, note.text, ha="center", transform=ax.transAxes)
    _axes(ax, layout, ticks)
    out.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _categories(fig: go.Figure) -> dict[str, int]:
    """Positions of the category labels of a categorical y axis, in order of appearance."""
    names: dict[str, int] = {}
    for trace in fig.data:
        if trace.type != "heatmap":
            for value in trace.y or ():
                if isinstance(value, str):
                    names.setdefault(value, len(names))
    return names


def _numbers(values: Any, ticks: dict[str, int]) -> list[float]:
    """Plotted coordinates: category labels at their positions, gaps (None) as NaN."""
    return [math.nan if v is None else ticks[v] if isinstance(v, str) else v for v in values]


def _scatter(ax: Axes, t: Any, ticks: dict[str, int]) -> None:
    x, y = _numbers(t.x, ticks), _numbers(t.y, ticks)
    label = None if t.showlegend is False else t.name
    mode, marker = t.mode or "markers", t.marker
    symbol = SYMBOLS.get(marker.symbol, "o")
    if "lines" not in mode:
        edge = marker.line.color if marker.line and marker.line.width else None
        ax.scatter(x, y, marker=symbol, s=(marker.size or 6) ** 2, color=marker.color,
                   alpha=marker.opacity, edgecolors=edge, label=label,
                   zorder=3 if symbol == "*" else 2)  # fmt: skip
        return
    style = {
        "color": t.line.color,
        "linestyle": DASHES.get(t.line.dash, "-"),
        "linewidth": 0.75 * (t.line.width or 2),
        "marker": symbol if "markers" in mode else None,
        "markersize": 0.6 * (marker.size or 6),
        "label": label,
    }
    if t.line.shape == "hv":
        ax.step(x, y, where="post", **style)
    else:
        ax.plot(x, y, **style)


def _bar(ax: Axes, t: Any, i: int, n: int, ticks: dict[str, int]) -> None:
    """One evaluator's horizontal bars, beside the other traces' in each category's slot."""
    height = 0.8 / n
    positions = [p + (i - (n - 1) / 2) * height for p in _numbers(t.y, ticks)]
    ax.barh(positions, list(t.x), height=height, label=t.name)


def _heatmap(fig: Figure, ax: Axes, t: Any) -> None:
    # row 0 at the bottom, as plotly draws it; a reversed y axis then puts it on top
    image = ax.imshow(t.z, cmap="Blues", vmin=t.zmin, vmax=t.zmax, aspect="auto", origin="lower")
    n = len(t.x)
    fontsize = 5 if n > 30 else 8
    ax.set_xticks(range(n), list(t.x), rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(t.y)), list(t.y), fontsize=fontsize)
    title = t.colorbar.title.text if t.colorbar and t.colorbar.title else None
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=title)


def _axes(ax: Axes, layout: Any, ticks: dict[str, int]) -> None:
    """Titles, scales, ranges, category labels and the legend, as the layout says."""
    ax.set_title(layout.title.text or "", fontsize=10)
    ax.set_xlabel(layout.xaxis.title.text or "")
    ax.set_ylabel(layout.yaxis.title.text or "")
    if layout.xaxis.type == "log":
        ax.set_xscale("log")
    if layout.xaxis.range:
        ax.set_xlim(*layout.xaxis.range)
    if ticks:
        size = layout.yaxis.tickfont.size
        ax.set_yticks(list(ticks.values()), list(ticks), fontsize=0.75 * size if size else None)
    elif layout.xaxis.dtick == 1 and ax.get_xscale() == "linear" and not ax.images:  # epochs
        ax.xaxis.get_major_locator().set_params(integer=True)
    if layout.yaxis.autorange == "reversed":
        ax.invert_yaxis()
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
