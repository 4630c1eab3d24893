"""Is a difference on the test set bigger than the test set's own sampling noise?

`confirm` covers training noise; this module covers the noise of the test split, one sample of
queries, by two paired comparisons over the same test examples: a paired percentile bootstrap of
the difference in test macro-F1 and McNemar's exact test (method and verdicts:
docs/methodology.md, "Is the difference real on this test set?").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from objectives.predictions import decode_labels
from objectives.record import TrialRecord
from reports.confirm import LEVEL  # the one 95% level of every interval the reports give

ALPHA = 0.05
N_RESAMPLES = 9999
SEED = 0  # the bootstrap's own seed: a report gives the same interval every time it is written


def macro_f1_rows(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Macro-F1 of every row of `y_true`/`y_pred` (shape [..., n]) at once.

    Each row averages per-class F1 over the classes present in its true or predicted labels,
    as scikit-learn's `f1_score(average="macro")` does.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    shape = y_true.shape[:-1]
    t = y_true.reshape(-1, y_true.shape[-1])
    p = y_pred.reshape(-1, y_pred.shape[-1])
    rows = t.shape[0]
    offset = (np.arange(rows) * num_labels)[:, None]
    size = rows * num_labels

    def counts(ids: np.ndarray) -> np.ndarray:
        return np.bincount(ids.ravel(), minlength=size).reshape(rows, num_labels)

    true_n, pred_n = counts(t + offset), counts(p + offset)
    hits = counts((t + offset)[t == p])
    denom = true_n + pred_n  # 2tp + fp + fn
    f1 = np.divide(2.0 * hits, denom, out=np.zeros(denom.shape), where=denom > 0)
    present = denom > 0
    macro = (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return macro.reshape(shape)


def bootstrap_f1_difference(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    num_labels: int,
    n_resamples: int = N_RESAMPLES,
) -> tuple[float, float]:
    """Paired percentile bootstrap 95% interval of macro-F1(a) - macro-F1(b)."""

    def diff(t: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        t, a, b = (np.moveaxis(x, axis, -1) for x in (t, a, b))
        return macro_f1_rows(t, a, num_labels) - macro_f1_rows(t, b, num_labels)

    result = stats.bootstrap(
        (np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)),
        diff,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        batch=500,  # 500 x 3,080 examples x 3 arrays at a time: tens of MB
        method="percentile",
        confidence_level=LEVEL,
        rng=np.random.default_rng(SEED),
    )
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p): examples only a gets right, only b gets right, McNemar's exact two-sided p."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


@dataclass(frozen=True)
class PairedTest:
    """Model a against model b on the same test examples."""

    n: int  # test examples
    f1_a: float
    f1_b: float
    low: float  # 95% bootstrap interval of f1_a - f1_b
    high: float
    only_a: int  # examples only a gets right
    only_b: int
    p_value: float  # McNemar, exact

    @property
    def difference(self) -> float:
        return self.f1_a - self.f1_b

    @property
    def verdict(self) -> str:
        f1_differs = self.low > 0 or self.high < 0
        acc_differs = self.p_value < ALPHA
        if f1_differs and acc_differs:
            return "distinguishable"
        if not f1_differs and not acc_differs:
            return "not distinguishable"
        return "mixed"


def paired_test(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, num_labels: int
) -> PairedTest:
    y_true, pred_a, pred_b = (np.asarray(x) for x in (y_true, pred_a, pred_b))
    if not (len(y_true) == len(pred_a) == len(pred_b)) or len(y_true) == 0:
        raise ValueError("the two prediction arrays must cover the same, non-empty test split")
    f1_a, f1_b = (float(macro_f1_rows(y_true, p, num_labels)) for p in (pred_a, pred_b))
    low, high = bootstrap_f1_difference(y_true, pred_a, pred_b, num_labels)
    only_a, only_b, p = mcnemar_exact(pred_a == y_true, pred_b == y_true)
    return PairedTest(len(y_true), f1_a, f1_b, low, high, only_a, only_b, p)


def verdict_line(test: PairedTest, a: str, b: str, short_a: str = "", short_b: str = "") -> str:
    """One sentence: the verdict, the interval and McNemar's test (`short_*`: names for the
    counts, `a` and `b` themselves by default)."""
    short_a, short_b = short_a or a, short_b or b
    head = {
        "distinguishable": f"Distinguishable on this test set: {a} is "
        f"{'above' if test.difference > 0 else 'below'} {b}",
        "not distinguishable": f"Not distinguishable on this test set: {a} and {b} differ by less "
        "than the test set's sampling noise",
        "mixed": f"Mixed on this test set: {a} against {b}, the macro-F1 interval and McNemar's "
        "test disagree",
    }[test.verdict]
    return (
        f"{head}; test macro-F1 difference {test.difference:+.4f} (paired bootstrap 95% CI "
        f"{test.low:+.4f} to {test.high:+.4f}, {test.n:,} examples); McNemar exact p = "
        f"{test.p_value:.3g} ({test.only_a} examples only {short_a} gets right, {test.only_b} "
        f"only {short_b})."
    )


@dataclass(frozen=True)
class Predictions:
    """A COMPLETE trial's test predictions and the true labels they were scored against."""

    labels: np.ndarray
    predicted: np.ndarray
    num_labels: int


def predictions_of(record: TrialRecord) -> Predictions | None:
    """A trial's decoded test predictions and labels, or None (missing, malformed)."""
    labels = decode_labels(record.test_labels)
    predicted = decode_labels(record.test_predictions)
    if labels is None or predicted is None or len(labels) != len(predicted) or not len(labels):
        return None
    top = int(max(labels.max(), predicted.max())) + 1
    return Predictions(labels, predicted, max(record.num_labels, top))


def compare_trials(a: Predictions, b: Predictions) -> PairedTest | None:
    """The paired test of two trials, or None when they were tested on different examples."""
    if len(a.labels) != len(b.labels) or not np.array_equal(a.labels, b.labels):
        return None
    return paired_test(a.labels, a.predicted, b.predicted, max(a.num_labels, b.num_labels))


NOISE_COLUMNS = (
    "lora_trial",
    "why",
    "against",
    "test_f1_lora",
    "test_f1_against",
    "difference",
    "ci_low",
    "ci_high",
    "only_lora_right",
    "only_against_right",
    "mcnemar_p",
    "verdict",
)


def noise_row(lora: str, why: str, against: str, test: PairedTest) -> dict[str, Any]:
    return {
        "lora_trial": lora,
        "why": why,
        "against": against,
        "test_f1_lora": round(test.f1_a, 4),
        "test_f1_against": round(test.f1_b, 4),
        "difference": round(test.difference, 4),
        "ci_low": round(test.low, 4),
        "ci_high": round(test.high, 4),
        "only_lora_right": test.only_a,
        "only_against_right": test.only_b,
        "mcnemar_p": float(f"{test.p_value:.3g}"),
        "verdict": test.verdict,
    }
