"""Seed repeats of the best configurations (`python -m study confirm`): means, 95% t intervals
and the verdict of the best LoRA configuration against the baseline by Welch's t interval
(docs/methodology.md, "Seed repeats"). Pure functions over the `<NAME>-confirm` study's trials.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial
from scipy import stats

from objectives.record import Attr, TrialRecord
from reports.render import params_text
from reports.sensitivity import seed_runs

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None with fewer than two values
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and the two-sided t interval of the mean (scipy's one-sample t test)."""
    if not values:
        raise ValueError("no values")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, None, n)
    if statistics.stdev(values) == 0.0:  # scipy's interval is NaN without spread
        return Interval(mean, mean, mean, n)
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(LEVEL)
    return Interval(mean, float(ci.low), float(ci.high), n)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean of a minus mean of b, with Welch's t interval (None bounds: too few values)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    n = min(len(a), len(b))
    if n < 2:
        return Interval(diff, None, None, n)
    if statistics.variance(a) == 0.0 and statistics.variance(b) == 0.0:
        return Interval(diff, diff, diff, n)  # scipy's interval is NaN without spread
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(LEVEL)
    return Interval(diff, float(ci.low), float(ci.high), n)


@dataclass(frozen=True)
class ConfirmedConfig:
    """One source trial's configuration, re-trained with several seeds."""

    source_study: str
    source_trial: int
    mode: str
    params: dict[str, Any]
    seeds: tuple[int, ...]
    val_f1: Interval
    test_f1: Interval | None
    train_time_s: Interval | None
    trainable_params: int | None
    total_params: int | None
    trainable_share_pct: float | None
    test_values: tuple[float, ...]

    @property
    def label(self) -> str:
        kind = "baseline" if self.mode == "full" else "LoRA"
        return f"{kind} {self.source_study}#{self.source_trial}"


def confirmed_configs(trials: Sequence[FrozenTrial]) -> list[ConfirmedConfig]:
    """COMPLETE runs grouped by source trial (the first run of each seed), best mean val F1
    first."""
    out = []
    for (study, number), runs in seed_runs(trials).items():
        first, records = runs[0].user_attrs, [TrialRecord.from_trial(t, study) for t in runs]
        test = [r.test_f1 for r in records if r.test_f1 is not None]
        time_s = [r.train_time_s for r in records if r.train_time_s is not None]
        out.append(
            ConfirmedConfig(
                source_study=study,
                source_trial=number,
                mode=first[Attr.SOURCE_MODE],
                params=dict(first[Attr.SOURCE_PARAMS]),
                seeds=tuple(r.seed for r in records),
                val_f1=t_interval([float(t.value) for t in runs]),
                test_f1=t_interval(test) if test else None,
                train_time_s=t_interval(time_s) if time_s else None,
                trainable_params=records[0].trainable_params,
                total_params=records[0].total_params,
                trainable_share_pct=records[0].trainable_share_pct,
                test_values=tuple(test),
            )
        )
    return sorted(out, key=lambda c: (-c.val_f1.mean, c.source_study, c.source_trial))


@dataclass(frozen=True)
class Verdict:
    lora: ConfirmedConfig | None
    baseline: ConfirmedConfig | None
    test_diff: Interval | None  # best LoRA minus baseline, mean test macro-F1
    text: str


def verdict(configs: Sequence[ConfirmedConfig]) -> Verdict:
    """Whether the best confirmed LoRA configuration is distinguishable from full fine-tuning."""
    lora = next((c for c in configs if c.mode != "full"), None)
    base = next((c for c in configs if c.mode == "full"), None)
    if lora is None or base is None:
        missing = "LoRA configuration" if lora is None else "baseline"
        return Verdict(lora, base, None, f"No comparison: no confirmed {missing} yet.")
    if len(lora.test_values) < 2 or len(base.test_values) < 2:
        return Verdict(
            lora,
            base,
            None,
            f"Cannot tell: {lora.label} and the baseline need at least two seeds each with a "
            "test F1 for an interval.",
        )
    diff = welch_interval(lora.test_values, base.test_values)
    assert diff.low is not None and diff.high is not None
    span = f"{diff.mean:+.4f} (95% CI {diff.low:+.4f} to {diff.high:+.4f})"
    seeds = f"{len(lora.test_values)} and {len(base.test_values)} seeds"
    if diff.low > 0 or diff.high < 0:
        side = "above" if diff.low > 0 else "below"
        text = (
            f"Distinguishable: the best LoRA configuration ({lora.label}) is {side} full "
            f"fine-tuning on test macro-F1, difference {span}, Welch t interval over {seeds}."
        )
    else:
        text = (
            f"Not distinguishable: the best LoRA configuration ({lora.label}) and full "
            f"fine-tuning differ by {span} in test macro-F1 (Welch t interval over {seeds}); "
            "the interval includes zero."
        )
    return Verdict(lora, base, diff, text)


CONFIRM_COLUMNS = (
    "configuration",
    "params",
    "seeds",
    "val_f1_mean",
    "val_f1_ci",
    "test_f1_mean",
    "test_f1_ci",
    "train_time_s_mean",
    "train_time_s_ci",
    "trainable_params",
    "total_params",
    "trainable_share_pct",
)


def _ci(interval: Interval | None, digits: int) -> str | None:
    if interval is None or interval.low is None or interval.high is None:
        return None
    return f"[{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def confirm_rows(configs: Sequence[ConfirmedConfig]) -> list[dict[str, Any]]:
    """One row per configuration: means and 95% intervals (text) for the tables."""
    rows = []
    for c in configs:
        rows.append(
            {
                "configuration": c.label,
                "params": params_text(c.params),
                "seeds": len(c.seeds),
                "val_f1_mean": round(c.val_f1.mean, 4),
                "val_f1_ci": _ci(c.val_f1, 4),
                "test_f1_mean": round(c.test_f1.mean, 4) if c.test_f1 else None,
                "test_f1_ci": _ci(c.test_f1, 4),
                "train_time_s_mean": round(c.train_time_s.mean, 1) if c.train_time_s else None,
                "train_time_s_ci": _ci(c.train_time_s, 1),
                "trainable_params": c.trainable_params,
                "total_params": c.total_params,
                "trainable_share_pct": c.trainable_share_pct,
            }
        )
    return rows
