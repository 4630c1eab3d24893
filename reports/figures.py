"""The report's figures, each defined once as a plotly figure: index.html shows it, `reports.png`
draws its PNG from it, and optuna-dashboard stores the Pareto figures.

Optuna's own plots (`optuna.visualization`) draw one study's COMPLETE trials; these put the
pruned trials, the Pareto front and the full fine-tuning baseline beside them, which is the
comparison the study is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from objectives.record import TrialRecord
from reports.importance import ImportanceResult
from reports.perclass import ClassF1, Confusion, row_normalised
from reports.tables import (
    CostKey,
    best_record,
    best_so_far,
    cost_of,
    pareto_candidates,
    pareto_front,
)

COLORS = {
    "trial": "#6baed6",  # COMPLETE LoRA trials
    "front": "#d62728",
    "pruned": "#9e9e9e",
    "other": "#ff9f1c",  # running or failed
    "baseline": "#2ca02c",
    "lora_best": "#1f4e99",
}
COST_TITLES = {
    "trainable_params": "Trainable parameters (log scale)",
    "wait_time_s": "Training time, setup included (s)",
}
F1_TITLE = "Validation macro-F1"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def hover_text(record: TrialRecord) -> str:
    """Multi-line hover label: trial, metrics, costs and every parameter."""
    lines = [f"<b>{record.label}</b> ({record.state.lower()})"]
    for name, value in (
        ("val F1", record.val_f1),
        ("test F1", record.test_f1),
        ("trainable params", record.trainable_params),
        ("train time s", record.train_time_s),
        ("setup s", record.setup_time_s),
        ("epochs run", record.epochs_run),
    ):
        if value is not None:
            lines.append(f"{name}: {_fmt(value)}")
    lines.extend(f"{name}: {_fmt(value)}" for name, value in record.params.items())
    return "<br>".join(lines)


def _points(records: Sequence[TrialRecord], x: Sequence[Any], **trace: object) -> go.Scatter:
    """Each record's validation F1 against `x`, with its hover label."""
    return go.Scatter(
        x=list(x),
        y=[r.val_f1 for r in records],
        text=[hover_text(r) for r in records],
        hovertemplate="%{text}<extra></extra>",
        **trace,
    )


def _baseline_line(fig: go.Figure, baseline: TrialRecord | None) -> None:
    if baseline is None or baseline.val_f1 is None:
        return
    fig.add_hline(
        y=baseline.val_f1,
        line={"color": COLORS["baseline"], "dash": "dash", "width": 1.5},
        annotation_text=f"full FT baseline F1 {baseline.val_f1:.4f}",
        annotation_position="top left",
    )


def _figure(
    title: str, height: int | None, x_title: str, y_title: str | None = F1_TITLE, **layout: Any
) -> go.Figure:
    """An empty figure in the report's style, its title and axis titles set."""
    fig = go.Figure(layout={"title": title, "template": "plotly_white", "height": height, **layout})
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title=y_title)
    return fig


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


# How each group of trials on a Pareto figure is drawn, in drawing order.
PARETO_STYLES = {
    "pruned": {
        "mode": "markers",
        "name": "pruned (best F1 before stopping)",
        "marker": {"symbol": "x", "color": COLORS["pruned"], "size": 7, "opacity": 0.7},
    },
    "lora": {
        "mode": "markers",
        "name": "LoRA trials",
        "marker": {"color": COLORS["trial"], "size": 9, "opacity": 0.85},
    },
    "front": {
        "mode": "lines+markers",
        "name": "Pareto front",
        "line": {"color": COLORS["front"], "shape": "hv", "width": 2},
        "marker": {
            "color": COLORS["front"],
            "size": 11,
            "symbol": "diamond",
            "line": {"color": "white", "width": 1},
        },
    },
    "baseline": {
        "mode": "markers",
        "name": "full fine-tuning baseline",
        "marker": {
            "color": COLORS["baseline"],
            "size": 18,
            "symbol": "star",
            "line": {"color": "black", "width": 1},
        },
    },
}


def pareto_figure_from_records(records: Sequence[TrialRecord], cost: CostKey) -> go.Figure:
    """F1 against `cost` for every trial with both values, the front highlighted as a staircase,
    the baseline as a star with a horizontal line at its F1. Always a figure: the dashboard
    stores it unchecked, so without data it carries a note."""
    front = pareto_front(records, cost)
    on_front = {(r.study, r.number) for r in front}
    candidates = pareto_candidates(records, cost)
    groups = {
        "pruned": [  # at the best F1 they reached before they were stopped
            r
            for r in records
            if r.state == "PRUNED"
            and not r.baseline
            and r.val_f1 is not None
            and cost_of(r, cost) is not None
        ],
        "lora": [r for r in candidates if not r.baseline and (r.study, r.number) not in on_front],
        "front": front,
        "baseline": [r for r in candidates if r.baseline],
    }
    title = "Pareto front: validation F1 against " + (
        "trainable parameters" if cost == "trainable_params" else "training time"
    )
    fig = _figure(title, 520, COST_TITLES[cost])
    if cost == "trainable_params":
        # Parameter counts span LoRA (~1e5) to full fine-tuning (~1e8); "D2" keeps the minor
        # labels of a log axis to 2 and 5.
        fig.update_xaxes(type="log", dtick="D2")
    if not candidates and not groups["pruned"]:
        return _empty(fig, f"No COMPLETE trial with a validation F1 and {cost} yet.")
    for name, group in groups.items():
        if group:
            fig.add_trace(_points(group, [cost_of(r, cost) for r in group], **PARETO_STYLES[name]))
    _baseline_line(fig, best_record(records, baseline=True))
    return fig


def importance_figure(result: ImportanceResult) -> go.Figure:
    """Horizontal grouped bars, one colour per evaluator, parameters in the first one's order."""
    order: list[str] = []
    for row in result.rows:
        if row.param not in order:
            order.append(row.param)
    fig = _figure(
        f"Parameter importance for validation F1 ({result.n_trials} COMPLETE trials)",
        max(320, 90 + 60 * len(order)),
        "Share of importance (normalised per evaluator)",
        y_title=None,
        barmode="group",
    )
    evaluators = list(dict.fromkeys(row.evaluator for row in result.rows))
    for evaluator in evaluators:
        scores = {r.param: r.importance for r in result.rows if r.evaluator == evaluator}
        fig.add_trace(
            go.Bar(
                y=order,
                x=[scores.get(p, 0.0) for p in order],
                orientation="h",
                name=evaluator,
                hovertemplate="%{y}: %{x:.3f}<extra>" + evaluator + "</extra>",
            )
        )
    fig.update_yaxes(autorange="reversed")
    return fig


def history_figure(records: Sequence[TrialRecord]) -> go.Figure:
    """Validation F1 per trial number, the running best, pruned trials and the baseline line."""
    fig = _figure("Optimisation history", 460, "Trial number")
    lora = [r for r in records if not r.baseline and r.val_f1 is not None]
    complete = [r for r in lora if r.complete]
    unfinished = [r for r in lora if not r.complete]
    for group, name, marker in (
        (
            unfinished,
            "pruned / unfinished (best F1 reached)",
            {"symbol": "x", "color": COLORS["pruned"], "size": 7},
        ),
        (complete, "COMPLETE trials", {"color": COLORS["trial"], "size": 9}),
    ):
        if group:
            x = [r.number for r in group]
            fig.add_trace(_points(group, x, mode="markers", name=name, marker=marker))
    running = best_so_far(records)
    if running:
        fig.add_trace(
            go.Scatter(
                x=[n for n, _ in running],
                y=[v for _, v in running],
                mode="lines",
                name="best so far",
                line={"color": COLORS["front"], "shape": "hv"},
            )
        )
    _baseline_line(fig, best_record(records, baseline=True))
    return fig


def intermediate_figure(records: Sequence[TrialRecord]) -> go.Figure:
    """Validation F1 after each epoch, one line per trial; pruned trials stop where pruned."""
    fig = _figure("Validation F1 per epoch (intermediate values)", 500, "Epoch")
    fig.update_xaxes(dtick=1)
    styles = {
        "COMPLETE": ("COMPLETE", {"color": COLORS["trial"], "width": 1.5}),
        "PRUNED": ("PRUNED", {"color": COLORS["pruned"], "width": 1.2, "dash": "dot"}),
    }
    shown: set[str] = set()
    for r in records:
        if not r.intermediate:
            continue
        if r.baseline:
            group, line = "full FT baseline", {"color": COLORS["baseline"], "width": 3}
        else:
            group, line = styles.get(
                r.state, (r.state, {"color": COLORS["other"], "width": 1.2, "dash": "dash"})
            )
        fig.add_trace(
            go.Scatter(
                x=list(r.intermediate),
                y=list(r.intermediate.values()),
                mode="lines+markers",
                marker={"size": 4},
                line=line,
                name=group,
                legendgroup=group,
                showlegend=group not in shown,
                hovertemplate=f"{r.label} ({r.state.lower()})<br>epoch %{{x}}: F1 %{{y:.4f}}"
                "<extra></extra>",
            )
        )
        shown.add(group)
    return fig


def per_class_figure(
    rows: Sequence[ClassF1], lora: TrialRecord, baseline: TrialRecord
) -> go.Figure:
    """Dumbbell chart of test F1 per class, LoRA's largest deficit against the baseline on top."""
    labels = [r.label for r in rows]
    fig = _figure(
        f"Per-class test F1: best LoRA ({lora.label}) vs baseline ({baseline.label}),"
        " sorted by difference",
        max(400, 150 + 16 * len(rows)),
        "Test F1 of the class",
        y_title=None,
        hovermode="y unified",
    )
    segments_x: list[float | None] = []
    segments_y: list[str | None] = []
    for r in rows:
        segments_x += [r.baseline_f1, r.lora_f1, None]
        segments_y += [r.label, r.label, None]
    fig.add_trace(
        go.Scatter(
            x=segments_x,
            y=segments_y,
            mode="lines",
            line={"color": "#cccccc", "width": 2},
            showlegend=False,
            hoverinfo="skip",
        )
    )
    for name, values, color, hover in (
        ("full FT baseline", [r.baseline_f1 for r in rows], "baseline", "baseline %{x:.3f}"),
        (
            "best LoRA",
            [r.lora_f1 for r in rows],
            "lora_best",
            "LoRA %{x:.3f} (diff %{customdata:+.3f})",
        ),
    ):
        fig.add_trace(
            go.Scatter(
                x=values,
                y=labels,
                mode="markers",
                name=name,
                marker={"color": COLORS[color], "size": 8},
                customdata=[r.difference for r in rows],
                hovertemplate=hover + "<extra></extra>",
            )
        )
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(autorange="reversed", tickfont={"size": 9}, dtick=1)
    return fig


def confusion_figure(confusion: Confusion, title: str) -> go.Figure:
    """Heatmap of the row-normalised test confusion matrix (counts in the hover)."""
    n = len(confusion.labels)
    size = max(450, min(1100, 200 + 11 * n))
    fig = _figure(title, size, "Predicted label", "True label", width=size + 150)
    fig.add_trace(
        go.Heatmap(
            z=row_normalised(confusion.counts),
            x=confusion.labels,
            y=confusion.labels,
            customdata=confusion.counts,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "share of row"},
            hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata} (%{z:.1%})<extra></extra>",
        )
    )
    tick_font = {"size": 7 if n > 30 else 10}
    fig.update_xaxes(tickfont=tick_font, dtick=1)
    fig.update_yaxes(autorange="reversed", tickfont=tick_font, dtick=1)
    return fig
