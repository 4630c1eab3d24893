"""The `evaluate` command: reload a trial's kept weights and measure them again on val or test.

It predicts exactly as training did, so on the device the trial ran on the recomputed metrics
equal the stored ones; what it writes: docs/usage.md, "Evaluating a kept trial".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from objectives.batching import prepare_split
from objectives.data import IntentData, encode, load_data
from objectives.device import compute_dtype, detect_device
from objectives.evaluation import evaluate
from objectives.metrics import confusion_matrix, per_class
from objectives.record import TrialRecord
from objectives.weights import Restored, atomic_folder
from study import recipe
from study.keeper import heldout_fingerprint
from study.restore import WinnersError, restore_trial, trial_summary


@dataclass(frozen=True)
class Recomputed:
    split: str
    labels: tuple[str, ...]
    f1: float
    accuracy: float
    confusion: np.ndarray  # rows = true label id, columns = predicted label id
    device: str
    dtype: str


def check_data(restored: Restored, data: IntentData, other: bool) -> None:
    """Refuse data the model cannot be measured on (other intents) and, unless it is `other`
    data on purpose, other validation or test texts than the trial's metrics come from."""
    info, source = restored.info, data.source
    if tuple(data.label_names) != info.labels:
        trained = (
            f"the intents in {source} differ from the {len(info.labels)} the trial was trained on"
        )
        why = (
            ": the model cannot be measured on them"
            if other
            else "; pass the --data-dir the study used"
        )
        raise WinnersError(trained + why)
    if not other and heldout_fingerprint(data) != info.heldout_fingerprint:
        raise WinnersError(
            f"the validation or test texts in {source} differ from those the trial was measured "
            "on; pass the --data-dir the study used"
        )


def evaluation_data(
    given: str | None, made_with: dict[str, Any], study_name: str
) -> tuple[str | None, bool]:
    """(data folder or None for the Hub, whether it is other data than the study's).

    Not given: the study's own data (its recipe). Given and different from the study's:
    allowed, and labelled as other data.
    """
    if given is not None:
        return given, recipe.data_source(given) != made_with.get("data_source")
    return recipe.recorded_data(made_with, study_name), False


def recompute(restored: Restored, data: IntentData, split: str, device: torch.device) -> Recomputed:
    """Predict `split` with the restored model and measure it as training measured it."""
    info = restored.info
    encoded = encode(data, restored.tokenizer, info.max_length)
    prepared = prepare_split(getattr(encoded, split), encoded.pad_token_id, device)
    dtype = compute_dtype(device, info.mixed_precision)
    n = len(info.labels)
    measured = evaluate(restored.model.to(device), prepared, n, dtype)
    return Recomputed(
        split=split,
        labels=info.labels,
        f1=measured.f1,
        accuracy=measured.accuracy,
        confusion=confusion_matrix(prepared.labels, measured.predictions, n),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )


def per_class_rows(result: Recomputed) -> list[dict[str, Any]]:
    """One row per intent: F1, precision, recall and support, in label-id order."""
    scores = per_class(result.confusion)
    return [
        {
            "intent": label,
            "f1": round(float(f1), 6),
            "precision": round(float(p), 6),
            "recall": round(float(r), 6),
            "support": int(s),
        }
        for label, f1, p, r, s in zip(
            result.labels,
            scores.f1,
            scores.precision,
            scores.recall,
            scores.support,
            strict=True,
        )
    ]


def metrics_doc(result: Recomputed, summary: dict[str, Any], stored: dict[str, Any]) -> dict:
    return {
        **summary,
        "split": result.split,
        "examples": int(result.confusion.sum()),
        "macro_f1": result.f1,
        "accuracy": result.accuracy,
        "stored": stored,
        "matches_stored": stored == {"macro_f1": result.f1, "accuracy": result.accuracy},
        "device": result.device,
        "dtype": result.dtype,
    }


def write_evaluation(folder: Path, result: Recomputed, doc: dict[str, Any], title: str) -> None:
    from reports.figures import confusion_figure
    from reports.perclass import Confusion
    from reports.png import save
    from reports.render import write_csv

    (folder / "metrics.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    rows = per_class_rows(result)
    write_csv(folder / "per_class_f1.csv", list(rows[0]), rows)
    figure = confusion_figure(Confusion(list(result.labels), result.confusion), title)
    save(figure, folder / "confusion_matrix.png")


def evaluate_trial(
    storage_url: str,
    store_dir: str | None,
    study_name: str,
    which: str,
    split: str,
    data_dir: str | None,
    device_name: str,
    out: str | None,
) -> tuple[Path, dict[str, Any]]:
    """The `evaluate` command; returns the folder written and the metrics document."""
    if out is not None:
        _check_out(Path(out))
    device = detect_device(device_name)
    name, trial, restored = restore_trial(storage_url, store_dir, study_name, which)
    default = Path("artifacts") / "evaluations" / name / f"trial-{trial.number}-{split}"
    folder = Path(out) if out is not None else default
    _check_out(folder)
    made_with = recipe.load(storage_url, study_name) or recipe.load(storage_url, name)
    data_dir, other = evaluation_data(data_dir, made_with, study_name)
    data = load_data(data_dir)  # val and test do not depend on --max-train-samples
    check_data(restored, data, other)  # another test set may be the point, not other intents
    result = recompute(restored, data, split, device)
    r = TrialRecord.from_trial(trial, name)
    stored = {
        "macro_f1": r.val_f1 if split == "val" else r.test_f1,
        "accuracy": r.val_accuracy if split == "val" else r.test_accuracy,
    }
    doc = metrics_doc(result, trial_summary(name, trial), stored)
    doc["data"] = {
        "source": recipe.data_source(data_dir),
        "study_data": made_with.get("data_source"),
        "other_than_study": other,
    }
    if other:  # the stored values were measured on the study's data: nothing to match
        doc["matches_stored"] = None
    title = f"{name} trial {trial.number}: {split} macro-F1 {result.f1:.4f}"
    with atomic_folder(folder, replace=True) as tmp:
        write_evaluation(tmp, result, doc, title)
    return folder, doc


def _check_out(folder: Path) -> None:
    """An earlier evaluation may be replaced; any other existing folder is left alone."""
    if folder.exists() and not (folder.is_dir() and (folder / "metrics.json").is_file()):
        if not folder.is_dir() or any(folder.iterdir()):
            raise WinnersError(
                f"{folder} exists and is not an earlier evaluation; choose another --out"
            )
