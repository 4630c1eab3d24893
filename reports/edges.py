"""Is the search space big enough? A best trial at the edge of a range has not found the optimum.

When the best COMPLETE trial, or most of the top five, took a value in the outer tenth of a
numeric parameter's range (on the log scale for log parameters), the sampler was pressing
against the bound and the optimum may lie beyond it. `space_edges` finds those parameters and
`widened_space` writes the `--space` file that would move each such bound out; categorical
parameters have no edge and are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from objectives.record import TrialRecord, ranked
from objectives.space import ParamSpec, Space, SpaceError, parse_param

EDGE_SHARE = 0.10  # the outer tenth of a range counts as "at the edge"
TOP_N = 5  # "most of the top five": more than half of them
WIDEN_SHARE = 0.5  # a bound that was hit moves out by half the range (log scale for log params)


@dataclass(frozen=True)
class SpaceEdge:
    """A numeric parameter whose best trials sit at one end of its range."""

    param: str
    side: str  # "low" or "high"
    bound: float  # the bound they press against
    best_value: float  # the best trial's value
    best_at_edge: bool
    top_at_edge: int  # how many of the `top` best trials lie in the outer tenth on this side
    top: int  # how many COMPLETE trials were looked at (at most TOP_N)


def _position(spec: ParamSpec, value: float) -> float:
    """Where `value` lies in the range: 0 at the low bound, 1 at the high bound."""
    scale = math.log if spec.log else float
    low, high = scale(spec.low), scale(spec.high)
    return 0.5 if high == low else (scale(value) - low) / (high - low)


def space_edges(records: Iterable[TrialRecord], space: Space) -> list[SpaceEdge]:
    """The numeric parameters of `space` whose best LoRA trial, or more than half of the
    `TOP_N` best, lie in the outer `EDGE_SHARE` of the range; baseline trials are not looked at."""
    best = ranked(r for r in records if not r.baseline)[:TOP_N]
    edges = []
    for spec in space.params:
        if spec.choices is not None or not best or spec.name not in best[0].params:
            continue
        positions = [_position(spec, r.params[spec.name]) for r in best if spec.name in r.params]
        for side, bound, at_edge in (
            ("low", spec.low, lambda p: p <= EDGE_SHARE),
            ("high", spec.high, lambda p: p >= 1 - EDGE_SHARE),
        ):
            count = sum(1 for p in positions if at_edge(p))
            best_at_edge = at_edge(positions[0])
            if best_at_edge or count > len(positions) / 2:
                edges.append(
                    SpaceEdge(
                        param=spec.name,
                        side=side,
                        bound=float(bound),
                        best_value=float(best[0].params[spec.name]),
                        best_at_edge=best_at_edge,
                        top_at_edge=count,
                        top=len(positions),
                    )
                )
    return edges


def _widened(spec: ParamSpec, side: str) -> ParamSpec | None:
    """`spec` with its `side` bound moved out by WIDEN_SHARE of the range, kept within what the
    parameter allows (a learning rate stays below 1, a rank at least 1); None if it cannot move."""
    step = WIDEN_SHARE
    for _ in range(8):  # halve the move until the bound is one the parameter allows
        low, high = spec.low, spec.high
        if spec.log:
            factor = (high / low) ** step
            low, high = (low / factor, high) if side == "low" else (low, high * factor)
        else:
            width = (high - low) * step
            low, high = (low - width, high) if side == "low" else (low, high + width)
        if isinstance(spec.low, int):  # an integer parameter (the rank) gets integer bounds
            low, high = math.floor(low), math.ceil(high)
        try:
            widened = parse_param(
                spec.name, {"low": _round(low), "high": _round(high), "log": spec.log}
            )
        except SpaceError:
            widened = None
        if widened is not None and (widened.low, widened.high) != (spec.low, spec.high):
            return widened
        step /= 2
    return None


def _round(value: float) -> float | int:
    """Three significant digits: a bound a person would type."""
    if isinstance(value, int) or value == 0:
        return value
    return float(f"{value:.3g}")


def widened_space(space: Space, edges: Iterable[SpaceEdge]) -> list[str]:
    """The lines of the TOML `--space` file that moves every bound in `edges` outwards, one
    inline table per parameter (none where no bound can move)."""
    moved: dict[str, ParamSpec] = {}
    for edge in edges:
        spec = moved.get(edge.param) or next(p for p in space.params if p.name == edge.param)
        if (wider := _widened(spec, edge.side)) is not None:
            moved[edge.param] = wider
    log = ", log = true"
    return [
        f"{s.name} = {{ low = {s.low!r}, high = {s.high!r}{log if s.log else ''} }}"
        for s in moved.values()
    ]


def edge_lines(edges: list[SpaceEdge]) -> list[str]:
    """One sentence per edge."""
    lines = []
    for e in edges:
        who = []
        if e.best_at_edge:
            who.append(f"the best trial ({e.param} = {e.best_value:.3g})")
        if e.top_at_edge > e.top / 2:
            who.append(f"{e.top_at_edge} of the top {e.top}")
        verb = "lie" if e.top_at_edge > e.top / 2 else "lies"
        lines.append(
            f"{e.param}: {' and '.join(who)} {verb} in the outer tenth of its range, near its "
            f"{e.side} bound {e.bound:.3g}; the optimum may lie beyond it."
        )
    return lines


def space_check_lines(records: Iterable[TrialRecord], space: Space) -> list[str]:
    """The answer to "is the search space big enough?" for the report, the dashboard note and
    the terminal: no LoRA trial yet, no edge, or each edge and the file that widens it."""
    records = list(records)
    if not ranked(r for r in records if not r.baseline):
        return ["Not judged: no COMPLETE LoRA trial yet."]
    edges = space_edges(records, space)
    numeric = ", ".join(p.name for p in space.params if p.choices is None)
    if not edges:
        return [
            f"Yes, as far as the trials show: neither the best trial nor most of the top "
            f"{TOP_N} lie in the outer tenth of the range of {numeric}."
        ]
    lines = edge_lines(edges)
    wider = widened_space(space, edges)
    if wider:
        lines.append(
            "To look beyond it, start a new study (a study keeps its space) with "
            "--space FILE.toml, the file holding:"
        )
        lines += [f"`{line}`" for line in wider]
    return lines
