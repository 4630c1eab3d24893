"""Static PNG versions of the report figures, drawn with matplotlib.

Figures are built with `matplotlib.figure.Figure` and saved through its Agg canvas, never through
`pyplot`: no global backend is switched and no figure is left open, so reports can be written
from a headless worker or a test without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from objectives.record import TrialRecord
from reports.figures import COLORS, COST_TITLES, F1_TITLE
from reports.importance import ImportanceResult
from reports.perclass import ClassF1, Confusion, row_normalised
from reports.tables import (
    CostKey,
    best_record,
    best_so_far,
    check_cost,
    cost_of,
    pareto_candidates,
    pareto_front,
)

DPI = 120


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _baseline_line(ax: Axes, records: Sequence[TrialRecord]) -> None:
    base = best_record(records, baseline=True)
    if base is not None and base.val_f1 is not None:
        ax.axhline(
            base.val_f1,
            color=COLORS["baseline"],
            linestyle="--",
            linewidth=1.2,
            label=f"baseline F1 {base.val_f1:.4f}",
        )


def pareto_png(records: Sequence[TrialRecord], cost: CostKey) -> Figure:
    """Same content as `figures.pareto_figure_from_records`, for README and offline viewing."""
    cost = check_cost(cost)
    front = pareto_front(records, cost)
    on_front = {(r.study, r.number) for r in front}
    candidates = pareto_candidates(records, cost)
    fig = Figure(figsize=(8, 5.2))
    ax = fig.add_subplot()
    pruned = [
        r
        for r in records
        if not r.baseline
        and r.state == "PRUNED"
        and r.val_f1 is not None
        and cost_of(r, cost) is not None
    ]
    if pruned:
        ax.scatter(
            [cost_of(r, cost) for r in pruned],
            [r.val_f1 for r in pruned],
            marker="x",
            color=COLORS["pruned"],
            label="pruned (best F1 before stopping)",
        )
    lora = [r for r in candidates if not r.baseline and (r.study, r.number) not in on_front]
    if lora:
        ax.scatter(
            [cost_of(r, cost) for r in lora],
            [r.val_f1 for r in lora],
            color=COLORS["trial"],
            label="LoRA trials",
        )
    if front:
        ax.step(
            [cost_of(r, cost) for r in front],
            [r.val_f1 for r in front],
            where="post",
            color=COLORS["front"],
            marker="D",
            label="Pareto front",
        )
    base = [r for r in candidates if r.baseline]
    if base:
        ax.scatter(
            [cost_of(r, cost) for r in base],
            [r.val_f1 for r in base],
            marker="*",
            s=260,
            color=COLORS["baseline"],
            edgecolor="black",
            zorder=5,
            label="full fine-tuning baseline",
        )
    _baseline_line(ax, records)
    if cost == "trainable_params" and candidates + pruned:
        ax.set_xscale("log")
    ax.set_xlabel(COST_TITLES[cost])
    ax.set_ylabel(F1_TITLE)
    what = "trainable parameters" if cost == "trainable_params" else "training time"
    ax.set_title(f"Validation F1 against {what}")
    if candidates or pruned:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no COMPLETE trial yet", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return fig


def importance_png(result: ImportanceResult) -> Figure:
    order = list(dict.fromkeys(r.param for r in result.rows))
    evaluators = list(dict.fromkeys(r.evaluator for r in result.rows))
    fig = Figure(figsize=(8, max(2.5, 0.9 + 0.5 * len(order))))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(evaluators))
    for i, evaluator in enumerate(evaluators):
        scores = {r.param: r.importance for r in result.rows if r.evaluator == evaluator}
        ax.barh(
            [j + i * height for j in range(len(order))],
            [scores.get(p, 0.0) for p in order],
            height=height,
            label=evaluator,
        )
    ax.set_yticks([j + height * (len(evaluators) - 1) / 2 for j in range(len(order))], order)
    ax.invert_yaxis()
    ax.set_xlabel("Share of importance (normalised per evaluator)")
    ax.set_title(f"Parameter importance for validation F1 ({result.n_trials} COMPLETE trials)")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def history_png(records: Sequence[TrialRecord]) -> Figure:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    lora = [r for r in records if not r.baseline and r.val_f1 is not None]
    unfinished = [r for r in lora if not r.complete]
    complete = [r for r in lora if r.complete]
    if unfinished:
        ax.scatter(
            [r.number for r in unfinished],
            [r.val_f1 for r in unfinished],
            marker="x",
            color=COLORS["pruned"],
            label="pruned / unfinished (best F1 reached)",
        )
    if complete:
        ax.scatter(
            [r.number for r in complete],
            [r.val_f1 for r in complete],
            color=COLORS["trial"],
            label="COMPLETE trials",
        )
    running = best_so_far(records)
    if running:
        ax.step(
            [n for n, _ in running],
            [v for _, v in running],
            where="post",
            color=COLORS["front"],
            label="best so far",
        )
    _baseline_line(ax, records)
    ax.set_xlabel("Trial number")
    ax.set_ylabel(F1_TITLE)
    ax.set_title("Optimisation history")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def intermediate_png(records: Sequence[TrialRecord]) -> Figure:
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    labelled: set[str] = set()
    for r in records:
        if not r.intermediate:
            continue
        if r.baseline:
            group, style = "full FT baseline", {"color": COLORS["baseline"], "linewidth": 2.5}
        elif r.state == "COMPLETE":
            group, style = "COMPLETE", {"color": COLORS["trial"], "linewidth": 1.2}
        elif r.state == "PRUNED":
            group, style = "PRUNED", {"color": COLORS["pruned"], "linestyle": ":"}
        else:
            group, style = r.state, {"color": COLORS["other"], "linestyle": "--"}
        ax.plot(
            list(r.intermediate),
            list(r.intermediate.values()),
            marker=".",
            label=None if group in labelled else group,
            **style,
        )
        labelled.add(group)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(F1_TITLE)
    ax.set_title("Validation F1 per epoch (intermediate values)")
    if labelled:
        ax.legend(fontsize=8, loc="lower right")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    return fig


def per_class_png(rows: Sequence[ClassF1], lora: TrialRecord, baseline: TrialRecord) -> Figure:
    n = len(rows)
    fig = Figure(figsize=(8, max(3.0, 1.2 + 0.17 * n)))
    ax = fig.add_subplot()
    ys = list(range(n))
    ax.hlines(
        ys,
        [r.baseline_f1 for r in rows],
        [r.lora_f1 for r in rows],
        color="#cccccc",
        linewidth=2,
    )
    ax.scatter([r.baseline_f1 for r in rows], ys, color=COLORS["baseline"], s=18, label="baseline")
    ax.scatter([r.lora_f1 for r in rows], ys, color=COLORS["lora_best"], s=18, label="best LoRA")
    ax.set_yticks(ys, [r.label for r in rows], fontsize=6 if n > 30 else 9)
    ax.set_ylim(n - 0.5, -0.5)  # largest LoRA deficit on top
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Test F1 of the class")
    ax.set_title(
        f"Per-class test F1: {lora.label} vs {baseline.label}, sorted by difference", fontsize=10
    )
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="x", alpha=0.3)
    return fig


def confusion_png(confusion: Confusion, title: str) -> Figure:
    n = len(confusion.labels)
    side = max(5.0, min(16.0, 2.5 + 0.16 * n))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(row_normalised(confusion.counts), cmap="Blues", vmin=0, vmax=1)
    fontsize = 5 if n > 30 else 8
    ax.set_xticks(range(n), confusion.labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), confusion.labels, fontsize=fontsize)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of row")
    return fig
