"""Find a study's trial by `--trial N|best|baseline` and restore the weights it kept.

`evaluate`, `export` and `predict` start here: the trial (the best by `objectives.record`'s rule,
the baseline's fixed run, or a number), its archive from the artifact store (`storage.artifacts`,
the folder the study recorded unless `--artifact-dir` says otherwise) and the model it holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from objectives.errors import UserError
from objectives.record import Attr, TrialRecord, best_trials
from objectives.weights import Restored, load_weights, unarchive
from storage import get_storage
from storage.artifacts import artifact_dir
from study import recipe
from study.config import BASELINE_SUFFIX, parse_trial_ref
from study.studies import named_study


class WinnersError(UserError):
    """A trial's weights cannot be found or used as asked: the message is meant for the user."""


def find_trial(
    storage: optuna.storages.BaseStorage, study_name: str, which: str
) -> tuple[str, FrozenTrial]:
    """(study name, COMPLETE trial) for `--trial N|best|baseline`, or a WinnersError."""
    ref = parse_trial_ref(which)
    name = study_name + BASELINE_SUFFIX if ref == "baseline" else study_name
    missing = "no baseline study" if ref == "baseline" else "no study"
    trials = named_study(storage, name, missing).get_trials(deepcopy=False)
    if isinstance(ref, int):
        match = [t for t in trials if t.number == ref]
        if not match:
            raise WinnersError(f"study {name!r} has no trial {ref} (it has 0..{len(trials) - 1})")
        trial = match[0]
        if trial.state != TrialState.COMPLETE:
            reason = TrialRecord.from_trial(trial, name).fail_reason
            raise WinnersError(
                f"trial {ref} of study {name!r} is {trial.state.name}"
                + (f" ({reason})" if reason else "")
                + ": only COMPLETE trials keep weights"
            )
        return name, trial
    best = best_trials(trials, 1)  # of a baseline study: the fixed run, never a neighbour
    if not best:
        raise WinnersError(f"study {name!r} has no COMPLETE trial yet")
    return name, best[0]


def fetch_weights(store_dir: Path, study_name: str, trial: FrozenTrial, folder: Path) -> None:
    """Unpack `trial`'s archive from the store into the existing `folder`."""
    artifact_id = TrialRecord.from_trial(trial, study_name).artifact_id
    label = f"trial {trial.number} of study {study_name!r}"
    if not artifact_id:
        raise WinnersError(
            f"{label} kept no weights (run with --keep none, or not in the --keep-top best when "
            "it ended)"
        )
    if not store_dir.is_dir():
        raise WinnersError(
            f"the weights of {label} were kept in an artifact store that is not on this machine "
            f"({store_dir} does not exist): a study copied without its weights (such as the "
            "published studies under docs/results) can be reported on, not evaluated or "
            "exported; pass --artifact-dir if you have the store elsewhere"
        )
    try:
        reader = FileSystemArtifactStore(store_dir).open_reader(artifact_id)
    except ArtifactNotFound:
        raise WinnersError(
            f"the weights of {label} (artifact {artifact_id}) are not in the artifact store "
            f"{store_dir}: deleted, or removed when the trial dropped out of the --keep-top "
            "best; pass --artifact-dir if the store is elsewhere"
        ) from None
    with reader:
        unarchive(reader, folder)


def restore_trial(
    storage_url: str, store_dir: str | Path | None, study_name: str, which: str
) -> tuple[str, FrozenTrial, Restored]:
    """(study name, trial, its model at the best epoch) for `--trial N|best|baseline`."""
    storage = get_storage(storage_url, heartbeat=None, create=False)
    name, trial = find_trial(storage, study_name, which)
    # the store the study was made with (its recipe), else the default
    made_with = recipe.load(storage_url, study_name) or recipe.load(storage_url, name)
    folder = artifact_dir(store_dir, storage_url, [made_with.get("artifact_dir")])
    with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
        fetch_weights(folder, name, trial, Path(tmp))
        restored = load_weights(Path(tmp))
    return name, trial, restored


def trial_summary(study_name: str, trial: FrozenTrial) -> dict[str, Any]:
    """Where an evaluation or export came from, for the files written beside it."""
    r = TrialRecord.from_trial(trial, study_name)
    return {
        "study": study_name,
        "trial": trial.number,
        "params": trial.params,
        Attr.MODE: r.mode,
        Attr.MODEL: r.model,
        Attr.BEST_EPOCH: r.best_epoch,
        Attr.VAL_F1: r.val_f1,
        Attr.TEST_F1: r.test_f1,
        Attr.ARTIFACT_ID: r.artifact_id,
    }
