"""Is the comparison fair? Test-set noise, the baseline's sensitivity, pruning and load.

Statistics are checked against cases computed by hand or by brute force, independently of the
code under test; the end-to-end cases run the CLI on the tiny model.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from sklearn.metrics import f1_score

from objectives.occupancy import Occupancy
from objectives.predictions import decode_labels, encode_labels
from objectives.record import TrialRecord
from reports.comparison import compare, timing_notes
from reports.sensitivity import FALLBACK_MARGIN, fairness, fairness_lines, seed_noise
from reports.testnoise import (
    PairedTest,
    bootstrap_f1_difference,
    macro_f1_rows,
    mcnemar_exact,
    paired_test,
    verdict_line,
)
from study.cli import main

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- test-set noise


def test_macro_f1_rows_matches_scikit_learn_row_by_row() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=(5, 40))
    p = np.where(rng.random((5, 40)) < 0.6, y, rng.integers(0, 7, size=(5, 40)))
    expected = [f1_score(y[i], p[i], average="macro") for i in range(5)]
    np.testing.assert_allclose(macro_f1_rows(y, p, 7), expected)


@pytest.mark.parametrize(
    ("only_a", "only_b", "p"),
    [
        (8, 2, 112 / 1024),  # 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 2^10
        (0, 6, 2 / 64),  # 2 * P(X = 0), X ~ Bin(6, 1/2)
        (3, 3, 1.0),
    ],
)
def test_mcnemar_exact_against_hand_computed_binomials(only_a: int, only_b: int, p: float) -> None:
    both = 5  # examples both get right or both get wrong do not count
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * both
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * both
    assert mcnemar_exact(np.array(a), np.array(b)) == (only_a, only_b, pytest.approx(p))


def test_mcnemar_without_disagreement_is_p_one() -> None:
    same = np.array([True, False, True])
    assert mcnemar_exact(same, same) == (0, 0, 1.0)


def test_bootstrap_of_a_two_example_case_computed_by_hand() -> None:
    # Labels [0, 0]; a predicts [0, 0], b predicts [0, 1]. The four equally likely resamples
    # of the two examples give macro-F1(a) - macro-F1(b) = 0 ({0,0}: both 1), 1 ({1,1}: b
    # scores 0 on classes 0 and 1) and 2/3 twice ({0,1}, {1,0}: b scores (2/3 + 0) / 2 = 1/3).
    # P(0) = P(1) = 1/4 > 2.5%, so the percentile interval is exactly [0, 1].
    y, a, b = np.array([0, 0]), np.array([0, 0]), np.array([0, 1])
    assert bootstrap_f1_difference(y, a, b, 2, n_resamples=4000) == (0.0, 1.0)


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution() -> None:
    # Five examples: every one of the 5^5 resamples, scored with scikit-learn, is the exact
    # bootstrap distribution; the sampled percentile interval must sit at its 2.5% / 97.5%
    # quantiles.
    y = np.array([0, 1, 2, 1, 0])
    a = np.array([0, 1, 2, 2, 0])
    b = np.array([0, 2, 2, 1, 1])

    def difference(rows: tuple[int, ...]) -> float:
        i = list(rows)
        return f1_score(y[i], a[i], average="macro") - f1_score(y[i], b[i], average="macro")

    # macro-F1 ignores order: score each of the 126 multisets once, weigh it by its orderings
    resamples = [tuple(sorted(i)) for i in itertools.product(range(5), repeat=5)]
    scores = {rows: difference(rows) for rows in set(resamples)}
    exact = np.array([scores[rows] for rows in resamples])
    low, high = bootstrap_f1_difference(y, a, b, 3, n_resamples=20000)
    assert np.mean(exact < low) <= 0.025 + 0.005 and np.mean(exact <= low) >= 0.025 - 0.005
    assert np.mean(exact < high) <= 0.975 + 0.005 and np.mean(exact <= high) >= 0.975 - 0.005


def test_bootstrap_is_seeded_and_identical_models_give_zero() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    a = np.where(rng.random(300) < 0.8, y, 0)
    b = np.where(rng.random(300) < 0.7, y, 0)
    assert bootstrap_f1_difference(y, a, b, 5) == bootstrap_f1_difference(y, a, b, 5)
    assert bootstrap_f1_difference(y, a, a, 5) == (0.0, 0.0)


def test_paired_test_verdicts() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 10, 2000)
    good = np.where(rng.random(2000) < 0.95, y, (y + 1) % 10)
    bad = np.where(rng.random(2000) < 0.70, y, (y + 1) % 10)
    clear = paired_test(y, good, bad, 10)
    assert clear.verdict == "distinguishable" and clear.low > 0 and clear.p_value < 1e-6
    assert verdict_line(clear, "LoRA", "the baseline").startswith(
        "Distinguishable on this test set: LoRA is above the baseline"
    )
    same = paired_test(y, good, good, 10)
    assert same.verdict == "not distinguishable" and same.p_value == 1.0
    mixed = PairedTest(100, 0.8, 0.7, 0.01, 0.2, only_a=6, only_b=4, p_value=0.75)
    assert mixed.verdict == "mixed"


def test_predictions_round_trip_compactly() -> None:
    preds = np.arange(77).repeat(40)
    text = encode_labels(preds)
    assert text.startswith("u8:") and len(text) < 4200  # 3,080 predictions in ~4 KB
    np.testing.assert_array_equal(decode_labels(text), preds)
    wide = np.array([0, 300, 65535])
    np.testing.assert_array_equal(decode_labels(encode_labels(wide)), wide)
    for bad in (None, 3, "", "u8", "u32:AAAA", "u8:not base64!"):
        assert decode_labels(bad) is None


# ---------------------------------------------------------------- the baseline's sensitivity


def record(number: int, val_f1: float, *, factor: float | None = None, **kw) -> TrialRecord:
    """A COMPLETE trial: LoRA unless `factor` is given (a baseline run at factor x the lr)."""
    base = factor is not None
    return TrialRecord(
        study="s-full-ft" if base else "s",
        number=number,
        state="COMPLETE",
        baseline=base,
        mode="full" if base else "lora",
        params={"learning_rate": 1e-4 * (factor or 1.0)},
        val_f1=val_f1,
        test_f1=kw.pop("test_f1", val_f1 - 0.01),
        role=None if not base else ("fixed" if factor == 1.0 else "neighbour"),
        lr_factor=factor,
        **kw,
    )


def test_seed_noise_margin_computed_by_hand() -> None:
    # s = 0.02 over 3 seeds; t(0.975, 2) = 4.302653; margin = t * s * sqrt(2)
    noise = seed_noise([0.80, 0.82, 0.84])
    assert noise.seeds == 3
    assert noise.margin == pytest.approx(4.302653 * 0.02 * 2**0.5, rel=1e-5)
    assert seed_noise([0.8]).margin == FALLBACK_MARGIN and seed_noise([]).seeds == 0


def test_a_neighbour_beyond_the_noise_raises_the_warning_and_a_second_gap() -> None:
    records = [
        record(0, 0.80),  # best LoRA
        record(1, 0.60),
        record(0, 0.55, factor=1.0),  # the fixed run
        record(1, 0.40, factor=1 / 3),
        record(2, 0.78, factor=3.0),
    ]
    check = fairness(records)
    assert check.fixed is records[2] and check.beaten_by is records[4]
    text = "\n".join(fairness_lines(check, "s"))
    assert "WARNING: the baseline is not tuned" in text and "lr x 3" in text
    assert "minus the fixed run: validation +0.2500" in text
    assert "minus the best of the three (s-full-ft #2, lr x 3): validation +0.0200" in text
    # the yardstick of the findings, the fronts and the per-class comparison stays the fixed run
    assert compare(records, {}).baseline is records[2]


def test_a_neighbour_within_the_measured_noise_leaves_the_baseline_standing() -> None:
    records = [record(0, 0.80), record(0, 0.55, factor=1.0), record(2, 0.58, factor=3.0)]
    assert fairness(records).beaten_by is records[2]  # 0.03 > one point: unknown noise
    check = fairness(records, [0.50, 0.55, 0.60])  # seeds spread: margin 0.30
    assert check.beaten_by is None
    text = "\n".join(fairness_lines(check, "s"))
    assert "holds" in text and "WARNING" not in text and "3 seed repeats" in text


def test_without_neighbours_the_report_says_how_to_run_the_check() -> None:
    [line] = fairness_lines(fairness([record(0, 0.8), record(0, 0.5, factor=1.0)]), "my-study")
    assert line.startswith("Not checked") and "baseline --study-name my-study --sensitivity" in line


# ---------------------------------------------------------------- load and timing


def test_occupancy_counts_other_live_runs_and_forgets_dead_ones(tmp_path: Path) -> None:
    with Occupancy("cuda:0", tmp_path) as one, Occupancy("cuda:0", tmp_path) as two:
        assert one.others() == 1 and two.others() == 1
        with Occupancy("cuda:1", tmp_path) as elsewhere:
            assert elsewhere.others() == 0 and one.others() == 1
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
        leftover = one.dir / f"{dead.stdout.strip()}-gone"
        leftover.touch()
        assert one.others() == 1 and not leftover.exists()
    assert not any((tmp_path / "cuda_0").iterdir())


def test_timing_notes_flag_times_measured_under_different_load() -> None:
    lora = record(0, 0.8, wait_time_s=10.0, device="cpu", concurrent_trials=1, torch_threads=1)
    base = record(0, 0.6, factor=1.0, wait_time_s=30.0, device="cpu", concurrent_trials=0,
                  torch_threads=2)  # fmt: skip
    notes = timing_notes([lora, base], compare([lora, base], {}))
    assert len(notes) == 2
    assert "time front compares load" in notes[0] and "--workers 1" in notes[0]
    assert "beside 1 other trial(s), 1 torch thread(s)" in notes[1] and "alone" in notes[1]
    same = record(0, 0.6, factor=1.0, wait_time_s=30.0, device="cpu", concurrent_trials=1,
                  torch_threads=1)  # fmt: skip
    assert timing_notes([lora, same], compare([lora, same], {})) == []


# ---------------------------------------------------------------- end to end on the tiny model


def cli_args(model: Path, data: Path, url: str, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--data-dir", str(data), "--storage", url, "--device", "cpu",
        "--no-progress", *extra,
    ]  # fmt: skip


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_trial_that_ran_every_epoch_is_never_pruned(
    tiny_model_dir: Path, tiny_data_dir: Path, epochs: int
) -> None:
    from helpers import tiny_context

    from objectives.config import TrainConfig
    from objectives.objective import LoraObjective
    from objectives.space import load_space

    ctx = tiny_context(tiny_data_dir, tiny_model_dir)
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    objective = LoraObjective(load_space(None), TrainConfig(epochs=epochs, batch_size=64), ctx)
    study.optimize(objective, n_trials=2)
    for t in study.trials:
        # a pruner that always says stop may stop a trial before its last epoch, never after
        assert t.user_attrs["epochs_run"] == 1
        assert t.state == (TrialState.COMPLETE if epochs == 1 else TrialState.PRUNED)
    assert not [
        t
        for t in study.trials
        if t.state == TrialState.PRUNED and t.user_attrs["epochs_run"] == t.user_attrs["max_epochs"]
    ]


def test_sensitivity_runs_join_the_baseline_study_as_neighbours(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    args = cli_args(tiny_model_dir, tiny_data_dir, url, "--epochs", "2")
    assert main(["optimize", *args, "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "Is the baseline fair?" in out and "Not checked" in out
    assert "\nIs the search space big enough?\n- " in out  # the study's space, judged at the end

    assert main(["baseline", *args, "--sensitivity"]) == 0
    out = capsys.readouterr().out
    assert "lr / 3" in out and "lr x 3" in out and "Not checked" not in out
    trials = optuna.load_study(study_name="banking77-full-ft", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    roles = {(t.user_attrs["baseline_role"], round(t.user_attrs["lr_factor"], 4)) for t in trials}
    assert roles == {("fixed", 1.0), ("neighbour", 0.3333), ("neighbour", 3.0)}
    lrs = sorted(t.params["learning_rate"] for t in trials)
    assert lrs == pytest.approx([1e-4 / 3, 1e-4, 3e-4])
    fixed = next(t for t in trials if t.user_attrs["baseline_role"] == "fixed")
    assert fixed.number == 0

    # Nothing runs twice: neither the fixed run nor its neighbours.
    assert main(["optimize", *args, "--n-trials", "1", "--baseline-sensitivity"]) == 0
    assert len(optuna.load_study(study_name="banking77-full-ft", storage=url).trials) == 3

    out_dir = tmp_path / "report"
    assert main(["report", "--storage", url, "--out", str(out_dir)]) == 0
    md = (out_dir / "REPORT.md").read_text()
    assert "## Is the baseline fair?" in md and "lr x 3, banking77-full-ft #2" in md
    assert "## Is the difference real on this test set?" in md and "McNemar exact p" in md
    assert "baseline neighbour (lr x 3)" in md
    assert "## Is the search space big enough?\n\n- " in md
    rows = (out_dir / "test_noise.csv").read_text().splitlines()
    assert rows[0].startswith("lora_trial,why,against") and len(rows) >= 2
    assert all(",banking77-full-ft #0," in row for row in rows[1:])  # against the fixed run

    from optuna_dashboard import get_note

    note = get_note(optuna.load_study(study_name="banking77", storage=url))
    assert "### Is the baseline fair?" in note and "lr / 3" in note
    assert "### Is the search space big enough?\n\n- " in note
