"""Tests of the reports package on synthetic studies: no model is trained.

Studies are built with `study.add_trial(create_trial(...))` in SQLite files under tmp_path, with
the trial attributes the objective writes (`objectives.record`),
in every state. The maths (fronts with
ties, savings, findings, per-class F1, importance direction) are checked on hand-made cases; the
file writer is checked end to end and on degenerate studies (nothing COMPLETE, one trial, a
RUNNING trial, no baseline).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import plotly.graph_objects as go
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import FrozenTrial, TrialState, create_trial
from sklearn.metrics import f1_score

from objectives.metrics import per_class_f1
from objectives.record import TrialRecord, as_float, as_int, to_records
from reports.comparison import compare
from reports.figures import pareto_figure_from_records
from reports.importance import FANOVA, MIN_TRIALS, PED_ANOVA, param_importances
from reports.perclass import (
    Confusion,
    compare_per_class,
    confusion_of,
    row_normalised,
)
from reports.tables import (
    best_first,
    best_record,
    best_so_far,
    dominates,
    pareto_front,
    pareto_rows,
    pruning_savings,
    summary_columns,
    summary_rows,
)
from reports.write import write_reports

SPACE = {
    "lora_r": IntDistribution(4, 64, log=True),
    "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
    "lr_scheduler": CategoricalDistribution(["linear", "cosine", "constant"]),
}
BASELINE_SPACE = {
    "learning_rate": FloatDistribution(1e-4, 1e-4),
    "lr_scheduler": CategoricalDistribution(["linear"]),
    "batch_size": IntDistribution(32, 32),
    "weight_decay": FloatDistribution(0.05, 0.05),
}
LABELS = ["activate_my_card", "age_limit", "card_arrival", "lost_or_stolen_card", "top_up_failed"]
MAX_EPOCHS = 4
BASELINE_F1 = 0.93  # validation F1 of the full fine-tuning run; its test F1 is 0.02 lower
TOTAL = 110_000_000


def confusion(accuracy: float, seed: int, n: int = len(LABELS), per_class: int = 20) -> list:
    """A plausible test confusion matrix: `accuracy` of each row on the diagonal."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n, n), dtype=int)
    for i in range(n):
        hits = round(per_class * accuracy)
        counts[i, i] = hits
        for j in rng.integers(0, n, per_class - hits):
            counts[i, j] += 1
    return counts.tolist()


def lora_trial(
    r: int,
    lr: float,
    curve: list[float],
    *,
    state: TrialState = TrialState.COMPLETE,
    scheduler: str = "cosine",
    seconds: float | None = None,
    seed: int = 0,
    **extra: Any,
) -> FrozenTrial:
    """A LoRA trial as the objective records it; `curve` is validation F1 per epoch."""
    trainable = 600_000 + 36_864 * r
    best = max(curve)
    attrs: dict[str, Any] = {
        "mode": "lora",
        "trainable_params": trainable,
        "total_params": TOTAL,
        "trainable_share_pct": 100 * trainable / TOTAL,
        "train_time_s": seconds if seconds is not None else 100.0 + 2 * r,
        "setup_time_s": 0.0,
        "epochs_run": len(curve),
        "best_epoch": curve.index(best) + 1,
        "val_f1": best,
        "val_accuracy": best + 0.01,
        "model": "tiny-bert",
        "device": "cpu",
        "seed": seed,
        "data_fingerprint": "abc123",
        "max_epochs": MAX_EPOCHS,
        "peak_mem_mb": 512.0,
    }
    if state == TrialState.COMPLETE:
        attrs.update(
            test_f1=best - 0.01,
            test_accuracy=best,
            labels=LABELS,
            test_confusion=confusion(best, seed),
        )
    attrs.update(extra)
    return create_trial(
        state=state,
        value=best if state == TrialState.COMPLETE else None,
        params={"lora_r": r, "learning_rate": lr, "lr_scheduler": scheduler},
        distributions=SPACE,
        intermediate_values={e: v for e, v in enumerate(curve, start=1)},
        user_attrs=attrs,
    )


def baseline_trial(f1: float = BASELINE_F1, seconds: float = 600.0) -> FrozenTrial:
    curve = [f1 - 0.2, f1 - 0.05, f1 - 0.01, f1]
    return create_trial(
        value=f1,
        params={
            "learning_rate": 1e-4,
            "lr_scheduler": "linear",
            "batch_size": 32,
            "weight_decay": 0.05,
        },  # fmt: skip
        distributions=BASELINE_SPACE,
        intermediate_values={e: v for e, v in enumerate(curve, start=1)},
        user_attrs={
            "mode": "full",
            "trainable_params": 109_500_000,
            "total_params": 109_500_000,
            "trainable_share_pct": 100.0,
            "train_time_s": seconds,
            "setup_time_s": 0.0,
            "epochs_run": 4,
            "best_epoch": 4,
            "val_f1": f1,
            "test_f1": f1 - 0.02,
            "test_accuracy": f1,
            "max_epochs": MAX_EPOCHS,
            "labels": LABELS,
            "test_confusion": confusion(f1 - 0.02, seed=99),
        },
    )


def new_study(name: str, storage: str | optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """A maximised study; in memory unless a storage (URL) is given."""
    return optuna.create_study(
        study_name=name,
        direction="maximize",
        storage=storage or optuna.storages.InMemoryStorage(),
        load_if_exists=True,
    )


def realistic_lora_trials() -> list[FrozenTrial]:
    """12 COMPLETE trials where learning rate drives F1, 3 PRUNED, 1 FAIL, 1 RUNNING."""
    rng = np.random.default_rng(7)
    trials = []
    for i in range(12):
        r = [4, 8, 16, 32][i % 4]
        lr = float(10 ** rng.uniform(-5, -3))
        top = 0.92 - 0.3 * abs(math.log10(lr) + 3.5) + 0.003 * math.log2(r)
        curve = [top * f for f in (0.6, 0.85, 0.97, 1.0)]
        trials.append(lora_trial(r, lr, curve, scheduler=["linear", "cosine"][i % 2], seed=i))
    for i in range(3):
        trials.append(
            lora_trial(8, 2e-5, [0.30 + 0.01 * i, 0.35], state=TrialState.PRUNED, seed=20 + i)
        )
    trials.append(
        create_trial(
            state=TrialState.FAIL,
            params={"lora_r": 64, "learning_rate": 1e-4, "lr_scheduler": "linear"},
            distributions=SPACE,
            user_attrs={"mode": "lora", "fail_reason": "out of memory"},
        )
    )
    trials.append(
        create_trial(
            state=TrialState.RUNNING,
            params={"lora_r": 8, "learning_rate": 3e-4, "lr_scheduler": "cosine"},
            distributions=SPACE,
            intermediate_values={1: 0.5},
            user_attrs={"mode": "lora", "max_epochs": MAX_EPOCHS},
        )
    )
    return trials


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, optuna.Study]:
    """Both studies in one SQLite file, as `optimize` and `baseline` leave them. Module-scoped
    (creating the schema costs a second) and only read by the tests."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('storage') / 'studies.db'}"
    study = new_study("banking77", storage)
    baseline = new_study("banking77-full-ft", storage)
    study.add_trials(realistic_lora_trials())
    baseline.add_trial(baseline_trial())
    return study, baseline


def rec(
    number: int,
    f1: float | None,
    params: int | None,
    *,
    state: str = "COMPLETE",
    baseline: bool = False,
    seconds: float | None = None,
) -> TrialRecord:
    return TrialRecord(
        study="full" if baseline else "lora",
        number=number,
        state=state,
        baseline=baseline,
        mode="full" if baseline else "lora",
        val_f1=f1,
        trainable_params=params,
        train_time_s=seconds,
        wait_time_s=seconds,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- Pareto fronts, ties


def test_dominates_is_strict_on_one_axis() -> None:
    assert dominates((0.9, 100), (0.8, 100))  # same cost, better F1
    assert dominates((0.9, 100), (0.9, 150))  # same F1, cheaper
    assert dominates((0.9, 100), (0.8, 150))
    assert not dominates((0.9, 100), (0.9, 100))  # equal points never dominate each other
    assert not dominates((0.9, 200), (0.8, 100))  # a trade-off


def test_pareto_front_hand_checked_with_ties() -> None:
    records = [
        rec(0, 0.90, 100),  # A: on the front
        rec(1, 0.90, 100),  # B: equal to A, kept too
        rec(2, 0.90, 150),  # same F1 as A, costlier: weakly dominated, dropped
        rec(3, 0.85, 100),  # same cost as A, lower F1: dropped
        rec(4, 0.95, 200),  # on the front
        rec(5, 0.80, 50),  # cheapest: on the front
        rec(6, 0.95, 200, state="PRUNED"),  # pruned never enters, even when equal to #4
        rec(7, 0.99, None),  # no cost known: left out
        rec(8, None, 10),  # no F1 known: left out
        rec(9, 0.999, 1, state="FAIL"),  # failed never enters
        rec(10, 0.96, 150),  # dominates nothing on the front? it dominates #4 (better, cheaper)
        rec(0, 0.97, 1000, baseline=True),  # baseline: best F1, on the front
        rec(1, 0.96, 1000, baseline=True),  # second baseline run, dominated by the first
        rec(2, 0.97, 1000, baseline=True),  # equal to baseline #0: kept
    ]
    front = pareto_front(records, "trainable_params")
    assert [(r.study, r.number) for r in front] == [
        ("lora", 5),
        ("lora", 0),
        ("lora", 1),
        ("lora", 10),
        ("full", 0),
        ("full", 2),
    ]


def test_pareto_front_on_training_time_and_bad_cost() -> None:
    records = [
        rec(0, 0.80, 1, seconds=10.0),
        rec(1, 0.90, 1, seconds=10.0),  # dominates #0 on time (same time, better F1)
        rec(2, 0.95, 1, seconds=30.0),
        rec(3, 0.95, 1, seconds=20.0),  # same F1 as #2 and faster
        rec(0, 0.97, 1, seconds=300.0, baseline=True),
    ]
    front = pareto_front(records, "wait_time_s")
    assert [(r.study, r.number) for r in front] == [("lora", 1), ("lora", 3), ("full", 0)]
    with pytest.raises(ValueError, match="trainable_params, wait_time_s"):
        pareto_front(records, "flops")  # type: ignore[arg-type]


def test_pareto_front_empty_and_single() -> None:
    assert pareto_front([], "trainable_params") == []
    only = rec(0, 0.5, 10)
    assert pareto_front([only], "trainable_params") == [only]


def test_pareto_rows_have_the_contract_columns(studies) -> None:
    study, baseline = studies
    records = to_records(study.trials, "banking77") + to_records(
        baseline.trials, "banking77-full-ft", baseline=True
    )
    front = pareto_front(records, "trainable_params")
    rows = pareto_rows(front, ["lora_r", "learning_rate"])
    assert list(rows[0])[:6] == [
        "study",
        "trial",
        "val_f1",
        "test_f1",
        "trainable_params",
        "train_time_s",
    ]
    # F1 rises along a front ordered by cost, or it would not be a front.
    f1s = [row["val_f1"] for row in rows]
    assert f1s == sorted(f1s)
    assert rows[-1]["study"] == "banking77-full-ft"  # the baseline is the most accurate here


# ---------------------------------------------------------------- records and summary


def test_coercion_never_raises_on_odd_attributes() -> None:
    assert as_float("0.5") == 0.5
    assert as_float(float("nan")) is None
    assert as_float(True) is None
    assert as_float([1]) is None
    assert as_int(3.0) == 3
    assert as_int(3.5) is None
    trial = create_trial(
        state=TrialState.PRUNED,
        params={"lora_r": 8},
        distributions={"lora_r": SPACE["lora_r"]},
        intermediate_values={1: 0.4, 2: 0.6, 3: 0.55},
        user_attrs={
            "trainable_params": "abc",
            "train_time_s": float("inf"),
            "total_params": None,
            "val_f1": 0.6,  # the best epoch so far, as the objective records it every epoch
            "epochs_run": 3.0,  # a JSON storage may widen an int
        },
    )
    record = TrialRecord.from_trial(trial, "s")
    assert record.val_f1 == 0.6  # best intermediate value of an unfinished trial
    assert record.epochs_run == 3
    assert record.trainable_params is None and record.train_time_s is None
    assert record.mode is None and record.test_f1 is None and record.max_epochs is None


def test_summary_has_one_row_per_trial_of_both_studies(studies) -> None:
    study, baseline = studies
    records = to_records(study.trials, "banking77") + to_records(
        baseline.trials, "banking77-full-ft", baseline=True
    )
    rows = summary_rows(records)
    assert len(rows) == len(study.trials) + len(baseline.trials)
    columns = summary_columns(records)
    assert columns[:4] == ["study", "trial", "state", "mode"]
    for param in ("lora_r", "learning_rate", "lr_scheduler", "batch_size", "weight_decay"):
        assert param in columns
    assert columns[-2:] == ["val_f1", "test_f1"]
    assert rows[-1]["study"] == "banking77-full-ft" and rows[-1]["batch_size"] == 32
    assert {row["state"] for row in rows} == {"COMPLETE", "PRUNED", "FAIL", "RUNNING"}


def test_parameter_named_like_a_column_is_prefixed() -> None:
    record = TrialRecord("s", 0, "COMPLETE", False, "lora", params={"mode": "x", "lora_r": 4})
    assert summary_columns([record])[:6] == [
        "study",
        "trial",
        "state",
        "mode",
        "param_mode",
        "lora_r",
    ]
    row = summary_rows([record])[0]
    assert row["mode"] == "lora" and row["param_mode"] == "x"


def test_best_first_puts_complete_trials_first() -> None:
    records = [
        rec(0, 0.7, 1),
        rec(1, 0.99, 1, state="PRUNED"),
        rec(2, 0.9, 1),
        rec(3, None, 1, state="FAIL"),
        rec(0, 0.8, 1, baseline=True),
    ]
    order = [(r.study, r.number) for r in best_first(records)]
    assert order == [("lora", 2), ("full", 0), ("lora", 0), ("lora", 1), ("lora", 3)]


def test_best_record_breaks_ties_by_earliest_trial() -> None:
    records = [rec(3, 0.9, 1), rec(1, 0.9, 1), rec(2, 0.95, 1, state="PRUNED")]
    assert best_record(records, baseline=False).number == 1
    assert best_record(records, baseline=True) is None


def test_best_so_far_is_a_running_maximum() -> None:
    records = [rec(0, 0.5, 1), rec(1, 0.4, 1), rec(2, 0.9, 1, state="PRUNED"), rec(3, 0.7, 1)]
    assert best_so_far(records) == [(0, 0.5), (1, 0.5), (3, 0.7)]


# ---------------------------------------------------------------- savings and findings


def savings_record(number: int, state: str, run: int | None, budget: int | None) -> TrialRecord:
    return TrialRecord("lora", number, state, False, "lora", epochs_run=run, max_epochs=budget)


def test_pruning_savings_hand_checked() -> None:
    records = [
        savings_record(0, "COMPLETE", 6, 6),
        savings_record(1, "PRUNED", 2, 6),
        savings_record(2, "PRUNED", 1, 6),
        savings_record(3, "FAIL", 3, 6),  # not a pruning decision: excluded
        savings_record(4, "RUNNING", 2, 6),  # unfinished: excluded
        savings_record(5, "COMPLETE", 6, 6),
        TrialRecord("full", 0, "COMPLETE", True, "full", epochs_run=6, max_epochs=6),
    ]
    savings = pruning_savings(records)
    assert savings is not None
    assert (savings.epochs_run, savings.epoch_budget) == (6 + 2 + 1 + 6, 4 * 6)
    assert savings.used_fraction == pytest.approx(15 / 24)
    assert savings.saved_fraction == pytest.approx(9 / 24)
    assert (savings.n_trials, savings.n_pruned) == (4, 2)


def test_pruning_savings_none_without_a_countable_trial() -> None:
    assert pruning_savings([]) is None
    assert pruning_savings([savings_record(0, "RUNNING", 1, 6)]) is None
    assert pruning_savings([savings_record(0, "COMPLETE", 6, None)]) is None


def test_findings_hand_checked() -> None:
    lora = TrialRecord(
        "lora", 4, "COMPLETE", False, "lora", val_f1=0.91, test_f1=0.90,
        trainable_params=1_000_000, total_params=100_000_000, trainable_share_pct=1.0,
        train_time_s=140.0, setup_time_s=10.0, wait_time_s=150.0,
    )  # fmt: skip
    worse = TrialRecord("lora", 5, "COMPLETE", False, "lora", val_f1=0.80, test_f1=0.95)
    base = TrialRecord(
        "full", 0, "COMPLETE", True, "full", val_f1=0.93, test_f1=0.92,
        trainable_params=100_000_000, train_time_s=600.0, wait_time_s=600.0,
    )  # fmt: skip
    tops = {FANOVA: ("learning_rate", 0.7), PED_ANOVA: ("lora_r", 0.5)}
    findings = compare([lora, worse, base], tops)
    assert findings.best_lora is lora  # by validation F1, though #5 has the better test F1
    assert findings.baseline is base
    assert findings.delta_val_f1 == pytest.approx(-0.02)
    assert findings.delta_test_f1 == pytest.approx(-0.02)
    assert findings.lora_share_pct == 1.0
    assert findings.params_vs_baseline_pct == pytest.approx(1.0)
    assert findings.time_ratio == pytest.approx(0.25)
    assert findings.most_important == "learning_rate"  # a tie of votes: the first evaluator's


def test_findings_without_baseline_or_lora() -> None:
    findings = compare([rec(0, 0.5, 10)], {})
    assert findings.baseline is None and findings.delta_val_f1 is None
    assert findings.time_ratio is None and findings.most_important is None
    empty = compare([], {})
    assert empty.best_lora is None and empty.savings is None


# ---------------------------------------------------------------- per-class F1


def test_per_class_f1_matches_scikit_learn() -> None:
    counts = np.array(confusion(0.6, seed=3))
    counts[2, :] = 0  # a class absent from the test split
    counts[:, 3] = 0  # a class never predicted
    y_true = np.repeat(np.arange(len(LABELS)), counts.sum(axis=1))
    y_pred = np.concatenate([np.repeat(np.arange(len(LABELS)), row) for row in counts])
    expected = f1_score(y_true, y_pred, labels=range(len(LABELS)), average=None, zero_division=0)
    np.testing.assert_allclose(per_class_f1(counts), expected)
    assert row_normalised(counts)[2].tolist() == [0.0] * len(LABELS)


def test_compare_per_class_sorted_by_difference_and_matched_by_name() -> None:
    lora = Confusion(["a", "b", "c"], np.array([[5, 0, 0], [0, 2, 3], [0, 0, 5]]))
    base = Confusion(["c", "b", "a", "z"], np.eye(4, dtype=int) * 5)  # other order, extra label
    rows = compare_per_class(lora, base)
    assert [r.label for r in rows] == ["b", "c", "a"]
    # b: 2 hits of 5 examples and of 2 predictions: F1 = 2*2 / (5 + 2) = 4/7.
    assert rows[0].baseline_f1 == 1.0 and rows[0].difference == pytest.approx(4 / 7 - 1)


def test_confusion_of_reads_the_matrix_and_its_labels() -> None:
    def trial(**attrs: Any) -> FrozenTrial:
        return create_trial(value=0.5, user_attrs=attrs)

    assert confusion_of(None) is None
    assert confusion_of(trial()) is None
    named = confusion_of(trial(test_confusion=[[1, 0], [2, 3]], labels=["a", "b"]))
    assert named is not None and named.labels == ["a", "b"]
    assert named.counts.tolist() == [[1, 0], [2, 3]]


# ---------------------------------------------------------------- importance


def direction_trials(n: int = 60) -> list[FrozenTrial]:
    """F1 rises with `good` in the top trials and falls with `bad` in the bottom ones, so the best
    trials have `good` in common and the worst have `bad` in common; `noise` barely matters."""
    rng = np.random.default_rng(0)
    dist = FloatDistribution(0.0, 1.0)
    trials = []
    for _ in range(n):
        good, bad, noise = (float(v) for v in rng.random(3))
        f1 = 0.5 + 2 * max(0.0, good - 0.8) - 2 * max(0.0, bad - 0.8) + 0.001 * noise
        trials.append(
            create_trial(
                value=f1,
                params={"good": good, "bad": bad, "noise": noise},
                distributions={"good": dist, "bad": dist, "noise": dist},
            )
        )
    return trials


def test_ped_anova_ranks_the_parameter_that_drives_f1_up_first() -> None:
    trials = direction_trials()
    result = param_importances(trials)
    ped = [r for r in result.rows if r.evaluator == PED_ANOVA]
    assert ped[0].param == "good"
    assert ped[0].importance > 0.5
    assert sum(r.importance for r in ped) == pytest.approx(1.0)
    assert result.top()[PED_ANOVA][0] == "good"

    # The control shows the test can tell the directions apart: Optuna's evaluator with F1 as a
    # plain target treats low F1 as good and ranks the parameter of the worst trials first.
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    with pytest.warns(UserWarning):
        wrong = get_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(), target=lambda t: t.value
        )
    assert next(iter(wrong)) == "bad"


def test_fanova_ranks_signal_above_noise() -> None:
    result = param_importances(direction_trials())
    fanova = {r.param: r.importance for r in result.rows if r.evaluator == FANOVA}
    assert fanova["good"] > 10 * fanova["noise"]
    assert fanova["bad"] > 10 * fanova["noise"]


def test_importance_with_too_few_trials_gives_notes_not_errors() -> None:
    one = param_importances([lora_trial(8, 1e-4, [0.5, 0.6])])
    assert one.rows == [] and one.n_trials == 1
    assert len(one.notes) == 2 and all("at least" in note for note in one.notes)

    n = MIN_TRIALS[FANOVA]
    some = param_importances(direction_trials(n))
    assert {r.evaluator for r in some.rows} == {FANOVA}
    assert any(PED_ANOVA in note and "at least" in note for note in some.notes)


def test_importance_ignores_unfinished_trials_and_fixed_params() -> None:
    pruned = [lora_trial(8, 1e-4, [0.3], state=TrialState.PRUNED) for _ in range(20)]
    assert param_importances(pruned).rows == []
    fixed = [baseline_trial(f1=0.8 + 0.01 * i) for i in range(12)]
    result = param_importances(fixed)
    assert result.rows == [] and "no sampled parameter that varies" in result.notes[0]


# ---------------------------------------------------------------- figures


def test_pareto_figure_marks_front_and_baseline(studies) -> None:
    study, baseline = studies
    records = to_records(study.trials, "lora") + to_records(baseline.trials, "b", baseline=True)
    fig = pareto_figure_from_records(records, "trainable_params")
    assert isinstance(fig, go.Figure)
    names = [trace.name for trace in fig.data]
    assert {"LoRA trials", "Pareto front", "full fine-tuning baseline"} <= set(names)
    star = fig.data[names.index("full fine-tuning baseline")]
    assert star.marker.symbol == "star"
    assert any(
        shape.y0 == pytest.approx(BASELINE_F1) for shape in fig.layout.shapes
    )  # baseline line
    assert fig.layout.xaxis.type == "log"
    front = fig.data[names.index("Pareto front")]
    assert len(front.x) == len(pareto_front(records, "trainable_params"))

    timed = pareto_figure_from_records(records, "wait_time_s")
    assert timed.layout.xaxis.type != "log"
    empty = pareto_figure_from_records([], "wait_time_s")
    assert "No COMPLETE trial" in empty.layout.annotations[0].text
    with pytest.raises(ValueError):
        pareto_figure_from_records([], "epochs")  # type: ignore[arg-type]


# ---------------------------------------------------------------- write_reports end to end

ALL_FILES = {
    "summary.csv",
    "pareto_params.csv",
    "pareto_time.csv",
    "importance.csv",
    "test_noise.csv",
    "index.html",
    "REPORT.md",
    "pareto_params.png",
    "pareto_time.png",
    "importance.png",
    "history.png",
    "intermediate.png",
    "per_class_f1.png",
    "confusion_lora.png",
    "confusion_baseline.png",
}


def test_write_reports_writes_every_file(studies, tmp_path: Path) -> None:
    study, baseline = studies
    out = tmp_path / "nested" / "report"
    written = write_reports(study, baseline, out)

    assert {p.name for p in written} == ALL_FILES
    assert all(p.parent == out and p.stat().st_size > 0 for p in written)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = read_csv(out / "summary.csv")
    assert len(summary) == len(study.trials) + len(baseline.trials)
    records = to_records(study.trials, "banking77") + to_records(
        baseline.trials, "banking77-full-ft", baseline=True
    )
    for name, cost in (("pareto_params", "trainable_params"), ("pareto_time", "wait_time_s")):
        rows = read_csv(out / f"{name}.csv")
        expected = pareto_front(records, cost)
        assert [(r["study"], int(r["trial"])) for r in rows] == [
            (r.study, r.number) for r in expected
        ]
        assert all(r["study"] == "banking77-full-ft" or r["mode"] == "lora" for r in rows)
    importance = read_csv(out / "importance.csv")
    assert {r["evaluator"] for r in importance} == {FANOVA, PED_ANOVA}
    assert {r["param"] for r in importance} == {"lora_r", "learning_rate", "lr_scheduler"}

    report = (out / "REPORT.md").read_text()
    findings = report.split("## Findings")[-1]
    assert report.index("## Summary") < report.index("## Findings")
    best = best_record(records, baseline=False)
    assert f"banking77 #{best.number}" in findings
    assert f"validation {best.val_f1 - BASELINE_F1:+.4f}" in findings
    assert f"test {best.test_f1 - (BASELINE_F1 - 0.02):+.4f}" in findings
    assert f"a ratio of {best.wait_time_s / 600:.2f}" in findings
    assert "Most important parameter for validation F1: learning_rate" in findings
    savings = pruning_savings(records)
    assert f"{savings.epochs_run} epochs run of a budget of {savings.epoch_budget}" in findings
    # The table is best first, and the baseline row is marked.
    table = [line for line in report.splitlines() if line.startswith("| ")]
    # After header and rule: the baseline (F1 0.93) first and marked, then the best LoRA trial.
    assert table[2].startswith("| baseline (full FT)") and "| banking77-full-ft | 0 |" in table[2]
    assert f"| banking77 | {best.number} | COMPLETE" in table[3] and "best LoRA" in table[3]
    assert "RUNNING" in report and "FAIL" in report and "out of memory" in report

    page = (out / "index.html").read_text()
    # Offline: no script or stylesheet is fetched; plotly.js is inlined once.
    assert re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE) is None
    assert re.search(r"<link[^>]*\bhref\s*=", page, re.IGNORECASE) is None
    assert page.count("<script type='text/javascript'>") == 1
    assert page.count('id="figure-') == 8
    assert "Findings" in page and "baseline (full FT)" in page


def test_rerun_removes_figures_that_no_longer_apply(studies, tmp_path: Path) -> None:
    study, baseline = studies
    out = tmp_path / "report"
    write_reports(study, baseline, out)
    assert (out / "confusion_baseline.png").exists()
    written = write_reports(study, None, out)
    assert not (out / "confusion_baseline.png").exists()
    assert {p.name for p in written} == ALL_FILES - {"per_class_f1.png", "confusion_baseline.png"}


def test_report_without_baseline(tmp_path: Path) -> None:
    study = new_study("no-baseline")
    study.add_trials(realistic_lora_trials()[:6])
    out = tmp_path / "report"
    write_reports(study, None, out)
    report = (out / "REPORT.md").read_text()
    assert "No baseline study was given" in report
    assert "No COMPLETE full fine-tuning baseline run" in report
    assert "Per-class test F1: best LoRA vs baseline: Not drawn" in report
    assert len(read_csv(out / "summary.csv")) == 6
    assert all(row["study"] == "no-baseline" for row in read_csv(out / "pareto_params.csv"))


def test_report_with_no_complete_trial(tmp_path: Path) -> None:
    storage = optuna.storages.InMemoryStorage()
    study = new_study("banking77", storage)
    baseline = new_study("banking77-full-ft", storage)  # created, but the baseline never ran
    study.add_trial(lora_trial(8, 1e-4, [0.3, 0.4], state=TrialState.PRUNED))
    study.add_trial(lora_trial(16, 1e-3, [0.2], state=TrialState.RUNNING))
    out = tmp_path / "report"
    written = write_reports(study, baseline, out)

    assert {"summary.csv", "importance.csv", "index.html", "REPORT.md"} <= {p.name for p in written}
    assert read_csv(out / "pareto_params.csv") == []
    assert read_csv(out / "importance.csv") == []
    report = (out / "REPORT.md").read_text()
    for note in (
        "has no COMPLETE trial yet",
        "baseline study 'banking77-full-ft' has no COMPLETE trial",
        "still in progress",
        "Importance not computed: no COMPLETE trial yet",
    ):
        assert note in report
    assert "Pruning: 2 epochs run of a budget of 4 over 1 finished LoRA trials (1 pruned)" in report
    page = (out / "index.html").read_text()
    assert "has no COMPLETE trial yet" in page
    assert "Not drawn: no COMPLETE trial" in page


def test_report_with_a_single_trial(tmp_path: Path) -> None:
    study = new_study("single")
    study.add_trial(lora_trial(8, 1e-4, [0.6, 0.7]))
    out = tmp_path / "report"
    written = write_reports(study, None, out)
    names = {p.name for p in written}
    assert {"history.png", "summary.csv", "REPORT.md"} <= names
    report = (out / "REPORT.md").read_text()
    assert "fANOVA importance not computed: 1 COMPLETE trial(s)" in report
    assert read_csv(out / "summary.csv")[0]["val_f1"] == "0.7"


def test_report_of_an_empty_study(tmp_path: Path) -> None:
    study = new_study("empty")
    out = tmp_path / "report"
    written = write_reports(study, None, str(out))  # a str folder is accepted too
    assert {p.name for p in written} == {
        "summary.csv",
        "pareto_params.csv",
        "pareto_time.csv",
        "importance.csv",
        "test_noise.csv",
        "index.html",
        "REPORT.md",
    }
    assert "has no COMPLETE trial yet" in (out / "REPORT.md").read_text()


def test_write_reports_reads_a_study_twice_the_same_way(studies, tmp_path: Path) -> None:
    # fANOVA is seeded and everything else is deterministic: reports are reproducible.
    study, baseline = studies
    first = write_reports(study, baseline, tmp_path / "a")
    write_reports(study, baseline, tmp_path / "b")
    for path in first:
        if path.suffix in (".csv", ".md"):
            assert path.read_text() == (tmp_path / "b" / path.name).read_text()
