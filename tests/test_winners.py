"""Kept weights, `evaluate`, `export` and `predict` on the tiny BERT and the tiny intent data.

The studies here start from a headless copy of the tiny BERT (encoder weights, no classifier
head), as MiniLM and bert-base-uncased ship: a plain transformers user then loads an exported
adapter exactly as the README says, with no flag for a head of another size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from conftest import import_or_require
from helpers import tiny_context
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from objectives.config import FULL_FT_DEFAULTS, LORA_DEFAULTS
from objectives.data import load_data
from objectives.evaluation import predict
from objectives.metrics import macro_f1
from objectives.model import build_model
from objectives.record import Attr
from objectives.train import train
from objectives.weights import (
    WeightsInfo,
    archive_folder,
    atomic_folder,
    load_weights,
    save_weights,
    unarchive,
)
from storage.artifacts import default_artifact_dir
from study.cli import main
from study.evaluate import recompute
from study.keeper import WeightKeeper, heldout_fingerprint, ranked_for_keeping
from study.restore import restore_trial

ARTIFACT_ATTR = Attr.ARTIFACT_ID

# Settings the tiny model learns with in a few epochs, so predictions differ between texts.
SPACE = """
[learning_rate]
choices = [3e-3, 1e-3]
[batch_size]
choices = [8]
[target_modules]
choices = ["all_linear"]
[lora_r]
choices = [8, 16]
"""
PLAIN_LOAD = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

texts, out = json.loads(sys.argv[1]), {}
for folder in sys.argv[2:]:
    # the README's lines, as they are
    config = AutoConfig.from_pretrained(f"{folder}/classification_config.json")
    model = AutoModelForSequenceClassification.from_pretrained(folder, config=config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        batch = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
        probs = model.eval()(**batch).logits.softmax(-1)
    out[folder] = {
        "labels": [model.config.id2label[int(i)] for i in probs.argmax(-1)],
        "probs": probs.tolist(),
    }
assert not {"objectives", "study", "storage", "reports"} & set(sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def headless_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModel, AutoTokenizer

    path = tmp_path_factory.mktemp("headless_model")
    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def optimize_args(model: Path, data: Path, url: str, space: Path, *extra: str) -> list[str]:
    return [
        "optimize", "--model", str(model), "--data-dir", str(data), "--storage", url,
        "--device", "cpu", "--no-progress", "--space", str(space), "--pruner", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def kept_study(
    headless_model_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """A study whose every trial kept its weights: the baseline and two LoRA trials."""
    root = tmp_path_factory.mktemp("kept_study")
    space = root / "space.toml"
    space.write_text(SPACE)
    url = f"sqlite:///{root}/optuna.db"
    args = optimize_args(headless_model_dir, tiny_data_dir, url, space, "--keep", "all")
    assert main([*args, "--epochs", "3", "--n-trials", "2", "--seed", "1"]) == 0
    return SimpleNamespace(root=root, url=url, store=root / "weights", data=tiny_data_dir)


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- units


def test_ranking_prefers_higher_f1_then_the_earlier_trial() -> None:
    assert ranked_for_keeping([(0, 0.5), (1, 0.7), (2, 0.6), (3, 0.7)]) == [1, 3, 2, 0]
    assert ranked_for_keeping([]) == []


def test_default_artifact_dir_sits_beside_the_storage_file() -> None:
    assert default_artifact_dir("sqlite:///artifacts/optuna.db") == Path("artifacts/weights")
    assert default_artifact_dir("sqlite:////tmp/x/o.db") == Path("/tmp/x/weights")
    assert default_artifact_dir("journal:runs/j.log") == Path("runs/weights")
    assert default_artifact_dir("postgresql://u@h/db") == Path("artifacts/weights")


def test_atomic_folder_leaves_nothing_behind_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("a")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileExistsError):
        with atomic_folder(dest):
            pass
    with atomic_folder(dest, replace=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in dest.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reloaded_weights_predict_exactly_as_trained(
    headless_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, mode: str
) -> None:
    ctx = tiny_context(tiny_data_dir, headless_model_dir)
    if mode == "lora":
        cfg = replace(LORA_DEFAULTS, learning_rate=3e-3, batch_size=8, target_modules="all_linear")
    else:
        cfg = replace(FULL_FT_DEFAULTS, learning_rate=1e-3, batch_size=8)
    cfg = replace(cfg, epochs=3, mixed_precision=False)
    model = build_model(ctx.base_model, cfg)
    result = train(model, cfg, ctx.data)  # the model now holds the best epoch's weights
    before = predict(model, ctx.data.test, torch.float32)
    assert len(set(before.tolist())) > 1, "the tiny model should have learned something"

    info = WeightsInfo(mode, str(headless_model_dir), ctx.label_names, 32, False, "f", "s", 0)
    (tmp_path / "saved").mkdir()
    save_weights(model, tmp_path / "saved", info)
    archive_folder(tmp_path / "saved", tmp_path / "weights.tar")
    (tmp_path / "unpacked").mkdir()
    with open(tmp_path / "weights.tar", "rb") as f:
        unarchive(f, tmp_path / "unpacked")
    restored = load_weights(tmp_path / "unpacked")
    assert restored.info == info
    after = predict(restored.model, ctx.data.test, torch.float32)
    np.testing.assert_array_equal(after, before)
    assert macro_f1(ctx.data.test.labels, after, len(ctx.label_names)) == result.test_f1
    if mode == "lora":  # megabytes, not the model: the adapter and the head only
        assert "adapter_model.safetensors" in os.listdir(tmp_path / "unpacked")


def test_keep_best_keeps_the_top_k_and_removes_those_that_drop_out(
    headless_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    ctx = tiny_context(tiny_data_dir, headless_model_dir)
    model = build_model(ctx.base_model, LORA_DEFAULTS)
    store = tmp_path / "weights"
    keeper = WeightKeeper(
        store, "m", keep="best", keep_top=1, max_length=32, heldout_fingerprint=""
    )
    scores = iter([0.5, 0.7, 0.6, 0.7])

    def objective(trial: optuna.Trial) -> float:
        value = next(scores)
        keeper(trial, model, LORA_DEFAULTS, SimpleNamespace(val_f1=value))
        return value

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=4)
    ids = {t.number: t.user_attrs.get(ARTIFACT_ATTR) for t in study.trials}
    # 0 was kept, then pushed out by 1; 2 and 3 (a tie with the earlier 1) never made the top 1
    assert ids[0] and ids[1] and ids[2] is None and ids[3] is None
    assert sorted(p.name for p in store.iterdir()) == [ids[1]]


# ----------------------------------------------------------------------------- the commands


def test_complete_trials_keep_their_weights_as_trial_artifacts(kept_study: SimpleNamespace):
    storage = optuna.storages.RDBStorage(kept_study.url)
    data = load_data(kept_study.data)
    sizes = {}
    for name in ("banking77", "banking77-full-ft"):
        for t in optuna.load_study(study_name=name, storage=storage).trials:
            assert t.state == TrialState.COMPLETE
            artifact_id = t.user_attrs[ARTIFACT_ATTR]
            [meta] = get_all_artifact_meta(t, storage=storage)
            assert meta.artifact_id == artifact_id
            assert meta.filename == f"{name}-trial-{t.number}-weights.tar"
            assert t.user_attrs["labels"] == data.label_names  # the label map: id = position
            sizes[t.user_attrs["mode"]] = (kept_study.store / artifact_id).stat().st_size
    assert sizes["lora"] < sizes["full"]


def test_optuna_dashboard_lists_a_trials_kept_weights(kept_study: SimpleNamespace) -> None:
    dashboard = import_or_require("optuna_dashboard.artifact._backend")
    storage = optuna.storages.RDBStorage(kept_study.url)
    study = optuna.load_study(study_name="banking77", storage=storage)
    trial = study.trials[0]
    study_attrs = storage.get_study_system_attrs(study._study_id)
    listed = dashboard.list_trial_artifacts(study_attrs, trial.system_attrs, trial)
    assert [a["artifact_id"] for a in listed] == [trial.user_attrs[ARTIFACT_ATTR]]


@pytest.mark.parametrize(
    "which, split", [("0", "val"), ("1", "test"), ("best", "val"), ("baseline", "test")]
)
def test_evaluate_reproduces_the_stored_metrics(
    kept_study: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    which: str,
    split: str,
) -> None:
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        capsys, "evaluate", "--storage", kept_study.url, "--trial", which, "--split", split,
        "--data-dir", str(kept_study.data), "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "stored" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png", "metrics.json", "per_class_f1.csv",
    ]  # fmt: skip
    doc = json.loads((out / "metrics.json").read_text())
    study = "banking77-full-ft" if which == "baseline" else "banking77"
    trials = optuna.load_study(study_name=study, storage=kept_study.url).trials
    trial = max(trials, key=lambda t: t.value) if which in ("best", "baseline") else None
    trial = trial or trials[int(which)]
    assert doc["trial"] == trial.number and doc["split"] == split
    assert doc["macro_f1"] == trial.user_attrs[f"{split}_f1"]
    assert doc["accuracy"] == trial.user_attrs[f"{split}_accuracy"]
    assert doc["matches_stored"] is True
    rows = (out / "per_class_f1.csv").read_text().splitlines()
    assert rows[0] == "intent,f1,precision,recall,support" and len(rows) == 1 + 4
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # An earlier evaluation is replaced, as a whole.
    assert run_cli(capsys, "evaluate", "--storage", kept_study.url, "--trial", which,
                   "--split", split, "--data-dir", str(kept_study.data), "--device", "cpu",
                   "--out", str(out))[0] == 0  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_evaluate_recomputes_the_stored_test_confusion(kept_study: SimpleNamespace) -> None:
    _, trial, restored = restore_trial(kept_study.url, None, "banking77", "1")
    data = load_data(kept_study.data)
    assert restored.info.heldout_fingerprint == heldout_fingerprint(data)
    result = recompute(restored, data, "test", torch.device("cpu"))
    assert result.confusion.tolist() == trial.user_attrs["test_confusion"]
    assert result.f1 == trial.user_attrs["test_f1"]


def test_export_loads_with_plain_transformers_and_predict_agrees(
    kept_study: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folders = {}
    for kind, extra in (("adapter", []), ("merged", ["--merge"]), ("baseline", [])):
        trial = "baseline" if kind == "baseline" else "best"
        folders[kind] = tmp_path / kind
        code, _, err = run_cli(
            capsys, "export", "--storage", kept_study.url, "--trial", trial,
            "--out", str(folders[kind]), *extra,
        )  # fmt: skip
        assert code == 0, err
    assert "adapter_config.json" in os.listdir(folders["adapter"])
    assert "config.json" not in os.listdir(folders["adapter"])
    assert "adapter_config.json" not in os.listdir(folders["merged"])
    config = json.loads((folders["adapter"] / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_dir()  # the base model, by its full path

    texts = load_data(kept_study.data).test.texts[:12]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, json.dumps(texts), *map(str, folders.values())],
        cwd=tmp_path,  # not the project: nothing of it can be imported
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    got = json.loads(plain.stdout.strip().splitlines()[-1])

    # The project's predictions: the trial's kept weights, reloaded.
    for kind, which in (("adapter", "best"), ("merged", "best"), ("baseline", "baseline")):
        _, _, restored = restore_trial(kept_study.url, None, "banking77", which)
        tok = restored.tokenizer
        batch = tok(texts, truncation=True, max_length=restored.info.max_length, padding=True,
                    return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            probs = restored.model(**batch).logits.softmax(-1).numpy()
        ours = [restored.info.labels[i] for i in probs.argmax(-1)]
        theirs = got[str(folders[kind])]
        assert theirs["labels"] == ours, kind
        np.testing.assert_allclose(theirs["probs"], probs, atol=1e-5 if kind != "merged" else 1e-4)
    assert len(set(got[str(folders["adapter"])]["labels"])) > 1

    # `predict` prints the same top intent, from texts on the command line or a CSV file.
    code, stdout, err = run_cli(
        capsys, "predict", "--model", str(folders["adapter"]), *texts[:3], "--top-k", "2",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 * 3 and lines[0] == texts[0]
    for i in range(3):
        label, prob = lines[3 * i + 1].split()
        assert label == got[str(folders["adapter"])]["labels"][i] and 0 < float(prob) <= 1
    csv_file = tmp_path / "queries.csv"
    csv_file.write_text("text\n" + "\n".join(texts[:3]) + "\n")
    code, from_csv, err = run_cli(
        capsys, "predict", "--model", str(folders["adapter"]), "--input", str(csv_file),
        "--top-k", "2", "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and from_csv == stdout, err


def test_keep_flag_and_the_baseline(
    headless_model_dir: Path, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    url = f"sqlite:///{tmp_path}/optuna.db"
    args = optimize_args(headless_model_dir, tiny_data_dir, url, space, "--epochs", "1")
    assert run_cli(capsys, *args, "--n-trials", "1", "--keep", "none")[0] == 0
    assert run_cli(capsys, *args, "--n-trials", "2", "--keep", "best", "--keep-top", "1")[0] == 0
    store = tmp_path / "weights"
    lora = optuna.load_study(study_name="banking77", storage=url).trials
    [base] = optuna.load_study(study_name="banking77-full-ft", storage=url).trials
    assert ARTIFACT_ATTR not in lora[0].user_attrs  # --keep none
    assert (store / base.user_attrs[ARTIFACT_ATTR]).is_file()  # the baseline, whatever --keep
    kept = [t for t in lora if (store / t.user_attrs.get(ARTIFACT_ATTR, "-")).is_file()]
    assert len(kept) == 1  # --keep best --keep-top 1

    code, _, err = run_cli(capsys, "evaluate", "--storage", url, "--trial", "0")
    assert_user_error(code, err, "kept no weights")
    (store / base.user_attrs[ARTIFACT_ATTR]).unlink()  # deleted by hand
    code, _, err = run_cli(capsys, "export", "--storage", url, "--trial", "baseline",
                           "--out", str(tmp_path / "exp"))  # fmt: skip
    assert_user_error(code, err, "are not in the artifact store")
    assert not (tmp_path / "exp").exists()
    code, _, err = run_cli(capsys, *args, "--keep-top", "0")
    assert_user_error(code, err, "--keep-top must be a positive number")


# ----------------------------------------------------------------------------- user errors


def test_pruned_failed_and_missing_trials_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="banking77", storage=url, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.1})
    )
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "NaN loss"})
    )
    cases = [
        (["--trial", "0"], "trial 0 of study 'banking77' is PRUNED"),
        (["--trial", "1"], "is FAIL (NaN loss)"),
        (["--trial", "5"], "has no trial 5"),
        (["--trial", "best"], "has no COMPLETE trial"),
        (["--trial", "baseline"], "no baseline study named 'banking77-full-ft'"),
        (["--trial", "first"], "--trial must be a trial number, best or baseline"),
        (["--trial", "0", "--study-name", "nope"], "no study named 'nope'"),
    ]
    for extra, message in cases:
        for command in (["evaluate"], ["export", "--out", str(tmp_path / "x")]):
            code, _, err = run_cli(capsys, *command, "--storage", url, *extra)
            assert_user_error(code, err, message)
    missing = f"sqlite:///{tmp_path}/missing.db"
    code, _, err = run_cli(capsys, "evaluate", "--storage", missing, "--trial", "0")
    assert_user_error(code, err, "no storage at")
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "x").exists()


def test_export_never_leaves_a_half_written_folder(
    kept_study: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "export", "--storage", kept_study.url, "--trial", "0",
                           "--out", str(existing))  # fmt: skip
    assert_user_error(code, err, "already exists")
    assert os.listdir(existing) == ["mine.txt"]

    import study.export
    from objectives.weights import WeightsError

    def half_then_fail(restored, folder: Path, merge: bool) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise WeightsError("disk full")

    monkeypatch.setattr(study.export, "export_model", half_then_fail)
    code, _, err = run_cli(capsys, "export", "--storage", kept_study.url, "--trial", "0",
                           "--out", str(tmp_path / "new"))  # fmt: skip
    assert_user_error(code, err, "disk full")
    assert sorted(os.listdir(tmp_path)) == ["existing"]


def test_evaluate_on_other_data_is_labelled_and_other_intents_refused(
    kept_study: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from conftest import make_rows, write_intent_csv

    other = tmp_path / "other_data"
    other.mkdir()
    write_intent_csv(other / "train.csv", make_rows(80, seed=1))
    write_intent_csv(other / "test.csv", make_rows(20, seed=9))  # other test texts
    base = ["evaluate", "--storage", kept_study.url, "--trial", "0", "--device", "cpu"]
    code, _, err = run_cli(capsys, *base, "--data-dir", str(other), "--out", str(tmp_path / "e"))
    assert code == 0, err
    doc = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert doc["data"]["other_than_study"] is True
    assert doc["data"]["source"] == str(other.resolve())
    assert doc["data"]["study_data"] == str(kept_study.data.resolve())
    assert doc["matches_stored"] is None  # stored values were measured on the study's data

    fewer = tmp_path / "fewer_intents"
    fewer.mkdir()
    rows = [r for r in make_rows(80, seed=1) if r[1] != "card_arrival"]
    write_intent_csv(fewer / "train.csv", rows)
    write_intent_csv(
        fewer / "test.csv", [r for r in make_rows(20, seed=9) if r[1] != "card_arrival"]
    )
    code, _, err = run_cli(capsys, *base, "--data-dir", str(fewer), "--out", str(tmp_path / "f"))
    assert_user_error(code, err, "the model cannot be measured on them")
    assert not (tmp_path / "f").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, *base, "--data-dir", str(kept_study.data), "--out", str(foreign))
    assert_user_error(code, err, "is not an earlier evaluation")
    assert os.listdir(foreign) == ["notes.txt"]


def test_predict_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad_csv = tmp_path / "q.csv"
    bad_csv.write_text("query\nhello\n")
    cases = [
        (["--model", str(tmp_path / "none"), "hi"], "no model folder at"),
        (["--model", str(tmp_path)], "give texts to classify"),
        (["--model", str(tmp_path), "--input", str(bad_csv)], "needs a header row with a 'text'"),
        (["--model", str(tmp_path), "--input", str(tmp_path / "no.csv")], "input file not found"),
        (["--model", str(tmp_path), "hi"], "cannot load the model in"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, "predict", *args)
        assert_user_error(code, err, message)


def test_help_lists_the_new_commands_and_flags(capsys: pytest.CaptureFixture) -> None:
    def helptext(*args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main([*args, "--help"])
        assert done.value.code == 0
        return capsys.readouterr().out

    assert all(c in helptext() for c in ("evaluate", "export", "predict"))
    assert all(f in helptext("optimize") for f in ("--keep", "--keep-top", "--artifact-dir"))
    assert "--artifact-dir" in helptext("baseline")
    assert all(f in helptext("evaluate") for f in ("--trial", "--split", "--out", "--data-dir"))
    assert all(f in helptext("export") for f in ("--trial", "--out", "--merge"))
    assert all(f in helptext("predict") for f in ("--model", "--input", "--top-k", "--device"))
