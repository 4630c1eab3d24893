"""`write_reports`: every report file for a LoRA study and its full fine-tuning baseline.

A study that is still running, has no COMPLETE trial, or too few trials for importance still
gets a full set of files, with notes saying what is missing and why. `write_tables` writes the
CSV tables alone, without plotly or matplotlib.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from objectives.record import TrialRecord, count_states
from objectives.space import stored_space
from reports.comparison import Comparison, compare, findings_lines, roles, timing_notes
from reports.confirm import (
    CONFIRM_COLUMNS,
    confirm_rows,
    confirmed_configs,
    verdict,
)
from reports.importance import ImportanceResult, param_importances
from reports.perclass import Confusion, compare_per_class, confusion_of, unmatched_labels
from reports.render import (
    IMPORTANCE_COLUMNS,
    Check,
    ReportContent,
    Section,
    importance_rows,
    report_html,
    report_markdown,
    write_csv,
)
from reports.sensitivity import baseline_seed_f1s
from reports.tables import (
    COST_KEYS,
    FRONT_AXES,
    FRONT_NAMES,
    CostKey,
    best_first,
    param_names,
    pareto_candidates,
    pareto_columns,
    pareto_front,
    pareto_rows,
    summary_columns,
    summary_row,
    summary_rows,
    trial_records,
)

FRONT_FILES: dict[CostKey, str] = {cost: f"pareto_{axis}" for cost, axis in FRONT_AXES.items()}
FRONT_TITLES = {cost: f"Pareto front: {name}" for cost, name in FRONT_NAMES.items()}


def _states_text(trials: Sequence[FrozenTrial]) -> str:
    """`3 COMPLETE, 1 PRUNED`, states in alphabetical order."""
    return ", ".join(f"{n} {state}" for state, n in sorted(count_states(trials).items())) or "none"


def _study_notes(
    study: optuna.Study,
    baseline: optuna.Study | None,
    records: Sequence[TrialRecord],
) -> list[str]:
    notes = []
    lora = [r for r in records if not r.baseline]
    unfinished = [r for r in records if r.state in ("RUNNING", "WAITING")]
    if unfinished:
        notes.append(
            f"Snapshot of a study still in progress: {len(unfinished)} trial(s) RUNNING or "
            "WAITING are listed in the summary but enter no front, importance or saving."
        )
    if not any(r.complete for r in lora):
        notes.append(
            f"The LoRA study '{study.study_name}' has no COMPLETE trial yet: no Pareto front, "
            "importance or best LoRA setting can be given."
        )
    if baseline is None:
        notes.append(
            "No baseline study was given: the fronts and findings have no full fine-tuning point."
        )
    elif not any(r.complete for r in records if r.baseline):
        notes.append(
            f"The baseline study '{baseline.study_name}' has no COMPLETE trial: nothing to "
            "compare the LoRA trials with."
        )
    failed = [r for r in records if r.state == "FAIL"]
    if failed:
        reasons = sorted({r.fail_reason for r in failed if r.fail_reason})
        why = f" Reasons: {'; '.join(reasons[:5])}." if reasons else ""
        notes.append(f"{len(failed)} trial(s) FAILED and are left out of every statistic.{why}")
    return notes


def _section(title: str, png: str, ready: bool, note: str, draw: Callable[[], Any]) -> Section:
    """A figure's section: drawn when there is something to show, else a note saying why not."""
    if not ready:
        return Section(title, png, None, note=f"Not drawn: {note}")
    return Section(title, png, draw())


def _overview_sections(
    records: Sequence[TrialRecord], importance: ImportanceResult
) -> list[Section]:
    """Both Pareto fronts, importance, history and per-epoch curves."""
    from reports import figures

    fronts = [
        _section(
            FRONT_TITLES[cost],
            f"{FRONT_FILES[cost]}.png",
            bool(pareto_candidates(records, cost)),
            f"no COMPLETE trial with a validation F1 and {cost}.",
            lambda cost=cost: figures.pareto_figure_from_records(records, cost),
        )
        for cost in COST_KEYS
    ]
    return [
        *fronts,
        _section(
            "Parameter importance",
            "importance.png",
            bool(importance.rows),
            " ".join(importance.notes),
            lambda: figures.importance_figure(importance),
        ),
        _section(
            "Optimisation history",
            "history.png",
            any(r.val_f1 is not None for r in records if not r.baseline),
            "no LoRA trial has reported a validation F1 yet.",
            lambda: figures.history_figure(records),
        ),
        _section(
            "Intermediate values (validation F1 per epoch)",
            "intermediate.png",
            any(r.intermediate for r in records),
            "no trial has reported an intermediate value yet.",
            lambda: figures.intermediate_figure(records),
        ),
    ]


def _per_class_sections(
    comparison: Comparison, trials: dict[tuple[str, int], FrozenTrial], notes: list[str]
) -> list[Section]:
    """Per-class F1 and the two confusion matrices, or notes saying why they are missing."""
    from reports import figures

    lora, base = comparison.best_lora, comparison.baseline
    lora_cm, base_cm = (
        confusion_of(trials.get((r.study, r.number))) if r is not None else None
        for r in (lora, base)
    )
    missing = [
        who
        for who, record, cm in (("best LoRA trial", lora, lora_cm), ("baseline", base, base_cm))
        if record is None or cm is None
    ]
    if not missing and unmatched_labels(lora_cm, base_cm):
        notes.append(
            "The best LoRA trial and the baseline have different label sets; only the "
            f"{len(compare_per_class(lora_cm, base_cm))} shared labels are compared per class."
        )
    who = " and the ".join(missing)
    why = f"no labels/test_confusion attributes (or no COMPLETE run) for the {who}"
    sections = [
        _section(
            "Per-class test F1: best LoRA vs baseline",
            "per_class_f1.png",
            not missing,
            f"{why}.",
            lambda: figures.per_class_figure(compare_per_class(lora_cm, base_cm), lora, base),
        )
    ]

    def confusion(record: TrialRecord | None, cm: Confusion | None, who: str, png: str) -> Section:
        title = f"Test confusion matrix: {who}" + (f" ({record.label})" if record else "")
        return _section(
            title,
            png,
            record is not None and cm is not None,
            f"no test_confusion attribute on a COMPLETE {who} trial.",
            lambda: figures.confusion_figure(cm, title),
        )

    return [
        *sections,
        confusion(lora, lora_cm, "best LoRA", "confusion_lora.png"),
        confusion(base, base_cm, "baseline", "confusion_baseline.png"),
    ]


CONFIRM_METHOD = (
    "Method: each configuration was trained again with the seeds shown; intervals are 95% t "
    "intervals of the mean over seeds; the best LoRA configuration (highest mean validation F1) "
    "is compared with the baseline by Welch's t interval for the difference of mean test "
    "macro-F1. Seeds cover training noise on fixed splits, not test-set sampling noise."
)


def write_tables(
    out: Path, records: Sequence[TrialRecord], fronts: dict[CostKey, list[TrialRecord]]
) -> tuple[list[Path], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """summary.csv and the two front CSVs; the fronts' tables for the pages."""
    names = param_names(records)
    written = [write_csv(out / "summary.csv", summary_columns(records), summary_rows(records))]
    pareto_tables = {}
    for cost, front in fronts.items():
        columns, rows = pareto_columns(names), pareto_rows(front, names)
        written.append(write_csv(out / f"{FRONT_FILES[cost]}.csv", columns, rows))
        pareto_tables[FRONT_TITLES[cost]] = (columns, rows)
    return written, pareto_tables


def _write_pngs(out: Path, sections: Sequence[Section]) -> list[Path]:
    """The drawn figures' PNGs. The PNG of a figure not drawn this time is removed, so that a
    re-run into the same folder never leaves, say, an older confusion matrix beside new files."""
    from reports import png

    for s in sections:
        if s.figure is None:
            (out / s.png).unlink(missing_ok=True)
    return [png.save(s.figure, out / s.png) for s in sections if s.figure is not None]


def study_records(study: optuna.Study, baseline: optuna.Study | None) -> list[TrialRecord]:
    """The records of the LoRA study's trials, then its baseline's."""
    base = baseline.get_trials(deepcopy=False) if baseline is not None else []
    name = baseline.study_name if baseline is not None else ""
    return trial_records(study.get_trials(deepcopy=False), study.study_name, base, name)


def _write_checks(
    out: Path, comparison: Comparison, confirm: optuna.Study | None, confirm_trials: list
) -> tuple[list[Check], list[Path]]:
    """The comparison's checks and, with a confirm study, the seed repeats; test_noise.csv and
    confirm.csv (removed when there is no confirm study)."""
    checks = list(comparison.checks)
    noise = next(c for c in checks if c.anchor == "test-noise")
    written = [write_csv(out / "test_noise.csv", noise.columns, noise.rows)]
    if confirm is None:
        (out / "confirm.csv").unlink(missing_ok=True)
        return checks, written
    configs = confirmed_configs(confirm_trials)
    rows = confirm_rows(configs)
    lines = [verdict(configs).text, CONFIRM_METHOD]
    title = f"Confirmation: seed repeats ({confirm.study_name})"
    checks.append(Check(title, "confirmation", lines, list(CONFIRM_COLUMNS), rows))
    written.append(write_csv(out / "confirm.csv", CONFIRM_COLUMNS, rows))
    return checks, written


def _intro(study: optuna.Study, baseline: optuna.Study | None) -> str:
    baseline_text = (
        f" and its baseline '{baseline.study_name}' ({_states_text(baseline.get_trials())})"
        if baseline is not None
        else " (no baseline study)"
    )
    return (
        f"LoRA study '{study.study_name}' ({_states_text(study.get_trials())}){baseline_text}. "
        "Objective: validation macro-F1, maximised; test F1 is reported, never used to choose."
    )


def write_reports(
    study: optuna.Study,
    baseline: optuna.Study | None,
    out_dir: Path | str,
    confirm: optuna.Study | None = None,
) -> list[Path]:
    """Every report file for `study` and its `baseline` (if any) into `out_dir`, created if
    needed; with the `confirm` study also confirm.csv and its section. The paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = study_records(study, baseline)
    fronts = {cost: pareto_front(records, cost) for cost in COST_KEYS}
    importance = param_importances(study.get_trials(deepcopy=False))
    confirm_trials = confirm.get_trials(deepcopy=False) if confirm is not None else []
    comparison = compare(
        records,
        importance.top(),
        fronts,
        study_name=study.study_name,
        seed_f1s=baseline_seed_f1s(confirm_trials),
        test_noise=True,
        space=stored_space(study.user_attrs.get("space")),
    )
    notes = [*_study_notes(study, baseline, records), *importance.notes]
    written, pareto_tables = write_tables(out, records, fronts)
    rows = importance_rows(importance)
    written.append(write_csv(out / "importance.csv", IMPORTANCE_COLUMNS, rows))
    checks, check_files = _write_checks(out, comparison, confirm, confirm_trials)
    written.extend(check_files)
    notes.extend(timing_notes(records, comparison))
    sections = _overview_sections(records, importance)
    trials = {(s.study_name, t.number): t for s in (study, baseline) if s for t in s.get_trials()}
    sections += _per_class_sections(comparison, trials, notes)
    written.extend(_write_pngs(out, sections))
    names = param_names(records)
    content = ReportContent(
        title=f"Report: {study.study_name}",
        intro=_intro(study, baseline),
        notes=notes,
        summary_columns=["role", *summary_columns(records)],
        summary_rows=[
            {"role": roles(r, comparison.best_lora, comparison.fronts), **summary_row(r, names)}
            for r in best_first(records)
        ],
        pareto=pareto_tables,
        importance=importance,
        findings=findings_lines(comparison),
        sections=sections,
        checks=checks,
    )
    for name, page in (("index.html", report_html), ("REPORT.md", report_markdown)):
        (out / name).write_text(page(content), encoding="utf-8")
        written.append(out / name)
    return written
