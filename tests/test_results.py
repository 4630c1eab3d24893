"""The published study under docs/results: what README.md quotes can be checked from the file.

The study (MiniLM on the full Banking77 training split) ships as a SQLite file without its
weights. These tests open a copy of it the way a reader would: the commands that need no weights
work, the ones that need them say in one line that they are not there, and the numbers the
README quotes are the ones stored, recomputed where the stored predictions allow it.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from sklearn.metrics import f1_score

from objectives.predictions import decode_labels
from objectives.record import Attr, TrialRecord, ranked, to_records
from reports.confirm import confirmed_configs, verdict
from study.cli import main
from study.confirm import Job

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "results" / "minilm-full.db"
STUDY = "minilm-full"
BASELINE = STUDY + "-full-ft"
CONFIRM = STUDY + "-confirm"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the published file, so no test can change it."""
    copy = tmp_path_factory.mktemp("published") / PUBLISHED.name
    shutil.copyfile(PUBLISHED, copy)
    return f"sqlite:///{copy}"


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def lora_ranked(url: str) -> list[TrialRecord]:
    """The LoRA study's COMPLETE trials, best validation F1 first."""
    return ranked(to_records(trials(url, STUDY), STUDY))


def test_the_study_is_thirty_lora_trials_of_six_epochs_on_the_full_split(url: str) -> None:
    study = optuna.load_study(study_name=STUDY, storage=url)
    recipe = study.user_attrs
    assert recipe["epochs"] == 6 and recipe.get("max_train_samples") is None
    assert (recipe["sampler"], recipe["pruner"]) == ("tpe", "hyperband")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 30
    assert all(t.user_attrs[Attr.MAX_EPOCHS] == 6 for t in finished)
    assert {t.user_attrs[Attr.MODE] for t in finished} == {"lora"}


def test_the_fixed_baseline_and_both_neighbours_are_complete(url: str) -> None:
    runs = to_records(trials(url, BASELINE), BASELINE, baseline=True)
    assert sorted((r.state, r.lr_factor) for r in runs) == [
        ("COMPLETE", pytest.approx(1 / 3)),
        ("COMPLETE", 1.0),
        ("COMPLETE", 3.0),
    ]


def test_confirm_holds_the_three_best_lora_trials_and_the_baseline_at_three_seeds(
    url: str,
) -> None:
    """Every run `confirm --top 3 --seeds 3` plans is COMPLETE in the confirm study, once; the
    only other trials are runs interrupted by a stopped process (FAIL) and trained again."""
    runs = trials(url, CONFIRM)
    complete = [t for t in runs if t.state == TrialState.COMPLETE]
    assert len(complete) == 12
    assert {t.state for t in runs} <= {TrialState.COMPLETE, TrialState.FAIL}
    jobs = [Job.from_attrs(t.user_attrs) for t in complete]
    assert None not in jobs
    best_three = [r.number for r in lora_ranked(url)[:3]]
    sources = {(STUDY, n, "lora") for n in best_three} | {(BASELINE, 0, "full")}
    assert {(j.source_study, j.source_trial, j.mode, j.seed) for j in jobs} == {
        (*source, seed) for source in sources for seed in (43, 44, 45)
    }
    assert all(j.epochs == 6 for j in jobs)


def test_best_lora_test_f1_recomputed_from_its_stored_predictions(url: str) -> None:
    best = lora_ranked(url)[0]
    trial = next(t for t in trials(url, STUDY) if t.number == best.number)
    predicted = decode_labels(trial.user_attrs[Attr.TEST_PREDICTIONS])
    truth = decode_labels(trial.user_attrs[Attr.TEST_LABELS])
    assert predicted is not None and truth is not None and len(truth) == 3080
    recomputed = f1_score(truth, predicted, average="macro")
    assert recomputed == pytest.approx(best.test_f1, abs=1e-12)
    assert np.mean(predicted == truth) == pytest.approx(best.test_accuracy, abs=1e-12)


def test_readme_quotes_the_stored_figures(url: str) -> None:
    """The README's headline numbers are the published study's, rounded as printed there."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    best = lora_ranked(url)[0]
    fixed = next(
        r for r in to_records(trials(url, BASELINE), BASELINE, baseline=True) if not r.neighbour
    )
    for record in (best, fixed):
        assert f"{record.test_f1:.3f}" in readme, record.label
    assert re.search(r"0\.93\b", readme)  # the published bert-base figure it is set beside


def test_readme_quotes_the_seed_repeats_and_their_verdict(url: str) -> None:
    """The seed intervals and the Welch verdict in README.md are `confirm`'s, from the file."""
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    configs = confirmed_configs(trials(url, CONFIRM))
    result = verdict(configs)
    assert result.lora is not None and result.baseline is not None and result.test_diff
    for config in (result.lora, result.baseline):
        test = config.test_f1
        assert test is not None and test.low is not None and test.high is not None
        assert f"{test.mean:.3f} ({test.low:.3f}-{test.high:.3f})" in readme, config.label
    diff = result.test_diff
    assert result.text.startswith("Not distinguishable")
    assert f"interval {diff.low:+.4f} to {diff.high:+.4f}" in readme
    assert f"{-diff.mean:.4f} below the baseline" in readme


@pytest.mark.parametrize("command", [["studies"], ["report", "--study-name", STUDY]])
def test_commands_without_weights_work_on_the_published_file(
    url: str, command: list[str], tmp_path: Path
) -> None:
    out = ["--out", str(tmp_path / "report")] if command[0] == "report" else []
    assert main([*command, "--storage", url, *out]) == 0
    if command[0] == "report":
        text = (tmp_path / "report" / "REPORT.md").read_text(encoding="utf-8")
        assert "## Is the search space big enough?" in text


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_commands_that_need_weights_say_they_are_not_shipped(
    url: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = ["--out", str(tmp_path / command)]
    code = main([command, "--storage", url, "--study-name", STUDY, "--trial", "best", *out])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not on this machine" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / command).exists()


def test_the_published_file_is_not_in_wal_mode() -> None:
    """Readers open a copy; the published file itself is not in WAL mode, so opening it in
    place leaves no -wal/-shm files beside it."""
    with sqlite3.connect(f"file:{PUBLISHED}?mode=ro", uri=True) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
