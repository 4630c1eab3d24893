"""The best LoRA trial against the full fine-tuning baseline, computed once from the trials
(`compare`), and its wordings: `findings_lines` for the report, `note_lines` for the dashboard
note. A check is one more `Check` made in `compare`; the report, the note and the terminal show
every one (docs/ARCHITECTURE.md, "reports/").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from objectives.record import TrialRecord
from objectives.space import Space
from reports.edges import space_check_lines
from reports.render import Check, params_text
from reports.sensitivity import Fairness, factor_text, fairness, fairness_lines
from reports.tables import (
    FRONT_AXES,
    FRONT_NAMES,
    CostKey,
    PruningSavings,
    pareto_candidates,
    pruning_savings,
)

TEST_NOISE_METHOD = (
    "Method: the trials' per-example test predictions; a paired bootstrap (9,999 resamples of "
    "the test examples, seeded, percentile 95% interval) of the difference in test macro-F1, "
    "and McNemar's exact test on the examples where exactly one of the two is right. "
    "Distinguishable when the interval excludes zero and p < 0.05; mixed when only one does. "
    "This covers the test set's sampling noise for these two trained models; `confirm` covers "
    "training noise (seeds)."
)


@dataclass(frozen=True)
class Comparison:
    """What the best LoRA trial gives against the baseline; every number is from the trials."""

    best_lora: TrialRecord | None
    baseline: TrialRecord | None  # the fixed run, never a learning-rate neighbour
    delta_val_f1: float | None  # best LoRA minus baseline
    delta_test_f1: float | None
    lora_share_pct: float | None  # LoRA trainable params as % of its own model's parameters
    params_vs_baseline_pct: float | None  # LoRA trainable params as % of the baseline's
    time_ratio: float | None  # LoRA wait time / baseline wait time (setup included)
    top_params: Mapping[str, tuple[str, float]]  # evaluator -> (parameter, normalised importance)
    savings: PruningSavings | None
    fairness: Fairness
    fronts: Mapping[CostKey, Sequence[TrialRecord]] = field(default_factory=dict)
    checks: Sequence[Check] = ()  # in the order they are shown

    @property
    def most_important(self) -> str | None:
        """The parameter most evaluators rank first (ties: the first evaluator's choice)."""
        votes: dict[str, int] = {}
        for name, _ in self.top_params.values():
            votes[name] = votes.get(name, 0) + 1
        return max(votes, key=lambda n: votes[n]) if votes else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _delta(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def compare(
    records: Sequence[TrialRecord],
    top_params: Mapping[str, tuple[str, float]] | None = None,
    fronts: Mapping[CostKey, Sequence[TrialRecord]] | None = None,
    *,
    study_name: str = "",
    seed_f1s: Sequence[float] = (),
    test_noise: bool = False,
    space: Space | None = None,
) -> Comparison:
    """The best LoRA trial against the best fixed baseline run, with the checks: whether the
    baseline is fair (`seed_f1s`: its validation F1 over `confirm`'s seeds), with `test_noise`
    (seconds of bootstrap) whether the difference is real on this test set, and with the
    study's `space` whether the best trials press against a bound of it."""
    check = fairness(records, seed_f1s)
    lora, base = check.best_lora, check.fixed

    def both(attr: str) -> tuple[Any, Any]:
        return (getattr(lora, attr, None), getattr(base, attr, None))

    lora_params, base_params = both("trainable_params")
    checks = [Check("Is the baseline fair?", "fairness", fairness_lines(check, study_name))]
    if test_noise:
        checks.append(_test_noise(lora, base, check, fronts or {}))
    if space is not None:
        lines = space_check_lines(records, space)
        checks.append(Check("Is the search space big enough?", "space-edges", lines))
    return Comparison(
        best_lora=lora,
        baseline=base,
        delta_val_f1=_delta(*both("val_f1")),
        delta_test_f1=_delta(*both("test_f1")),
        lora_share_pct=lora.trainable_share_pct if lora else None,
        params_vs_baseline_pct=_ratio(
            None if lora_params is None else 100.0 * lora_params, base_params
        ),
        time_ratio=_ratio(*both("wait_time_s")),
        top_params=dict(top_params or {}),
        savings=pruning_savings(records),
        fairness=check,
        fronts=dict(fronts or {}),
        checks=tuple(checks),
    )


def _test_noise(
    best: TrialRecord | None,
    base: TrialRecord | None,
    check: Fairness,
    fronts: Mapping[CostKey, Sequence[TrialRecord]],
) -> Check:
    """The best LoRA trial and the LoRA points of the fronts against the fixed baseline (and the
    best LoRA against the best of the three baseline runs when a neighbour beat the fixed one)."""
    from reports.testnoise import (  # scipy: seconds to import, only where a report is written
        NOISE_COLUMNS,
        compare_trials,
        noise_row,
        predictions_of,
        verdict_line,
    )

    title = "Is the difference real on this test set?"
    if best is None or base is None:
        return Check(title, "test-noise", ["Not computed: no best LoRA trial and baseline pair."])
    chosen = {best.number: best}  # then the LoRA points of the fronts, in their order
    for front in fronts.values():
        chosen.update({r.number: r for r in front if not r.baseline and r.number not in chosen})
    against = [(base, "the baseline")]
    if check.beaten_by is not None:
        beaten = check.beaten_by
        against.append((beaten, f"the baseline at {factor_text(beaten.lr_factor)}"))
    lines, rows, missing = [], [], []
    for record in chosen.values():
        mine = predictions_of(record)
        for other, other_name in against if record is best else against[:1]:
            theirs = predictions_of(other)
            test = compare_trials(mine, theirs) if mine and theirs else None
            if test is None:
                missing.append(f"{record.label} vs {other.label}")
                continue
            rows.append(noise_row(record.label, roles(record, best, fronts), other.label, test))
            if record is best:
                who = f"the best LoRA trial ({record.label})"
                lines.append(verdict_line(test, who, other_name, "LoRA", other.label))
    if missing:
        lines.append(
            "Not computed for "
            + ", ".join(missing)
            + ": no per-example test predictions, or different test examples."
        )
    lines.append(TEST_NOISE_METHOD)
    return Check(title, "test-noise", lines, list(NOISE_COLUMNS), rows)


# ----------------------------------------------------------------------------- the report


def roles(
    record: TrialRecord,
    best: TrialRecord | None,
    fronts: Mapping[CostKey, Sequence[TrialRecord]],
) -> str:
    """What `record` is in the comparison: baseline or neighbour, best LoRA, on which fronts."""
    key = (record.study, record.number)
    out = []
    if record.neighbour:
        out.append(f"baseline neighbour ({factor_text(record.lr_factor)})")
    elif record.baseline:
        out.append("baseline (full FT)")
    if best is not None and key == (best.study, best.number):
        out.append("best LoRA")
    for cost, front in fronts.items():
        if any((r.study, r.number) == key for r in front):
            out.append(f"front: {FRONT_AXES[cost]}")
    return ", ".join(out)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def findings_lines(c: Comparison) -> list[str]:
    """The report's closing findings as plain sentences (no Markdown), for REPORT.md and HTML."""
    return [
        *_trial_lines(c),
        *_gap_lines(c),
        _importance_line(c),
        _savings_line(c.savings),
        *(
            f"Pareto front ({FRONT_NAMES[cost]}): {', '.join(r.label for r in front) or 'empty'}."
            for cost, front in c.fronts.items()
        ),
    ]


def _trial_lines(c: Comparison) -> list[str]:
    lora, base = c.best_lora, c.baseline
    if lora is None:
        lines = ["No COMPLETE LoRA trial yet, so there is no best LoRA setting to compare."]
    else:
        lines = [
            f"Best LoRA trial (by validation F1): {lora.label} ({params_text(lora.params)}): "
            f"validation F1 {lora.val_f1:.4f}, test F1 {lora.test_f1:.4f}."
        ]
    if base is None:
        return [*lines, "No COMPLETE full fine-tuning baseline run, so no comparison with it."]
    return [
        *lines,
        f"Full fine-tuning baseline: {base.label}: validation F1 {base.val_f1:.4f}, "
        f"test F1 {base.test_f1:.4f}.",
    ]


def _gap_lines(c: Comparison) -> list[str]:
    lora, base = c.best_lora, c.baseline
    if lora is None or base is None:
        return []
    share = (
        f"{c.lora_share_pct:.2f}% of its model's weights" if c.lora_share_pct is not None else ""
    )
    return [
        f"Best LoRA minus baseline, macro-F1: validation {c.delta_val_f1:+.4f}, "
        f"test {c.delta_test_f1:+.4f}.",
        f"Trainable parameters: the best LoRA trial trains {lora.trainable_params:,} "
        f"({share + ', ' if share else ''}{c.params_vs_baseline_pct:.2f}% of the baseline's "
        f"{base.trainable_params:,}).",
        f"Training time (setup included): {lora.wait_time_s:.1f} s for the best LoRA "
        f"trial against {base.wait_time_s:.1f} s for the baseline, a ratio of "
        f"{c.time_ratio:.2f}.",
    ]


def _importance_line(c: Comparison) -> str:
    tops = c.top_params
    if not tops:
        return "Most important parameter: not computed (see notes)."
    if len({name for name, _ in tops.values()}) > 1:
        ranks = "; ".join(f"{ev} ranks {n} first ({s:.2f})" for ev, (n, s) in tops.items())
        return f"Most important parameter for validation F1: evaluators differ: {ranks}."
    shares = ", ".join(f"{ev} {share:.2f}" for ev, (_, share) in tops.items())
    who = "both evaluators rank it first" if len(tops) > 1 else "the only evaluator run"
    return (
        f"Most important parameter for validation F1: {c.most_important} "
        f"(share of importance: {shares}; {who})."
    )


def _savings_line(savings: PruningSavings | None) -> str:
    if savings is None:
        return "Pruning savings: no finished LoRA trial with a known epoch budget."
    return (
        f"Pruning: {savings.epochs_run} epochs run of a budget of {savings.epoch_budget} "
        f"over {savings.n_trials} finished LoRA trials ({savings.n_pruned} pruned): "
        f"{_pct(savings.used_fraction)} of the epoch budget used, "
        f"{_pct(savings.saved_fraction)} saved."
    )


# ----------------------------------------------------------------------------- the note


def note_lines(c: Comparison) -> list[str]:
    """Markdown bullets for the dashboard note: the F1 gap in points and what the best LoRA
    trial costs relative to the baseline (empty without both)."""
    r, b = c.best_lora, c.baseline
    if r is None or b is None:
        return []
    gap = 100 * c.delta_val_f1  # in F1 points, the unit papers and the reference use
    verdict = (
        "equal to the baseline"
        if round(gap, 2) == 0
        else f"{abs(gap):.2f} points {'above' if gap > 0 else 'below'} the baseline"
    )
    lines = [f"- validation macro-F1 {r.val_f1:.4f} vs {b.val_f1:.4f}: {verdict}"]
    if c.delta_test_f1 is not None:
        lines.append(
            f"- test macro-F1 {r.test_f1:.4f} vs {b.test_f1:.4f} (reported, not used to choose)"
        )
    return [
        *lines,
        f"- trainable parameters {r.trainable_params:,.0f} vs {b.trainable_params:,.0f}:"
        f" {c.params_vs_baseline_pct:.2f}% of the baseline's",
        # what a user waits: setup (copy, capture, optimizer) + epochs
        f"- training time (setup included) {r.wait_time_s:.1f} s vs {b.wait_time_s:.1f} s:"
        f" {c.time_ratio:.2f}x the baseline's",
    ]


# ----------------------------------------------------------------------------- load


def load_of(record: TrialRecord) -> tuple[str | None, int | None, int | None]:
    """What a trial's training time depends on besides its work: the kind of device, how many
    other trials trained on it meanwhile, and the CPU threads of its process."""
    kind = record.device.split(":")[0] if record.device else None
    return kind, record.concurrent_trials, record.torch_threads


def describe_load(load: tuple[str | None, int | None, int | None]) -> str:
    kind, others, threads = load
    alone = "alone" if others == 0 else f"beside {others} other trial(s)"
    return f"{kind or 'unknown device'}, {alone}, {threads} torch thread(s)"


def timing_notes(records: Sequence[TrialRecord], c: Comparison) -> list[str]:
    """Warnings where training times compare runs made under different load (other trials on
    the same device, other thread counts, another kind of device): the time front and the
    baseline time ratio then measure the load as much as the method."""
    notes = []
    timed = pareto_candidates(records, "wait_time_s")
    loads = sorted({load_of(r) for r in timed}, key=str)
    if len(loads) > 1:
        groups = "; ".join(
            f"{describe_load(load)}: {sum(load_of(r) == load for r in timed)} trial(s)"
            for load in loads
        )
        notes.append(
            "Training times were measured under different load, so the time front compares "
            f"load as well as settings ({groups}). For comparable times run with --workers 1, "
            "or compare only trials with the same concurrent_trials and torch_threads."
        )
    lora, base = c.best_lora, c.baseline
    if lora is not None and base is not None and load_of(lora) != load_of(base):
        notes.append(
            f"The time ratio of the best LoRA trial to the baseline compares different loads: "
            f"{lora.label} trained {describe_load(load_of(lora))}, the baseline "
            f"{describe_load(load_of(base))}."
        )
    return notes
