"""A study remembers how it was made: after `optimize` with explicit flags, every later command
needs only `--study-name` and `--storage` (and gives the same numbers as with the flags)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study import recipe
from study.cli import main
from study.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def made_study(model: Path, data: Path, root: Path) -> tuple[str, list[str]]:
    """Run optimize with every flag spelt out; return the URL and those flags."""
    url = f"sqlite:///{root}/optuna.db"
    flags = [
        "--model", str(model), "--data-dir", str(data), "--max-train-samples", "200",
        "--max-length", "24", "--epochs", "2", "--seed", "7", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(["optimize", "--storage", url, *flags, "--n-trials", "2", "--keep", "all"]) == 0
    return url, flags


def test_later_commands_need_only_the_name_and_storage(
    tiny_model_dir: Path,
    tiny_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    url, flags = made_study(tiny_model_dir, tiny_data_dir, tmp_path)
    monkeypatch.delenv("BANKING77_DATA_DIR", raising=False)  # the data must come from the study
    short = ["--study-name", "banking77", "--storage", url]

    lora = optuna.load_study(study_name="banking77", storage=url)
    attrs = lora.user_attrs
    assert attrs["data_source"] == str(tiny_data_dir.resolve())
    assert (attrs["max_train_samples"], attrs["max_length"], attrs["epochs"]) == (200, 24, 2)
    assert (attrs["seed"], attrs["pruner"], attrs["sampler"]) == (7, "hyperband", "tpe")
    assert attrs["mixed_precision"] is True and attrs["version"].startswith("0.")
    assert len(attrs["model_fingerprint"]) == 16 and json.loads(attrs["space"])
    assert attrs["artifact_dir"] == str((tmp_path / "weights").resolve())

    # evaluate: the same numbers with and without the flags
    for name, extra in (("short", []), ("flags", ["--data-dir", str(tiny_data_dir)])):
        out = tmp_path / f"eval-{name}"
        assert main(["evaluate", *short, "--trial", "best", "--out", str(out), *extra]) == 0
    short_doc, flag_doc = (
        json.loads((tmp_path / f"eval-{n}" / "metrics.json").read_text())
        for n in ("short", "flags")
    )
    assert short_doc["matches_stored"] is True and short_doc["data"]["other_than_study"] is False
    assert {k: short_doc[k] for k in ("macro_f1", "accuracy", "trial")} == {
        k: flag_doc[k] for k in ("macro_f1", "accuracy", "trial")
    }

    # export finds the weights in the study's artifact store
    assert main(["export", *short, "--trial", "baseline", "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "trial.json").read_text())["trial"] == 0

    # resume: the study's model, data, subsample, length, epochs and seed
    assert main(["optimize", *short, "--device", "cpu", "--no-progress", "--n-trials", "1"]) == 0
    trials = optuna.load_study(study_name="banking77", storage=url).trials
    assert len(trials) == 3
    assert {t.user_attrs["data_fingerprint"] for t in trials} == {attrs["data_fingerprint"]}
    assert {(t.user_attrs["max_epochs"], t.user_attrs["seed"]) for t in trials} == {(2, 7)}

    # confirm: the same model and data, without a flag
    assert main(["confirm", *short, "--device", "cpu", "--no-progress", "--top", "1",
                 "--seeds", "1"]) == 0  # fmt: skip
    runs = optuna.load_study(study_name="banking77-confirm", storage=url).trials
    assert len(runs) == 2 and all(t.state == TrialState.COMPLETE for t in runs)
    assert {t.user_attrs["data_fingerprint"] for t in runs} == {attrs["data_fingerprint"]}
    assert {t.user_attrs["model"] for t in runs} == {str(tiny_model_dir)}

    assert main(["report", *short, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "REPORT.md").is_file()

    capsys.readouterr()
    assert main(["studies", "--storage", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["study", "role"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "LoRA study" in rows["banking77"] and "3 (" in rows["banking77"]
    assert "baseline" in rows["banking77-full-ft"] and "confirm" in rows["banking77-confirm"]
    shown = rows["banking77"].split()[-1]  # the data column; long paths keep their end
    assert shown == str(tiny_data_dir) or (
        shown.startswith("...") and str(tiny_data_dir).endswith(shown[3:])
    )


def test_a_differing_flag_is_refused_and_a_missing_folder_named(
    tiny_model_dir: Path,
    tiny_data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    url, _ = made_study(tiny_model_dir, data, tmp_path)
    db = tmp_path / "optuna.db"
    before = db.read_bytes()
    short = ["--study-name", "banking77", "--storage", url, "--device", "cpu"]
    for flag, value in (("--epochs", "3"), ("--max-train-samples", "100"), ("--max-length", "32")):
        capsys.readouterr()
        assert main(["optimize", *short, flag, value]) == 2
        err = capsys.readouterr().err
        assert "was made with" in err and f"leave {flag} out" in err, err
        assert len(err.strip().splitlines()) == 1
    assert main(["optimize", *short, "--no-mixed-precision"]) == 2
    assert db.read_bytes() == before

    shutil.rmtree(data)
    capsys.readouterr()
    assert main(["optimize", *short]) == 2
    err = capsys.readouterr().err
    assert str(data.resolve()) in err and "--data-dir" in err
    assert main(["evaluate", *short, "--trial", "best"]) == 2
    err = capsys.readouterr().err
    assert str(data.resolve()) in err and "--data-dir" in err
    assert db.read_bytes() == before


def test_a_study_made_by_an_older_version_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    study = optuna.create_study(study_name="old", storage=url, direction="maximize")
    study.set_user_attr("model", "some/model")  # what it recorded: no recipe, no version
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"max_epochs": 4, "seed": 3}))
    for command in (["optimize"], ["report"], ["evaluate", "--trial", "0"]):
        assert main([*command, "--storage", url, "--study-name", "old"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: study 'old' was made by an older version"), err
        assert len(err.splitlines()) == 1
    made = {"model": "some/model", "epochs": 4, "seed": 3}
    assert recipe.merge({}, made, "old") == {"model": "some/model", "epochs": 4, "seed": 3}
    assert recipe.merge({"seed": 5}, made, "old")["seed"] == 5  # the search may change
    with pytest.raises(ConfigError, match="made with epochs 4"):
        recipe.merge({"epochs": 6}, made, "old")


def test_a_log_off_the_terminal_has_lines_not_redraws(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "study", "optimize", "--model", str(tiny_model_dir),
           "--data-dir", str(tiny_data_dir), "--storage", f"sqlite:///{tmp_path}/o.db",
           "--device", "cpu", "--epochs", "2", "--n-trials", "2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "\r" not in log
    assert "banking77 trial 1 epoch 2/2: val F1" in log  # one line per epoch
    assert "banking77-full-ft trial 0 epoch 1/2" in log
    assert log.count("Trial 1 finished") == 1  # and one per finished trial
