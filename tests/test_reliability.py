"""Reliability: interrupted and killed runs, failing trials, the mixing guard, bad input.

Subprocess tests drive the real `python -m study` on the tiny BERT, as a user would.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from conftest import make_rows, write_intent_csv
from helpers import default_sigint, tiny_context
from optuna.trial import TrialState

from objectives import objective as objective_module
from objectives.config import LORA_DEFAULTS
from objectives.objective import TRIAL_FAILURES, LoraObjective
from objectives.space import ParamSpec, Space
from study.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(model: Path, data: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "study", "optimize", "--model", str(model), "--data-dir", str(data),
        "--storage", url, "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def trials_by_state(db: Path) -> dict[str, list[tuple[str, int]]]:
    """{state: [(study, number), ...]} read with plain sqlite3, safe while a writer runs."""
    with sqlite3.connect(db, timeout=30) as con:
        rows = con.execute(
            "SELECT s.study_name, t.number, t.state FROM trials t JOIN studies s USING (study_id)"
        ).fetchall()
    out: dict[str, list[tuple[str, int]]] = {}
    for study, number, state in rows:
        out.setdefault(state, []).append((study, number))
    return out


def running_trial_is_training(db: Path) -> bool:
    """A RUNNING trial has reported an epoch: its parameters are all stored."""
    with sqlite3.connect(db, timeout=30) as con:
        (n,) = con.execute(
            "SELECT COUNT(*) FROM trial_intermediate_values JOIN trials USING (trial_id)"
            " WHERE trials.state = 'RUNNING'"
        ).fetchone()
    return n > 0


def wait_for(predicate, timeout: float = 600.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        try:
            if predicate():
                return
        except sqlite3.OperationalError:  # tables not created yet
            pass
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_ctrl_c_during_a_trial_stops_cleanly(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "o.db"
    proc = subprocess.Popen(
        cli(tiny_model_dir, tiny_data_dir, f"sqlite:///{db}", "--epochs", "200", "--n-trials", "1"),
        cwd=ROOT,
        preexec_fn=default_sigint,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: db.exists() and trials_by_state(db).get("RUNNING"), proc=proc)
    time.sleep(0.5)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    states = trials_by_state(db)
    assert "RUNNING" not in states and len(states["FAIL"]) == 1


def test_kill_9_then_resume_retries_the_trial(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "o.db"
    url = f"sqlite:///{db}"
    # short heartbeat so the test need not wait the default 30 s grace period
    flags = ("--epochs", "4", "--heartbeat-interval", "1", "--grace-period", "3", "--seed", "5")
    proc = subprocess.Popen(
        cli(tiny_model_dir, tiny_data_dir, url, *flags, "--n-trials", "3"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def one_done_one_running() -> bool:
        s = trials_by_state(db)
        done = [t for st in ("COMPLETE", "PRUNED") for t in s.get(st, []) if t[0] == "banking77"]
        running = [t for t in s.get("RUNNING", []) if t[0] == "banking77"]
        return len(done) >= 1 and len(running) == 1 and running_trial_is_training(db)

    wait_for(one_done_one_running, proc=proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    study = optuna.load_study(study_name="banking77", storage=url)
    killed = next(t for t in study.trials if t.state == TrialState.RUNNING)
    done_before = [t for t in study.trials if t.state.is_finished()]
    baseline_before = optuna.load_study(study_name="banking77-full-ft", storage=url).trials

    time.sleep(4)  # past the grace period
    resumed = subprocess.run(
        cli(tiny_model_dir, tiny_data_dir, url, *flags, "--n-trials", str(3 - len(done_before))),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    trials = optuna.load_study(study_name="banking77", storage=url).trials
    assert trials[killed.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params
    assert retry[0].state.is_finished() and retry[0].state != TrialState.FAIL
    # finished trials and the baseline are untouched; the study reaches the trials asked for
    for before in done_before:
        after = trials[before.number]
        assert (after.state, after.value, after.params, after.user_attrs) == (
            before.state, before.value, before.params, before.user_attrs
        )  # fmt: skip
    assert optuna.load_study(study_name="banking77-full-ft", storage=url).trials == baseline_before
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3


# ----------------------------------------------------------------------------- failing trials


@pytest.fixture(scope="module")
def ctx(tiny_data_dir: Path, tiny_model_dir: Path):
    return tiny_context(tiny_data_dir, tiny_model_dir)


def run_lr_trials(ctx, lrs: list[float], epochs: int = 2) -> optuna.Study:
    space = Space((ParamSpec("learning_rate", choices=tuple(lrs)),))
    study = optuna.create_study(direction="maximize")
    for lr in lrs:
        study.enqueue_trial({"learning_rate": lr})
    objective = LoraObjective(space, replace(LORA_DEFAULTS, epochs=epochs), ctx)
    study.optimize(objective, n_trials=len(lrs), catch=TRIAL_FAILURES)
    return study


def test_nan_loss_fails_only_that_trial(ctx) -> None:
    study = run_lr_trials(ctx, [1e-3, 1e6, 1e-3])  # 1e6 blows the weights up to inf/NaN
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "loss became" in study.trials[1].user_attrs["fail_reason"]
    assert all(t.value is None or t.value == t.value for t in study.trials)  # never NaN


def test_out_of_memory_fails_only_that_trial(ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    real_train = objective_module.train

    def train_or_oom(model, cfg, data, *args, **kwargs):
        if cfg.learning_rate == 2e-3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train(model, cfg, data, *args, **kwargs)

    monkeypatch.setattr(objective_module, "train", train_or_oom)
    study = run_lr_trials(ctx, [1e-3, 2e-3, 1e-3], epochs=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] + [
        TrialState.COMPLETE
    ]
    assert "out of memory" in study.trials[1].user_attrs["fail_reason"]


def test_tokenizer_model_mismatch_fails_the_trial(ctx) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    small = BertForSequenceClassification(
        BertConfig(
            vocab_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=4,
        )  # fmt: skip
    )
    study = run_lr_trials(replace(ctx, base_model=small), [1e-3], epochs=1)
    [t] = study.trials
    assert t.state == TrialState.FAIL
    assert "tokenizer/model mismatch" in t.user_attrs["fail_reason"]


def test_a_bug_in_project_code_stops_the_study(ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(objective_module, "train", broken)
    with pytest.raises(ZeroDivisionError):
        run_lr_trials(ctx, [1e-3, 1e-3], epochs=1)


# ----------------------------------------------------------------------------- guard and input


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture()
def existing_study(tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path):
    db = tmp_path / "store" / "optuna.db"
    url = f"sqlite:///{db}"
    args = ["optimize", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
            "--storage", url, "--device", "cpu", "--no-progress", "--epochs", "1"]  # fmt: skip
    assert main([*args, "--n-trials", "1"]) == 0
    return db, args


def _refused(capsys, args: list[str], db: Path, message: str) -> None:
    capsys.readouterr()
    before = _bytes(db)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _bytes(db) == before


def test_mixing_guard_model(existing_study, tmp_path: Path, capsys) -> None:
    from conftest import build_tiny_model

    db, args = existing_study
    other = build_tiny_model(tmp_path / "other_model")
    _refused(capsys, [*args, "--model", str(other)], db, "was made with model")


def test_mixing_guard_space(existing_study, tmp_path: Path, capsys) -> None:
    db, args = existing_study
    space = tmp_path / "space.toml"
    space.write_text("[lora_r]\nlow = 4\nhigh = 8\n")
    _refused(capsys, [*args, "--space", str(space)], db, "was made with space")
    _refused(capsys, [*args, "--space", "extended"], db, "was made with space")


def test_mixing_guard_direction(tiny_model_dir, tiny_data_dir, tmp_path: Path, capsys) -> None:
    db = tmp_path / "o.db"
    optuna.create_study(study_name="banking77", storage=f"sqlite:///{db}", direction="minimize")
    args = ["optimize", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
            "--storage", f"sqlite:///{db}", "--no-progress", "--epochs", "1"]  # fmt: skip
    _refused(capsys, args, db, "minimises its objective")


def test_a_new_study_name_is_allowed(existing_study, tmp_path: Path) -> None:
    db, args = existing_study
    space = tmp_path / "space.toml"
    space.write_text("[lora_r]\nlow = 4\nhigh = 8\n")
    assert main([*args, "--space", str(space), "--study-name", "narrow", "--n-trials", "1"]) == 0


@pytest.mark.parametrize(
    "train_rows, message",
    [
        ("text,category\n   ,card_arrival\n", "has no text"),
        ("text,category\n12 34,card_arrival\n", "has no text"),
        ("text\nhello\n", "lacks the column(s) category"),
        ('text,category\n"my card,card_arrival\nnext,card_arrival\n', "not a valid CSV"),
        (
            "text,category\nwhere is my card,card_arrival\nmy card please,card_arrival\n"
            "the euro rate,exchange_rate\nrate of the euro,exchange_rate\n",
            "never seen in training",
        ),
    ],
)
def test_bad_data_is_refused(existing_study, tmp_path: Path, capsys, train_rows, message) -> None:
    db, args = existing_study
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text(train_rows)
    write_intent_csv(bad / "test.csv", make_rows(2, seed=0))
    _refused(capsys, [*args, "--data-dir", str(bad)], db, message)


@pytest.mark.parametrize(
    "space, message",
    [
        ("[learning_rate]\nlow = 1e-3\nhigh = 1e-5\nlog = true\n", "is above high"),
        ("[lora_alpha_ratio]\nlow = 0.0\nhigh = 2.0\nlog = true\n", "is not a number > 0"),
        ("[lora_dropout]\nlow = 0.0\nhigh = 0.2\nlog = true\n", "log scale needs low > 0"),
    ],
)
def test_bad_space_is_refused(existing_study, tmp_path: Path, capsys, space, message) -> None:
    db, args = existing_study
    f = tmp_path / "space.toml"
    f.write_text(space)
    _refused(capsys, [*args, "--space", str(f)], db, message)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n-trials", "0"], "--n-trials must be a positive number"),
        (["--n-trials", "-3"], "--n-trials must be a positive number"),
        (["--epochs", "0"], "--epochs must be a positive number"),
        (["--workers", "0"], "--workers must be a positive number"),
        (["--heartbeat-interval", "30", "--grace-period", "10"], "--grace-period must be longer"),
        (["--storage", "sqlite:/oops.db"], "SQLite URLs look like sqlite:///"),
    ],
)
def test_bad_flags_are_refused(existing_study, capsys, flags, message) -> None:
    db, args = existing_study
    _refused(capsys, [*args, *flags], db, message)


@pytest.fixture()
def tmpfs(tmp_path: Path):
    """A small tmpfs of our own, to make a real read-only or full disk (needs root)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)]).returncode:
        from conftest import require

        require("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_read_only_disk(existing_study, tmpfs: Path, capsys) -> None:
    db, args = existing_study
    target = tmpfs / "optuna.db"
    target.write_bytes(db.read_bytes())
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    # the operating system's own words (SQLite says only "unable to open database file")
    reason = f"{os.strerror(errno.EROFS)} ({tmpfs})"
    _refused(capsys, [*args, "--storage", f"sqlite:///{target}"], target, reason)


def test_full_disk(existing_study, tmpfs: Path, capsys) -> None:
    db, args = existing_study
    target = tmpfs / "optuna.db"
    target.write_bytes(db.read_bytes())
    fd = os.open(tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
    for chunk in (1 << 20, 4096, 1):  # fill the disk to the last byte
        try:
            while os.write(fd, b"\0" * chunk):
                pass
        except OSError:
            pass
    os.close(fd)
    # the operating system's own words (SQLite says only "disk I/O error")
    reason = f"{os.strerror(errno.ENOSPC)} ({tmpfs}: 0 bytes free)"
    _refused(capsys, [*args, "--storage", f"sqlite:///{target}"], target, reason)


def test_password_never_printed(tiny_model_dir, tiny_data_dir, tmp_path: Path, capsys) -> None:
    url = "postgresql://nobody:hunter2@127.0.0.1:1/none"
    args = ["optimize", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir),
            "--storage", url, "--no-progress", "--epochs", "1"]  # fmt: skip
    assert main(args) == 2
    out = capsys.readouterr()
    assert "hunter2" not in out.err + out.out and "nobody:***@" in out.err
    assert os.environ.get("PGPASSWORD") is None
