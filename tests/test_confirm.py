"""`confirm`: seed repeats of the best trials and the baseline, their intervals and the verdict."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats

from reports.confirm import confirmed_configs, t_interval, verdict, welch_interval
from study.cli import main
from study.confirm import ConfirmObjective, Job, confirm_name, plan_jobs, queue_jobs

# ----------------------------------------------------------------------------- statistics


def test_t_interval_by_hand() -> None:
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    one = t_interval([0.5])
    assert one.mean == 0.5 and one.low is None and one.half_width is None


def test_welch_interval_equals_scipys() -> None:
    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.89, 0.93]
    ours = welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert ours.mean == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high))


def run(source: int, seed: int, val: float, test: float, mode: str = "lora", failed=False):
    study = "s-full-ft" if mode == "full" else "s"
    return create_trial(
        state=TrialState.FAIL if failed else TrialState.COMPLETE,
        value=None if failed else val,
        params={"learning_rate": 1e-3},
        distributions={"learning_rate": FloatDistribution(1e-3, 1e-3)},
        user_attrs={
            "source_study": study,
            "source_trial": source,
            "seed": seed,
            "source_mode": mode,
            "source_params": {"learning_rate": 1e-3},
            "test_f1": test,
            "train_time_s": 10.0 + seed,
            "trainable_params": 100 if mode == "lora" else 10_000,
            "trainable_share_pct": 1.0,
        },  # fmt: skip
    )


def test_configs_group_by_source_and_rank_by_mean_validation_f1() -> None:
    trials = [
        run(7, 43, 0.80, 0.79),
        run(7, 44, 0.82, 0.81),
        run(3, 43, 0.85, 0.70),  # higher val F1, lower test F1: val F1 decides the order
        run(3, 44, 0.84, 0.71),
        run(0, 43, 0.90, 0.90, mode="full"),
        run(0, 44, 0.91, 0.91, mode="full"),
    ]
    failed = run(3, 45, 0.99, 0.99, failed=True)  # FAIL runs never count
    configs = confirmed_configs([*trials, failed])
    assert [(c.source_study, c.source_trial) for c in configs] == [
        ("s-full-ft", 0),
        ("s", 3),
        ("s", 7),
    ]
    lora3 = configs[1]
    assert lora3.seeds == (43, 44) and lora3.val_f1.mean == pytest.approx(0.845)
    assert lora3.test_values == (0.70, 0.71)
    v = verdict(configs)
    assert v.lora is lora3  # the best LoRA by validation F1, not by test F1
    assert v.test_diff is not None and v.test_diff.high < 0
    assert v.text.startswith("Distinguishable") and "below" in v.text


def test_overlapping_runs_are_not_distinguishable_and_one_seed_cannot_tell() -> None:
    close = [
        run(1, 43, 0.90, 0.90),
        run(1, 44, 0.91, 0.93),
        run(0, 43, 0.90, 0.91, mode="full"),
        run(0, 44, 0.90, 0.92, mode="full"),
    ]
    assert verdict(confirmed_configs(close)).text.startswith("Not distinguishable")
    assert verdict(confirmed_configs(close[::2])).text.startswith("Cannot tell")
    assert verdict(confirmed_configs(close[:2])).text.startswith("No comparison")


# ----------------------------------------------------------------------------- the command


def optimize(model: Path, data: Path, url: str, n_trials: int = 3) -> None:
    argv = ["optimize", "--model", str(model), "--data-dir", str(data), "--storage", url]
    argv += ["--device", "cpu", "--no-progress", "--epochs", "2", "--pruner", "none"]
    assert main([*argv, "--n-trials", str(n_trials), "--keep", "none"]) == 0


def confirm_args(model: Path, data: Path, url: str, *extra: str) -> list[str]:
    return [
        "confirm", "--model", str(model), "--data-dir", str(data), "--storage", url,
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


# the tiny model's runs often agree to the last digit: scipy says its interval is imprecise
@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")
def test_confirm_end_to_end_resume_and_report(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, capsys
) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    optimize(tiny_model_dir, tiny_data_dir, url)
    source = optuna.load_study(study_name="banking77", storage=url)
    best = sorted(
        (t for t in source.trials if t.state == TrialState.COMPLETE),
        key=lambda t: (-t.value, t.number),
    )[:2]
    capsys.readouterr()

    argv = confirm_args(tiny_model_dir, tiny_data_dir, url, "--top", "2", "--seeds", "2")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "± " in out and "banking77-full-ft#0" in out

    study = optuna.load_study(study_name=confirm_name("banking77"), storage=url)
    runs = study.get_trials(deepcopy=False)
    assert len(runs) == 6 and all(t.state == TrialState.COMPLETE for t in runs)
    keys = {
        (t.user_attrs["source_study"], t.user_attrs["source_trial"], t.user_attrs["seed"])
        for t in runs
    }
    expected = {("banking77", t.number, s) for t in best for s in (43, 44)}
    base_key = ("banking77-full-ft", 0)
    assert keys == expected | {(*base_key, 43), (*base_key, 44)}
    for t in runs:
        src = t.user_attrs["source_study"], t.user_attrs["source_trial"]
        if src[0] == "banking77":
            source_trial = source.trials[src[1]]
            assert t.user_attrs["source_params"] == source_trial.params
            assert t.user_attrs["mode"] == "lora"
        else:
            assert t.user_attrs["mode"] == "full"
        assert t.user_attrs["epochs_run"] == 2 and "test_f1" in t.user_attrs
        assert sorted(t.intermediate_values) == [1, 2]

    # a rerun finds every run done and trains nothing
    assert main(argv) == 0
    assert len(study.get_trials(deepcopy=False)) == 6

    out_dir = tmp_path / "report"
    assert main(["report", "--storage", url, "--out", str(out_dir)]) == 0
    rows = (out_dir / "confirm.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and "val_f1_ci" in rows[0]
    md = (out_dir / "REPORT.md").read_text()
    assert "Confirmation: seed repeats" in md and "Welch" in md
    # The verdict worked out here from the runs: Welch's 95% interval of the best LoRA
    # configuration (highest mean validation F1) minus the baseline, in test F1.
    by_source: dict[tuple[str, int], list[optuna.trial.FrozenTrial]] = {}
    for t in runs:
        by_source.setdefault((t.user_attrs["source_study"], t.user_attrs["source_trial"]), [])
        by_source[t.user_attrs["source_study"], t.user_attrs["source_trial"]].append(t)
    lora = min(
        (k for k in by_source if k[0] == "banking77"),
        key=lambda k: (-sum(t.value for t in by_source[k]) / len(by_source[k]), k[1]),
    )
    tests = [[t.user_attrs["test_f1"] for t in by_source[k]] for k in (lora, base_key)]
    ci = stats.ttest_ind(*tests, equal_var=False).confidence_interval(0.95)
    kind = "Distinguishable" if ci.low > 0 or ci.high < 0 else "Not distinguishable"
    [line] = [line for line in md.splitlines() if "istinguishable: the best LoRA" in line]
    assert line.startswith(f"- {kind}: the best LoRA configuration (LoRA banking77#{lora[1]})")
    assert line == f"- {verdict(confirmed_configs(runs)).text}"


def test_interrupted_confirm_trains_only_what_is_missing(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    from helpers import tiny_context

    url = f"sqlite:///{tmp_path}/optuna.db"
    optimize(tiny_model_dir, tiny_data_dir, url, n_trials=2)
    lora = optuna.load_study(study_name="banking77", storage=url)
    base = optuna.load_study(study_name="banking77-full-ft", storage=url)
    jobs = plan_jobs(lora, base, top=1, seeds=[43, 44], epochs=1)
    assert len(jobs) == 4 and {j.mode for j in jobs} == {"lora", "full"}

    confirm = optuna.create_study(
        study_name=confirm_name("banking77"), storage=url, direction="maximize"
    )
    assert queue_jobs(confirm, jobs) == 4
    assert queue_jobs(confirm, jobs) == 4  # queued runs are not queued twice
    ctx = tiny_context(tiny_data_dir, tiny_model_dir)
    confirm.optimize(ConfirmObjective(ctx, mixed_precision=False), n_trials=1)  # then "killed"
    [done] = confirm.get_trials(states=(TrialState.COMPLETE,))
    assert Job.from_attrs(done.user_attrs) == jobs[0]

    argv = confirm_args(tiny_model_dir, tiny_data_dir, url, "--top", "1", "--seeds", "2")
    assert main([*argv, "--epochs", "1"]) == 0
    trials = confirm.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)


def test_confirm_processes_share_the_queue_and_stop_when_it_is_empty(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """While this `confirm` trains a run, another process takes the next queued run and
    finishes it: this one stops when the queue is empty instead of starting a trial that
    names no run."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    optimize(tiny_model_dir, tiny_data_dir, url, n_trials=2)
    train = ConfirmObjective.__call__
    taken_elsewhere = []

    def train_and_another_takes_one(self: ConfirmObjective, trial: optuna.Trial) -> float:
        value = train(self, trial)
        if trial.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            other = trial.study.ask()  # pops the next queued run, as another process would
            trial.study.tell(other, train(self, other))
            taken_elsewhere.append(other.number)
        return value

    monkeypatch.setattr(ConfirmObjective, "__call__", train_and_another_takes_one)
    argv = confirm_args(tiny_model_dir, tiny_data_dir, url, "--top", "1", "--seeds", "2")
    assert main([*argv, "--epochs", "1"]) == 0
    trials = optuna.load_study(study_name=confirm_name("banking77"), storage=url).trials
    assert taken_elsewhere == [1, 3]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(Job.from_attrs(t.user_attrs) is not None for t in trials)


def test_one_confirm_study_holds_configurations_with_different_choices(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """LoRA runs with different schedulers and a baseline with an int batch size, side by side
    (as parameters, Optuna would refuse a categorical with other choices in the same study)."""
    from helpers import tiny_context

    lora = {"lora_r": 4, "learning_rate": 1e-3}
    jobs = [
        Job("s", 0, "lora", {**lora, "lr_scheduler": "linear"}, 1, 43),
        Job("s", 1, "lora", {**lora, "lr_scheduler": "cosine", "batch_size": 16}, 1, 43),
        Job("s-full-ft", 0, "full", {"lr_scheduler": "linear", "batch_size": 32}, 1, 43),
    ]
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/c.db", direction="maximize")
    assert queue_jobs(study, jobs) == 3
    study.optimize(ConfirmObjective(tiny_context(tiny_data_dir, tiny_model_dir), False), 3)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [Job.from_attrs(t.user_attrs) for t in trials] == jobs
    assert [t.user_attrs["mode"] for t in trials] == ["lora", "lora", "full"]


def test_confirm_refuses_bad_input_and_writes_nothing(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, capsys
) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    argv = confirm_args(tiny_model_dir, tiny_data_dir, url)
    assert main(argv) == 2  # no such storage file: not created
    assert not (tmp_path / "optuna.db").exists()
    optimize(tiny_model_dir, tiny_data_dir, url, n_trials=1)
    capsys.readouterr()
    assert main([*argv, "--study-name", "other"]) == 2
    assert main([*argv, "--max-train-samples", "100"]) == 2  # other data than the study's
    assert "data_fingerprint" in capsys.readouterr().err
    assert main([*argv, "--top", "0"]) == 2
    names = optuna.get_all_study_names(url)
    assert confirm_name("banking77") not in names
