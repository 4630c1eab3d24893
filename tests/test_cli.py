"""End to end through the command line, on the tiny BERT and the tiny intent data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study.cli import main

ATTRS = {
    "mode", "trainable_params", "total_params", "trainable_share_pct", "train_time_s",
    "epochs_run", "best_epoch", "val_f1", "val_accuracy", "model", "device", "seed",
    "data_fingerprint",
}  # fmt: skip
COMPLETE_ATTRS = ATTRS | {"test_f1", "test_accuracy", "peak_mem_mb", "labels", "test_confusion"}
ROOT = Path(__file__).resolve().parents[1]


def run_args(model: Path, data: Path, url: str, *extra: str) -> list[str]:
    return [
        "optimize", "--model", str(model), "--data-dir", str(data), "--storage", url,
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_help_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "study", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("optimize", "baseline"):
        assert command in out.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "study", "optimize", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    flags = ("--study-name", "--storage", "--n-trials", "--timeout", "--model", "--data-dir",
             "--max-train-samples", "--epochs", "--seed", "--device", "--pruner", "--sampler",
             "--space")  # fmt: skip
    assert all(f in sub.stdout for f in flags)


def test_optimize_end_to_end_and_resume(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/fresh/optuna.db"
    args = run_args(tiny_model_dir, tiny_data_dir, url, "--epochs", "3")
    assert main([*args, "--n-trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "val F1" in out and "full" in out and "lora" in out

    study = optuna.load_study(study_name="banking77", storage=url)
    assert len(study.trials) == 3
    assert study.metric_names == ["val_macro_f1"]
    for t in study.trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert set(t.params) == {"lora_r", "learning_rate", "lr_scheduler"}
        assert ATTRS <= set(t.user_attrs)
        runs = t.user_attrs["epochs_run"]
        assert sorted(t.intermediate_values) == list(range(1, runs + 1))
        assert t.user_attrs["mode"] == "lora" and t.user_attrs["device"] == "cpu"
        assert 0 < t.user_attrs["trainable_share_pct"] < 100
        if t.state == TrialState.COMPLETE:
            assert COMPLETE_ATTRS <= set(t.user_attrs)
            assert t.value == max(t.intermediate_values.values()) == t.user_attrs["val_f1"]
            assert runs == 3

    base = optuna.load_study(study_name="banking77-full-ft", storage=url)
    [b] = base.trials
    assert b.state == TrialState.COMPLETE and COMPLETE_ATTRS <= set(b.user_attrs)
    assert b.params == {
        "learning_rate": 1e-4, "lr_scheduler": "linear", "batch_size": 32, "weight_decay": 0.05
    }  # fmt: skip
    assert b.user_attrs["mode"] == "full" and b.user_attrs["trainable_share_pct"] == 100.0
    assert b.user_attrs["data_fingerprint"] == study.trials[0].user_attrs["data_fingerprint"]

    # The same command again continues the study; the baseline is not run twice.
    assert main([*args, "--n-trials", "2"]) == 0
    assert len(optuna.load_study(study_name="banking77", storage=url).trials) == 5
    assert len(optuna.load_study(study_name="banking77-full-ft", storage=url).trials) == 1


def test_pruning_stops_a_hopeless_trial(
    minilm_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    # Learning rates that learn, then ones that cannot move the weights at all, queued in that
    # order so the median pruner (5 start-up trials) must stop the late hopeless ones. MiniLM,
    # not the random tiny BERT: LoRA on a random frozen encoder learns for some seeds only.
    space = tmp_path / "space.toml"
    space.write_text(
        "[learning_rate]\nchoices = [3e-3, 1e-7]\n[batch_size]\nchoices = [16]\n"
        '[lr_scheduler]\nchoices = ["constant"]\n[lora_r]\nchoices = [8]\n'
    )
    url = f"sqlite:///{tmp_path}/optuna.db"
    queued = optuna.create_study(study_name="banking77", storage=url, direction="maximize")
    for lr in [3e-3, 3e-3, 3e-3, 3e-3, 1e-7, 1e-7, 1e-7]:
        queued.enqueue_trial({"learning_rate": lr})
    args = run_args(
        minilm_dir, tiny_data_dir, url, "--epochs", "2", "--space", str(space), "--keep", "none"
    )
    assert main([*args, "--n-trials", "7", "--pruner", "median"]) == 0
    trials = optuna.load_study(study_name="banking77", storage=url).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [t.number for t in pruned] == [5, 6], [
        (t.params, t.state, t.intermediate_values) for t in trials
    ]
    assert all(t.params["learning_rate"] == 1e-7 for t in pruned)
    assert all(t.user_attrs["epochs_run"] < 2 for t in pruned)
    assert all("test_f1" not in t.user_attrs for t in pruned)
    assert min(t.value for t in complete if t.params["learning_rate"] == 3e-3) > max(
        v for t in pruned for v in t.intermediate_values.values()
    )


def _bytes(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-trials", "0"], "--n-trials must be a positive number"),
        (["--epochs", "-1"], "--epochs must be a positive number"),
        (["--data-dir", "/nonexistent/banking"], "data folder not found"),
        (["--storage", "postgres://u:secret@localhost/db"], "postgresql://"),
        (["--space", "BAD"], "search-space file not found"),
        (["--max-train-samples", "100"], "was made with data_fingerprint"),
        (["--model", "/nonexistent/model", "--study-name", "new"], "cannot load model"),
        (["--model", "/nonexistent/model"], "was made with model"),  # the study's is another
    ],
)
def test_bad_input_is_one_line_exit_2_and_storage_untouched(
    tiny_model_dir: Path,
    tiny_data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    args = run_args(tiny_model_dir, tiny_data_dir, url, "--epochs", "1")
    assert main([*args, "--n-trials", "1"]) == 0
    capsys.readouterr()
    before = _bytes(db)
    # bad values come last so they override the good ones above
    code = main([*args, "--n-trials", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "secret" not in err
    assert _bytes(db) == before


def test_real_entry_point_exit_code(tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path):
    env = {**os.environ, "BANKING77_DATA_DIR": str(tiny_data_dir)}
    cmd = [sys.executable, "-m", "study", "baseline", "--model", str(tiny_model_dir),
           "--storage", f"sqlite:///{tmp_path}/o.db", "--epochs", "1", "--no-progress"]  # fmt: skip
    ok = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "full" in ok.stdout
    bad = subprocess.run([*cmd, "--epochs", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --epochs")


def test_report_command_writes_the_reports(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    assert (
        main(run_args(tiny_model_dir, tiny_data_dir, url, "--epochs", "2", "--n-trials", "2")) == 0
    )
    out = tmp_path / "report"
    assert main(["report", "--storage", url, "--out", str(out)]) == 0
    for name in ("summary.csv", "pareto_params.csv", "pareto_time.csv", "importance.csv",
                 "index.html", "REPORT.md", "pareto_params.png"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = (out / "summary.csv").read_text()
    assert "banking77-full-ft" in summary and summary.count("\n") == 1 + 3  # header + 2 + baseline
    capsys.readouterr()
    assert main(["report", "--storage", url, "--study-name", "nope", "--out", str(out)]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err
    assert main(["report", "--storage", f"sqlite:///{tmp_path}/missing.db"]) == 2
    assert not (tmp_path / "missing.db").exists()


def test_timeout_stops_starting_trials(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """`--timeout T`: no trial starts later than T seconds after the LoRA trials began, the
    one in flight finishes, and the call ends with exit code 0 well short of `--n-trials`."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    timeout_s = 4.0
    args = run_args(tiny_model_dir, tiny_data_dir, url, "--epochs", "2", "--keep", "none")
    assert main([*args, "--n-trials", "50", "--timeout", str(timeout_s)]) == 0
    trials = optuna.load_study(study_name="banking77", storage=url).trials
    assert 1 <= len(trials) < 50
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # the clock starts at or before the first trial, so every start is within T of the first
    first = min(t.datetime_start for t in trials)
    latest = max((t.datetime_start - first).total_seconds() for t in trials)
    assert latest <= timeout_s, [t.datetime_start for t in trials]


def _sampled(url: str) -> list[dict]:
    return [t.params for t in optuna.load_study(study_name="banking77", storage=url).trials]


def test_the_same_sampler_seed_gives_the_same_trials(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Two runs with one --sampler-seed propose the same parameters in the same order (so
    separate processes need seeds of their own); another seed proposes others."""
    args = ["--epochs", "1", "--keep", "none", "--n-trials", "4"]
    urls = [f"sqlite:///{tmp_path}/{name}.db" for name in ("a", "b", "c")]
    for url, seed in zip(urls, ("7", "7", "8"), strict=True):
        argv = [*run_args(tiny_model_dir, tiny_data_dir, url, *args), "--sampler-seed", seed]
        assert main(argv) == 0
    same, again, other = (_sampled(url) for url in urls)
    assert len(same) == 4 and same == again
    assert other != same
