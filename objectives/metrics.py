"""Classification metrics over label arrays or a confusion matrix, computed by `sklearn.metrics`:
a score that divides by zero is 0, and macro-F1 averages over the classes present in the true
or the predicted labels, so a class absent from both does not pull it down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import metrics


@dataclass(frozen=True)
class PerClass:
    """Per-class scores, indexed by label id."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # true examples of each class (int)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts with rows = true label, columns = predicted label, for label ids 0..num_labels-1."""
    if len(y_true) == 0:  # scikit-learn refuses empty arrays
        return np.zeros((num_labels, num_labels), dtype=np.int64)
    labels = np.arange(num_labels)
    return metrics.confusion_matrix(y_true, y_pred, labels=labels).astype(np.int64)


def per_class(cm: np.ndarray) -> PerClass:
    """Precision, recall, F1 and support of each class of a confusion matrix (rows = true).

    The matrix stands for its examples: each cell (i, j) is one sample of true label i and
    prediction j, weighted by its count, which gives scikit-learn the same sums as the labels.
    """
    counts = np.asarray(cm)
    n = counts.shape[0]
    if not counts.any():  # scikit-learn refuses all-zero weights; every score is 0
        zeros = np.zeros(n)
        return PerClass(zeros, zeros, zeros, np.zeros(n, dtype=np.int64))
    cells = np.arange(n * n)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        cells // n,
        cells % n,
        labels=np.arange(n),
        sample_weight=counts.ravel(),
        average=None,
        zero_division=0,
    )
    return PerClass(precision, recall, f1, np.rint(support).astype(np.int64))


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 of each class from a confusion matrix; a class never true nor predicted scores 0."""
    return per_class(cm).f1


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred.

    The label set is passed to scikit-learn explicitly (the union of both arrays, which is also
    its default); `num_labels` bounds the label ids. 0.0 when both arrays are empty.
    """
    present = np.union1d(y_true, y_pred)
    if len(present) == 0:
        return 0.0
    if present[0] < 0 or present[-1] >= num_labels:
        raise ValueError(f"label ids must lie in 0..{num_labels - 1}, got {present.tolist()}")
    return float(metrics.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The share of exact matches; 0.0 for empty arrays."""
    if len(y_true) == 0:
        return 0.0
    return float(metrics.accuracy_score(y_true, y_pred))
