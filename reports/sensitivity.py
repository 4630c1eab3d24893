"""Is the baseline fair? The fixed full fine-tuning run against its learning-rate neighbours
(`baseline --sensitivity`): does one of them beat the fixed run by more than training noise?

The noise margin comes from `confirm`'s seed repeats of the baseline when there are any, else
one F1 point (docs/methodology.md, "Is the baseline fair?"). Validation F1 decides; test F1 is
shown beside it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from objectives.record import Attr, TrialRecord
from reports.tables import best_record

FALLBACK_MARGIN = 0.01  # one F1 point, when no seed repeats show the training noise
HOW_TO_RUN = (
    "python -m study baseline --study-name {name} --sensitivity (and the study's --storage), "
    "or optimize --baseline-sensitivity"
)


@dataclass(frozen=True)
class Noise:
    margin: float  # a neighbour must beat the fixed run's validation F1 by more than this
    seeds: int  # seed repeats it comes from; 0 = unknown, FALLBACK_MARGIN used

    @property
    def text(self) -> str:
        if not self.seeds:
            return (
                f"training noise not measured (no seed repeats of the baseline; `confirm` "
                f"measures it), so a margin of {self.margin:.4f} (one F1 point) is used"
            )
        return (
            f"training noise from {self.seeds} seed repeats of the baseline: two runs differ by "
            f"up to {self.margin:.4f} in validation F1 (95%)"
        )


def seed_noise(val_f1_over_seeds: Sequence[float]) -> Noise:
    """The margin two single runs of one configuration stay within (95%), from its seed repeats."""
    n = len(val_f1_over_seeds)
    if n < 2:
        return Noise(FALLBACK_MARGIN, 0)
    from scipy import stats  # 1-2 s to import: not in every worker's start-up, only here

    s = statistics.stdev(val_f1_over_seeds)
    return Noise(float(stats.t.ppf(0.975, n - 1) * s * math.sqrt(2)), n)


def factor_text(factor: float | None) -> str:
    if factor is None or math.isclose(factor, 1.0):
        return "fixed lr"
    if factor < 1:
        return f"lr / {1 / factor:.3g}"
    return f"lr x {factor:.3g}"


@dataclass(frozen=True)
class Fairness:
    fixed: TrialRecord | None
    neighbours: tuple[TrialRecord, ...]  # COMPLETE, smallest learning rate first
    noise: Noise
    best_lora: TrialRecord | None

    @property
    def beaten_by(self) -> TrialRecord | None:
        """The best neighbour, when it beats the fixed run by more than the noise."""
        if self.fixed is None or not self.neighbours:
            return None
        best = max(self.neighbours, key=lambda r: r.val_f1)
        ahead = best.val_f1 - self.fixed.val_f1  # type: ignore[operator]
        return best if ahead > self.noise.margin else None


def fairness(
    records: Sequence[TrialRecord], baseline_val_f1_over_seeds: Sequence[float] = ()
) -> Fairness:
    """The fixed baseline run, its COMPLETE neighbours and the noise margin, from the records of
    the LoRA study and its baseline study; the seed repeats come from `confirm` when it ran."""
    neighbours = sorted(
        (r for r in records if r.baseline and r.neighbour and r.complete and r.val_f1 is not None),
        key=lambda r: (r.lr_factor or 1.0, r.number),
    )
    return Fairness(
        fixed=best_record(records, baseline=True),
        neighbours=tuple(neighbours),
        noise=seed_noise(baseline_val_f1_over_seeds),
        best_lora=best_record(records, baseline=False),
    )


def _f1s(r: TrialRecord) -> str:
    test = f", test {r.test_f1:.4f}" if r.test_f1 is not None else ""
    return f"validation F1 {r.val_f1:.4f}{test}"


def _gap(lora: TrialRecord, base: TrialRecord) -> str:
    parts = [f"validation {lora.val_f1 - base.val_f1:+.4f}"]  # type: ignore[operator]
    if lora.test_f1 is not None and base.test_f1 is not None:
        parts.append(f"test {lora.test_f1 - base.test_f1:+.4f}")
    return ", ".join(parts)


def fairness_lines(f: Fairness, study_name: str) -> list[str]:
    """The "Is the baseline fair?" part of the report and the dashboard note, as sentences."""
    if f.fixed is None:
        return ["No COMPLETE fixed baseline run: nothing to check yet."]
    if not f.neighbours:
        return [
            "Not checked: the baseline was trained at its fixed learning rate only, so nothing "
            "shows whether that rate suits this model and data. Run: "
            + HOW_TO_RUN.format(name=study_name)
            + "."
        ]
    lr = f.fixed.params.get("learning_rate")
    lr_text = f" (lr {lr:.2e})" if isinstance(lr, int | float) else ""
    lines = [
        f"Fixed run{lr_text}, {f.fixed.label}: {_f1s(f.fixed)}.",
        *(f"{factor_text(r.lr_factor)}, {r.label}: {_f1s(r)}." for r in f.neighbours),
        f"Margin: {f.noise.text}.",
    ]
    beaten = f.beaten_by
    if beaten is None:
        lines.append(
            "The fixed baseline holds: no neighbouring learning rate beats it by more than the "
            "margin, so the comparison with LoRA uses a reasonably tuned yardstick."
        )
        return lines
    ahead = beaten.val_f1 - f.fixed.val_f1  # type: ignore[operator]
    lines.append(
        "WARNING: the baseline is not tuned for this model and data: at "
        f"{factor_text(beaten.lr_factor)} full fine-tuning reaches validation F1 "
        f"{beaten.val_f1:.4f}, {ahead:+.4f} above the fixed run (more than the margin). A LoRA "
        "gain over the fixed run says as much about its learning rate as about LoRA."
    )
    if f.best_lora is not None and f.best_lora.val_f1 is not None:
        lines.append(
            f"Best LoRA ({f.best_lora.label}) minus the fixed run: {_gap(f.best_lora, f.fixed)}; "
            f"minus the best of the three ({beaten.label}, {factor_text(beaten.lr_factor)}): "
            f"{_gap(f.best_lora, beaten)}."
        )
    return lines


def seed_runs(confirm_trials: Sequence[FrozenTrial]) -> dict[tuple[str, int], list[FrozenTrial]]:
    """`confirm`'s COMPLETE runs by source trial (study, number): the first run of each seed, in
    seed order. Here rather than in `reports.confirm`, which imports scipy: the dashboard note
    reads the baseline's runs after every trial."""
    groups: dict[tuple[str, int], dict[int, FrozenTrial]] = {}
    for t in sorted(confirm_trials, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            attrs = t.user_attrs
            runs = groups.setdefault((attrs[Attr.SOURCE_STUDY], int(attrs[Attr.SOURCE_TRIAL])), {})
            runs.setdefault(int(attrs[Attr.SEED]), t)
    return {source: [by_seed[s] for s in sorted(by_seed)] for source, by_seed in groups.items()}


def baseline_seed_f1s(confirm_trials: Sequence[FrozenTrial]) -> list[float]:
    """Validation F1 of the baseline configuration over the seeds `confirm` trained it with
    (the first COMPLETE run of each seed)."""
    return [
        float(t.value)
        for runs in seed_runs(confirm_trials).values()
        for t in runs
        if t.user_attrs[Attr.SOURCE_MODE] == "full"
    ]
