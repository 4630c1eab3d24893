"""`write_reports`: every report file for a LoRA study and its full fine-tuning baseline.

Reads the trials once, computes the tables (`reports.tables`, `reports.importance`,
`reports.perclass`), then writes CSV, PNG, REPORT.md and index.html into one folder. A study
that is still running, has no COMPLETE trial, or too few trials for importance still gets a full
set of files, with notes saying what is missing and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial

from objectives.record import TrialRecord, count_states, to_records
from reports import figures, png
from reports.confirm import (
    CONFIRM_COLUMNS,
    ConfirmedConfig,
    confirm_rows,
    confirmed_configs,
    verdict,
)
from reports.importance import ImportanceResult, param_importances
from reports.perclass import Confusion, compare_per_class, confusion_of, unmatched_labels
from reports.render import (
    IMPORTANCE_COLUMNS,
    Part,
    ReportContent,
    Section,
    findings_lines,
    importance_rows,
    report_html,
    report_markdown,
    write_csv,
)
from reports.sensitivity import (
    Fairness,
    baseline_seed_f1s,
    factor_text,
    fairness,
    fairness_lines,
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
    timing_notes,
)
from reports.testnoise import NOISE_COLUMNS, compare_trials, noise_row, predictions_of, verdict_line

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
    "wait_time_s": "pareto_time",
}
FRONT_TITLES: dict[CostKey, str] = {
    "trainable_params": "Pareto front: validation F1 vs trainable parameters",
    "wait_time_s": "Pareto front: validation F1 vs training time",
}


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
    if record.neighbour:
        roles.append(f"baseline neighbour ({factor_text(record.lr_factor)})")
    elif record.baseline:
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


def _confirmation(configs: Sequence[ConfirmedConfig], study_name: str) -> Part:
    return Part(
        f"Confirmation: seed repeats ({study_name})",
        "confirmation",
        [verdict(configs).text, CONFIRM_METHOD],
        list(CONFIRM_COLUMNS),
        confirm_rows(configs),
    )


def _fairness(check: Fairness, study_name: str) -> Part:
    return Part("Is the baseline fair?", "fairness", fairness_lines(check, study_name))


TEST_NOISE_METHOD = (
    "Method: the trials' per-example test predictions; a paired bootstrap (9,999 resamples of "
    "the test examples, seeded, percentile 95% interval) of the difference in test macro-F1, "
    "and McNemar's exact test on the examples where exactly one of the two is right. "
    "Distinguishable when the interval excludes zero and p < 0.05; mixed when only one does. "
    "This covers the test set's sampling noise for these two trained models; `confirm` covers "
    "training noise (seeds)."
)


def _test_noise(
    findings: Findings,
    check: Fairness,
    fronts: dict[CostKey, list[TrialRecord]],
    study_trials: Sequence[FrozenTrial],
    baseline_trials: Sequence[FrozenTrial],
) -> Part:
    """The best LoRA trial and the LoRA points of the fronts against the fixed baseline (and the
    best LoRA against the best of the three baseline runs when a neighbour beat the fixed one)."""
    title = "Is the difference real on this test set?"
    base = findings.baseline
    if findings.best_lora is None or base is None:
        return Part(title, "test-noise", ["Not computed: no best LoRA trial and baseline pair."])
    attrs = {t.number: t.user_attrs for t in study_trials}
    base_attrs = {t.number: t.user_attrs for t in baseline_trials}
    best = findings.best_lora
    chosen: dict[int, tuple[TrialRecord, list[str]]] = {best.number: (best, ["best LoRA"])}
    for cost, front in fronts.items():
        for r in front:
            if not r.baseline:
                axis = "params" if cost == "trainable_params" else "time"
                chosen.setdefault(r.number, (r, []))[1].append(f"front: {axis}")
    against = [(base, "the baseline")]
    if check.beaten_by is not None:
        beaten = check.beaten_by
        against.append((beaten, f"the baseline at {factor_text(beaten.lr_factor)}"))
    lines, rows, missing = [], [], []
    for number, (record, reasons) in chosen.items():
        mine = predictions_of(attrs.get(number, {}))
        for other, other_name in against if record is best else against[:1]:
            theirs = predictions_of(base_attrs.get(other.number, {}))
            test = compare_trials(mine, theirs) if mine and theirs else None
            if test is None:
                missing.append(f"{record.label} vs {other.label}")
                continue
            rows.append(noise_row(record.label, ", ".join(reasons), other.label, test))
            if record is best:
                who = f"the best LoRA trial ({record.label})"
                lines.append(verdict_line(test, who, other_name, "LoRA", other.label))
    if missing:
        lines.append(
            "Not computed for "
            + ", ".join(missing)
            + ": no per-example test predictions (trials from before they were kept) or "
            "different test examples."
        )
    lines.append(TEST_NOISE_METHOD)
    return Part(title, "test-noise", lines, list(NOISE_COLUMNS), rows)


def _write_tables(
    out: Path,
    records: Sequence[TrialRecord],
    fronts: dict[CostKey, list[TrialRecord]],
    importance: ImportanceResult,
    names: Sequence[str],
) -> tuple[list[Path], dict[str, tuple[list[str], list[dict[str, Any]]]]]:
    """summary.csv, the two front CSVs and importance.csv; the fronts' tables for the pages."""
    written = [write_csv(out / "summary.csv", summary_columns(records), summary_rows(records))]
    pareto_tables = {}
    for cost, front in fronts.items():
        columns = pareto_columns(names)
        rows = pareto_rows(front, names)
        written.append(write_csv(out / f"{FRONT_FILES[cost]}.csv", columns, rows))
        pareto_tables[FRONT_TITLES[cost]] = (columns, rows)
    written.append(
        write_csv(out / "importance.csv", IMPORTANCE_COLUMNS, importance_rows(importance))
    )
    return written, pareto_tables


def _write_pngs(out: Path, drawn: Sequence[tuple[Section, Figure | None]]) -> list[Path]:
    """The static figures; a PNG an earlier report wrote that this one has not is removed."""
    written = [
        png.save(static, out / section.png)
        for section, static in drawn
        if section.png and static is not None
    ]
    produced = {p.name for p in written}
    for name in PNG_FILES:
        if name not in produced:
            (out / name).unlink(missing_ok=True)
    return written


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

    written, pareto_tables = _write_tables(out, records, fronts, importance, names)
    confirm_trials = confirm.get_trials(deepcopy=False) if confirm is not None else []
    check = fairness(records, baseline_seed_f1s(confirm_trials))
    noise = _test_noise(findings, check, fronts, study_trials, baseline_trials)
    parts = [_fairness(check, study.study_name), noise]
    written.append(write_csv(out / "test_noise.csv", noise.columns, noise.rows))
    if confirm is not None:
        confirmation = _confirmation(confirmed_configs(confirm_trials), confirm.study_name)
        parts.append(confirmation)
        written.append(write_csv(out / "confirm.csv", confirmation.columns, confirmation.rows))
    else:
        (out / "confirm.csv").unlink(missing_ok=True)
    notes.extend(timing_notes(records, findings))

    drawn = _overview_sections(records, importance)
    drawn.extend(_per_class_sections(findings, study_trials, baseline_trials, notes))

    written.extend(_write_pngs(out, drawn))

    md_rows = [
        {"role": _roles(record, findings, fronts), **summary_row(record, names)}
        for record in best_first(records)
    ]
    baseline_text = (
        f" and its baseline '{baseline.study_name}' ({_states_text(baseline_trials)})"
        if baseline is not None
        else " (no baseline study)"
    )
    content = ReportContent(
        title=f"Report: {study.study_name}",
        intro=(
            f"LoRA study '{study.study_name}' ({_states_text(study_trials)}){baseline_text}. "
            "Objective: validation macro-F1, maximised; test F1 is reported, never used to choose."
        ),
        notes=notes,
        summary_columns=["role", *summary_columns(records)],
        summary_rows=md_rows,
        pareto=pareto_tables,
        importance=importance,
        findings=findings_lines(findings),
        sections=[section for section, _ in drawn],
        parts=parts,
    )
    index = out / "index.html"
    index.write_text(report_html(content), encoding="utf-8")
    report = out / "REPORT.md"
    report.write_text(report_markdown(content), encoding="utf-8")
    written.extend([index, report])
    return written
