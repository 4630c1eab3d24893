"""Metrics agree with scikit-learn on random and hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from objectives.metrics import accuracy, confusion_matrix, macro_f1, per_class_f1


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 9, 200))  # some labels only predicted
    assert macro_f1(y, p, 9) == pytest.approx(f1_score(y, p, average="macro"))
    assert accuracy(y, p) == pytest.approx(accuracy_score(y, p))


def test_hand_checked_case() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 1, 1])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    # class 0: P=1, R=1/2 -> 2/3; class 1: P=2/3, R=1 -> 4/5; class 2 absent everywhere
    np.testing.assert_allclose(per_class_f1(cm), [2 / 3, 4 / 5, 0.0])
    assert macro_f1(y, p, 3) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert accuracy(y, p) == 0.75
