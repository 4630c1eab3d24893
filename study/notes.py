"""What `optimize` shows in optuna-dashboard: a study note and two Pareto figures, kept current.

`DashboardNotes`, an Optuna callback, rewrites both after every finished trial: a few reads and
a few dozen small writes, negligible beside a trial that trains a model. The builders are pure
functions of trials. plotly and optuna-dashboard are imported where they are used: training
runs where they are not installed (a GPU machine, say), and then has no note or plots.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from objectives.record import TrialRecord, count_states, ranked
from objectives.space import Space, stored_space
from reports.comparison import compare, note_lines
from reports.sensitivity import baseline_seed_f1s
from reports.tables import CostKey, trial_records
from study.config import CONFIRM_SUFFIX

# The note shares the terminal table's row format, so the terminal and the dashboard agree.
from study.terminal import TOP, TRIAL_COLUMNS, trial_row

if TYPE_CHECKING:
    import plotly.graph_objects as go

DASHBOARD_PACKAGES = ("optuna_dashboard", "plotly")


def missing_package(names: Sequence[str]) -> str | None:
    """The first of the packages `names` that is not installed (as pip names it), or None."""
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or half-imported module
            found = False
        if not found:
            return name.replace("_", "-")
    return None


def dashboard_missing() -> str | None:
    """The first package the dashboard note and plots need that is not installed, or None."""
    return missing_package(DASHBOARD_PACKAGES)


# Fixed custom-plot ids: saving under the same id replaces the figure instead of adding one.
FIGURE_IDS: dict[CostKey, str] = {
    "trainable_params": "pareto-f1-vs-trainable-params",
    "wait_time_s": "pareto-f1-vs-train-time",
}
OBJECTIVE_TEXT = (
    "**val_macro_f1**: validation macro-F1, maximised; a trial's value is its best epoch. "
    "Test F1 is measured at that epoch and never used to choose."
)


def _table(rows: Sequence[tuple[str, TrialRecord]]) -> list[str]:
    head = ("trial", *TRIAL_COLUMNS)
    # Numbers align right so digits line up; the three text columns stay left.
    align = ["---" if c in ("trial", "mode", "scheduler") else "---:" for c in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join([label, *trial_row(r)]) + " |" for label, r in rows]
    return lines


STATE_WORDS = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def _states_sentence(trials: Sequence[FrozenTrial]) -> str:
    """`4 trials (3 complete, 1 pruned, 0 failed)`: finished states always (a 0 is news too),
    running and waiting only when present."""
    counts = count_states(trials)
    shown = [
        f"{counts[s]} {word}"
        for s, word in STATE_WORDS.items()
        if counts[s] or TrialState[s].is_finished()
    ]
    return f"{len(trials)} trial{'' if len(trials) == 1 else 's'} ({', '.join(shown)})"


PLOTS_TEXT = [
    "",
    "### Custom plots (on the study's main page)",
    "",
    "Validation F1 against trainable parameters (log scale) and against training time (setup"
    " included): every"
    " COMPLETE trial, the Pareto front (best F1 for its cost) highlighted, pruned trials as"
    " crosses at the best F1 they reached, and the baseline as a star with a dashed line at"
    " its F1.",
    "",
    "_Written by `python -m study optimize` after every trial; edits made here are"
    " overwritten. Use trial notes for your own remarks._",
]


def study_note(
    study_name: str,
    lora: Sequence[FrozenTrial],
    baseline: Sequence[FrozenTrial],
    baseline_name: str,
    confirm: Sequence[FrozenTrial] = (),
    space: Space | None = None,
) -> str:
    """The Markdown note of the LoRA study: best LoRA trial vs the baseline, the comparison's
    checks (`confirm`'s trials give the baseline's seed noise; the study's `space` whether the
    best trials press against a bound), then the top trials."""
    records = trial_records(lora, study_name, baseline, baseline_name)
    c = compare(records, study_name=study_name, seed_f1s=baseline_seed_f1s(confirm), space=space)
    best, base = c.best_lora, c.baseline
    lines = [
        f"## LoRA vs full fine-tuning: `{study_name}`",
        "",
        f"Objective {OBJECTIVE_TEXT}",
        "",
        f"LoRA study: {_states_sentence(lora)}. "
        f"Baseline study `{baseline_name}`: {_states_sentence(baseline)}.",
        "",
        "### Best LoRA trial and the baseline",
        "",
    ]
    rows = [(f"#{best.number}", best)] if best is not None else []
    rows += [(f"baseline #{base.number}", base)] if base is not None else []
    if rows:
        lines += [*_table(rows), ""]
    if best is None:
        lines.append("No COMPLETE LoRA trial yet; this note is refreshed after every trial.")
    if base is None:
        running = any(t.state == TrialState.RUNNING for t in baseline)
        lines.append(
            "The baseline is running." if running else "No COMPLETE baseline run in this storage."
        )
    if best is not None and base is not None:
        lines += [f"Best LoRA trial #{best.number} against the full fine-tuning baseline:", ""]
        lines += note_lines(c)
    for check in c.checks:
        lines += ["", f"### {check.title}", "", *(f"- {line}" for line in check.lines)]
    top_lora = ranked(r for r in records if not r.baseline)[:TOP]
    if len(top_lora) > 1:
        lines += ["", f"### Top {len(top_lora)} LoRA trials by validation F1", ""]
        lines += _table([(f"#{r.number}", r) for r in top_lora])
    return "\n".join([*lines, *PLOTS_TEXT]) + "\n"


def baseline_note(study_name: str) -> str:
    """The baseline study's note: what it is and where the comparison lives."""
    return (
        f"## Full fine-tuning baseline of `{study_name}`\n\n"
        "One fixed full fine-tuning run (not tuned: the reference settings), the yardstick for"
        " every LoRA trial. The comparison with the best LoRA trial and the Pareto plots are on"
        f" the study `{study_name}`.\n\nObjective {OBJECTIVE_TEXT}\n"
    )


def dashboard_figures(
    lora: Sequence[FrozenTrial],
    baseline: Sequence[FrozenTrial],
    study_name: str,
    baseline_name: str,
) -> dict[str, go.Figure]:
    """The Pareto figures by custom-plot id, sized for the dashboard's plot cards."""
    from reports.figures import pareto_figure_from_records

    records = trial_records(lora, study_name, baseline, baseline_name)
    figures = {}
    for cost, figure_id in FIGURE_IDS.items():
        fig = pareto_figure_from_records(records, cost)
        # The report's fixed height overflows the dashboard's 450 px card; let plotly fit it.
        fig.update_layout(height=None, autosize=True)
        figures[figure_id] = fig
    return figures


class DashboardNotes:
    """Optuna callback: rewrite the LoRA study's note and Pareto plots after every trial
    (`refresh` once before the first). The baseline is looked up by name on each refresh, so a
    worker needs only the storage. A failed refresh is reported on stderr and never stops the
    study: the dashboard view is a convenience, the trials are the product.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, baseline_name: str) -> None:
        self.storage = storage
        self.baseline_name = baseline_name

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.refresh(study)

    def refresh(self, study: optuna.Study) -> None:
        from study.studies import study_or_none

        try:
            confirm = study_or_none(self.storage, study.study_name + CONFIRM_SUFFIX)
            baseline = study_or_none(self.storage, self.baseline_name)
            publish(study, baseline, self.baseline_name, confirm)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            print(f"warning: could not update the dashboard note: {e}", file=sys.stderr)


def publish(
    study: optuna.Study,
    baseline: optuna.Study | None,
    baseline_name: str,
    confirm: optuna.Study | None = None,
) -> None:
    """Write the note and the figures of `study` (and the baseline's note) to storage;
    `confirm`, the study of seed repeats, gives the baseline's training noise."""
    from optuna_dashboard import get_note, save_note, save_plotly_graph_object

    lora_trials = study.get_trials(deepcopy=False)
    base_trials = baseline.get_trials(deepcopy=False) if baseline is not None else []
    confirm_trials = confirm.get_trials(deepcopy=False) if confirm is not None else []
    note = study_note(
        study.study_name,
        lora_trials,
        base_trials,
        baseline_name,
        confirm=confirm_trials,
        space=stored_space(study.user_attrs.get("space")),
    )
    save_note(study, note)
    figures = dashboard_figures(lora_trials, base_trials, study.study_name, baseline_name)
    for figure_id, fig in figures.items():
        save_plotly_graph_object(study, fig, graph_object_id=figure_id)
    if baseline is None:
        return
    base_text = baseline_note(study.study_name)
    if get_note(baseline) != base_text:  # static: written once, not after every trial
        save_note(baseline, base_text)
