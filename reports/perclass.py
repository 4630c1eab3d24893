"""Per-class F1 and confusion matrices from the `labels` and `test_confusion` trial attributes.

`test_confusion[i][j]` counts test examples of true label `i` predicted as `j` (at the trial's best
epoch); `labels[i]` names label id `i`. Per-class F1 comes from `objectives.metrics` (scikit-learn,
`zero_division=0`), as the objective's macro-F1 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial

from objectives.metrics import per_class_f1
from objectives.record import Attr


@dataclass(frozen=True)
class Confusion:
    labels: list[str]
    counts: np.ndarray  # (n, n) int, rows = true label, columns = predicted label


def confusion_of(trial: FrozenTrial | None) -> Confusion | None:
    """The trial's test confusion matrix and label names; None without a trial or a matrix
    (a COMPLETE trial writes both)."""
    if trial is None or Attr.TEST_CONFUSION not in trial.user_attrs:
        return None
    attrs = trial.user_attrs
    counts = np.asarray(attrs[Attr.TEST_CONFUSION], dtype=np.int64)
    return Confusion(labels=[str(label) for label in attrs[Attr.LABELS]], counts=counts)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each true-label row divided by its support (recall on the diagonal); empty rows stay 0."""
    counts = np.asarray(counts, dtype=float)
    support = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)


@dataclass(frozen=True)
class ClassF1:
    label: str
    lora_f1: float
    baseline_f1: float

    @property
    def difference(self) -> float:
        """LoRA minus baseline."""
        return self.lora_f1 - self.baseline_f1


def compare_per_class(lora: Confusion, baseline: Confusion) -> list[ClassF1]:
    """Per-class F1 of both runs, matched by label name, sorted by difference (LoRA's largest
    deficit first, then by name). Labels present in only one run are left out."""
    lora_f1 = dict(zip(lora.labels, per_class_f1(lora.counts), strict=True))
    base_f1 = dict(zip(baseline.labels, per_class_f1(baseline.counts), strict=True))
    rows = [
        ClassF1(label=label, lora_f1=float(lora_f1[label]), baseline_f1=float(base_f1[label]))
        for label in lora.labels
        if label in base_f1
    ]
    return sorted(rows, key=lambda r: (r.difference, r.label))


def unmatched_labels(lora: Confusion, baseline: Confusion) -> Sequence[str]:
    """Labels that only one of the two runs knows (a sign the runs used different data)."""
    return sorted(set(lora.labels) ^ set(baseline.labels))
