"""`write_reports`: every report file for a LoRA study and its full fine-tuning baseline.

Reads the trials once, computes the tables (`reports.tables`, `reports.importance`,
`reports.perclass`), then writes CSV, PNG, REPORT.md and index.html into one folder. A study
that is still running, has no COMPLETE trial, or too few trials for importance still gets a full
set of files, with notes saying what is missing and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import plotly.graph_objects as go
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial

from reports import figures, png
from reports.confirm import CONFIRM_COLUMNS, confirm_rows, confirmed_configs, verdict
from reports.importance import ImportanceResult, param_importances
from reports.perclass import Confusion, compare_per_class, confusion_of, unmatched_labels
from reports.records import TrialRecord, to_records
from reports.render import (
    IMPORTANCE_COLUMNS,
    Confirmation,
    ReportContent,
    Section,
    findings_lines,
    importance_rows,
    report_html,
    report_markdown,
    write_csv,
)
from reports.tables import (
    COST_KEYS,
    CostKey,
    Findings,
    best_first,
    compute_findings,
    param_names,
    pareto_candidates,
    pareto_columns,
    pareto_front,
    pareto_rows,
    summary_columns,
    summary_row,
    summary_rows,
)

# Every PNG this module may write; ones not produced this time are removed so that a re-run into
# the same folder never leaves, say, a confusion matrix from an older run beside new files.
PNG_FILES = (
    "pareto_params.png",
    "pareto_time.png",
    "importance.png",
    "history.png",
    "intermediate.png",
    "per_class_f1.png",
    "confusion_lora.png",
    "confusion_baseline.png",
)
Drawn = tuple[go.Figure, Figure]  # the interactive figure and its PNG twin

FRONT_FILES: dict[CostKey, str] = {
    "trainable_params": "pareto_params",
    "train_time_s": "pareto_time",
}
FRONT_TITLES: dict[CostKey, str] = {
    "trainable_params": "Pareto front: validation F1 vs trainable parameters",
    "train_time_s": "Pareto front: validation F1 vs training time",
}


def _state_counts(trials: Sequence[FrozenTrial]) -> str:
    counts = Counter(t.state.name for t in trials)
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"


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
    for cost in COST_KEYS:
        missing = [r for r in records if r.complete and getattr(r, cost) is None]
        if missing:
            names = ", ".join(r.label for r in missing[:10])
            notes.append(
                f"{len(missing)} COMPLETE trial(s) lack {cost} and are left out of that "
                f"front: {names}."
            )
    return notes


def _roles(
    record: TrialRecord, findings: Findings, fronts: dict[CostKey, list[TrialRecord]]
) -> str:
    key = (record.study, record.number)
    roles = []
    if record.baseline:
        roles.append("baseline (full FT)")
    if findings.best_lora is not None and key == (
        findings.best_lora.study,
        findings.best_lora.number,
    ):
        roles.append("best LoRA")
    for cost, front in fronts.items():
        if any((r.study, r.number) == key for r in front):
            roles.append("front: " + ("params" if cost == "trainable_params" else "time"))
    return ", ".join(roles)


def _per_class_sections(
    findings: Findings,
    study_trials: Sequence[FrozenTrial],
    baseline_trials: Sequence[FrozenTrial],
    notes: list[str],
) -> list[tuple[Section, Figure | None]]:
    """Per-class F1 and the two confusion matrices, or notes saying why they are missing."""

    def trial_of(record: TrialRecord | None, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
        if record is None:
            return None
        return next((t for t in trials if t.number == record.number), None)

    lora, base = findings.best_lora, findings.baseline
    lora_cm = confusion_of(trial_of(lora, study_trials))
    base_cm = confusion_of(trial_of(base, baseline_trials))
    out: list[tuple[Section, Figure | None]] = []

    title = "Per-class test F1: best LoRA vs baseline"
    if lora is not None and base is not None and lora_cm is not None and base_cm is not None:
        rows = compare_per_class(lora_cm, base_cm)
        if unmatched_labels(lora_cm, base_cm):
            notes.append(
                "The best LoRA trial and the baseline have different label sets; only the "
                f"{len(rows)} shared labels are compared per class."
            )
        out.append(
            (
                Section(title, "per_class_f1.png", figures.per_class_figure(rows, lora, base)),
                png.per_class_png(rows, lora, base),
            )
        )
    else:
        missing = [
            who
            for who, record, cm in (("best LoRA trial", lora, lora_cm), ("baseline", base, base_cm))
            if record is None or cm is None
        ]
        why = (
            f"no labels/test_confusion attributes (or no COMPLETE run) for the "
            f"{' and the '.join(missing)}"
        )
        out.append((Section(title, None, None, note=f"Not drawn: {why}."), None))

    def confusion(
        record: TrialRecord | None, cm: Confusion | None, who: str, name: str
    ) -> tuple[Section, Figure | None]:
        title = f"Test confusion matrix: {who}" + (f" ({record.label})" if record else "")
        if record is None or cm is None:
            note = f"Not drawn: no test_confusion attribute on a COMPLETE {who} trial."
            return Section(title, None, None, note=note), None
        return (
            Section(title, name, figures.confusion_figure(cm, title)),
            png.confusion_png(cm, title),
        )

    out.append(confusion(lora, lora_cm, "best LoRA", "confusion_lora.png"))
    out.append(confusion(base, base_cm, "baseline", "confusion_baseline.png"))
    return out


def _overview_sections(
    records: Sequence[TrialRecord], importance: ImportanceResult
) -> list[tuple[Section, Figure | None]]:
    """Both Pareto fronts, importance, history and per-epoch curves (figure and PNG each), or a
    note in place of a figure that has nothing to show yet."""
    drawn: list[tuple[Section, Figure | None]] = []

    def add(title: str, name: str, ready: bool, note: str, make: Callable[[], Drawn]) -> None:
        if ready:
            figure, static = make()
            drawn.append((Section(title, name, figure), static))
        else:
            drawn.append((Section(title, None, None, note=f"Not drawn: {note}"), None))

    for cost in COST_KEYS:
        add(
            FRONT_TITLES[cost],
            f"{FRONT_FILES[cost]}.png",
            bool(pareto_candidates(records, cost)),
            f"no COMPLETE trial with a validation F1 and {cost}.",
            lambda cost=cost: (
                figures.pareto_figure_from_records(records, cost),
                png.pareto_png(records, cost),
            ),
        )
    add(
        "Parameter importance",
        "importance.png",
        bool(importance.rows),
        " ".join(importance.notes),
        lambda: (figures.importance_figure(importance), png.importance_png(importance)),
    )
    add(
        "Optimisation history",
        "history.png",
        any(r.val_f1 is not None for r in records if not r.baseline),
        "no LoRA trial has reported a validation F1 yet.",
        lambda: (figures.history_figure(records), png.history_png(records)),
    )
    add(
        "Intermediate values (validation F1 per epoch)",
        "intermediate.png",
        any(r.intermediate for r in records),
        "no trial has reported an intermediate value yet.",
        lambda: (figures.intermediate_figure(records), png.intermediate_png(records)),
    )
    return drawn


CONFIRM_METHOD = (
    "Method: each configuration was trained again with the seeds shown; intervals are 95% t "
    "intervals of the mean over seeds; the best LoRA configuration (highest mean validation F1) "
    "is compared with the baseline by Welch's t interval for the difference of mean test "
    "macro-F1. Seeds cover training noise on fixed splits, not test-set sampling noise."
)


def _confirmation(confirm: optuna.Study) -> Confirmation:
    configs = confirmed_configs(confirm.get_trials(deepcopy=False))
    return Confirmation(
        confirm.study_name,
        [verdict(configs).text, CONFIRM_METHOD],
        list(CONFIRM_COLUMNS),
        confirm_rows(configs),
    )


def write_reports(
    study: optuna.Study,
    baseline: optuna.Study | None,
    out_dir: Path | str,
    confirm: optuna.Study | None = None,
) -> list[Path]:
    """Write summary.csv, pareto_params.csv, pareto_time.csv, importance.csv, the PNG plots,
    index.html and REPORT.md for `study` (and its full fine-tuning `baseline`, if any) into
    `out_dir`, created if needed; with the `confirm` study of seed repeats also confirm.csv and
    a confirmation section. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_trials = study.get_trials(deepcopy=False)
    baseline_trials = baseline.get_trials(deepcopy=False) if baseline is not None else []
    records = to_records(study_trials, study.study_name) + (
        to_records(baseline_trials, baseline.study_name, baseline=True)
        if baseline is not None
        else []
    )
    notes = _study_notes(study, baseline, records)

    fronts = {cost: pareto_front(records, cost) for cost in COST_KEYS}
    importance: ImportanceResult = param_importances(study_trials)
    notes.extend(importance.notes)
    findings = compute_findings(
        records,
        importance.top(),
        {FRONT_TITLES[c].removeprefix("Pareto front: "): f for c, f in fronts.items()},
    )
    names = param_names(records)

    written: list[Path] = []
    written.append(write_csv(out / "summary.csv", summary_columns(records), summary_rows(records)))
    pareto_tables = {}
    for cost, front in fronts.items():
        columns = pareto_columns(names)
        rows = pareto_rows(front, names)
        written.append(write_csv(out / f"{FRONT_FILES[cost]}.csv", columns, rows))
        pareto_tables[FRONT_TITLES[cost]] = (columns, rows)
    written.append(
        write_csv(out / "importance.csv", IMPORTANCE_COLUMNS, importance_rows(importance))
    )
    confirmation = _confirmation(confirm) if confirm is not None else None
    if confirmation is not None:
        written.append(write_csv(out / "confirm.csv", confirmation.columns, confirmation.rows))
    else:
        (out / "confirm.csv").unlink(missing_ok=True)

    drawn = _overview_sections(records, importance)
    drawn.extend(_per_class_sections(findings, study_trials, baseline_trials, notes))

    for section, static in drawn:
        if section.png and static is not None:
            written.append(png.save(static, out / section.png))
    produced = {p.name for p in written}
    for name in PNG_FILES:
        if name not in produced:
            (out / name).unlink(missing_ok=True)

    ranked = best_first(records)
    md_rows = []
    for record in ranked:
        row = {"role": _roles(record, findings, fronts), **summary_row(record, names)}
        md_rows.append(row)
    baseline_text = (
        f" and its baseline '{baseline.study_name}' ({_state_counts(baseline_trials)})"
        if baseline is not None
        else " (no baseline study)"
    )
    content = ReportContent(
        title=f"Report: {study.study_name}",
        intro=(
            f"LoRA study '{study.study_name}' ({_state_counts(study_trials)}){baseline_text}. "
            "Objective: validation macro-F1, maximised; test F1 is reported, never used to choose."
        ),
        notes=notes,
        summary_columns=["role", *summary_columns(records)],
        summary_rows=md_rows,
        pareto=pareto_tables,
        importance=importance,
        findings=findings_lines(findings),
        sections=[section for section, _ in drawn],
        confirmation=confirmation,
    )
    index = out / "index.html"
    index.write_text(report_html(content), encoding="utf-8")
    report = out / "REPORT.md"
    report.write_text(report_markdown(content), encoding="utf-8")
    written.extend([index, report])
    return written
