"""What a study remembers about how it was made, so that its name and storage are enough later
(the keys and how commands use them: docs/usage.md, "What a study remembers").

A flag given with another value than the recipe's is refused where it would change what the
trials measure (`FIXED_FLAGS`), and accepted where a new value is legitimate (seed, sampler,
pruner, artifact store: how the search goes on, not what it measures). A study with finished
trials but no recipe was made by an older version, whose trials lack attributes this one reads;
it is refused with one line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

import study as package
from storage.artifacts import artifact_dir
from study.config import ConfigError, StudyConfig

if TYPE_CHECKING:
    from study.prepare import Prepared

HUB_PREFIX = "hub:"
# StudyConfig fields kept in the recipe under the same name.
PLAIN = ("model", "max_train_samples", "max_length", "epochs", "seed", "mixed_precision")
SEARCH = ("pruner", "sampler")  # only meaningful for the LoRA study
# Flags that, given with another value than the study's, are refused: the trials would measure
# something else. `data_dir` and `space` are checked by fingerprint and definition instead.
FIXED_FLAGS = ("model", "max_train_samples", "max_length", "epochs", "mixed_precision")
FLAG_NAMES = {"mixed_precision": "--no-mixed-precision"}


def version() -> str:
    """The project version, with the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(package.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{package.__version__}+{commit}" if commit else package.__version__


def data_source(data_dir: str | None) -> str:
    """What the recipe stores for the data: a resolved folder, or the Hub dataset."""
    from objectives.data import HUB_DATASET

    return str(Path(data_dir).resolve()) if data_dir else HUB_PREFIX + HUB_DATASET


def make_recipe(cfg: StudyConfig, prep: Prepared, with_space: bool) -> dict[str, Any]:
    """The user attributes a new study stores (None values are left out)."""
    recipe: dict[str, Any] = {key: getattr(cfg, key) for key in PLAIN}
    recipe.update(
        model_fingerprint=prep.model_fingerprint,
        data_source=data_source(cfg.resolved_data_dir),
        data_fingerprint=prep.ctx.data_fingerprint,
        artifact_dir=str(artifact_dir(cfg.artifact_dir, cfg.storage).resolve()),
        version=version(),
    )
    if with_space:
        recipe["space"] = prep.space.definition()
        recipe.update({key: getattr(cfg, key) for key in SEARCH})
    return {k: v for k, v in recipe.items() if v is not None}


def remember(study: optuna.Study, recipe: Mapping[str, Any]) -> None:
    """Store the recipe's keys the study does not have yet (a study created by plain Optuna
    gains them when a command first runs it; what a study already records is never changed)."""
    stored = study.user_attrs
    for key, value in recipe.items():
        if key not in stored:
            study.set_user_attr(key, value)


def read(study: optuna.Study) -> dict[str, Any]:
    """The recipe of a study; refused (`ConfigError`) for one made by an older version."""
    recipe = dict(study.user_attrs)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    if "version" not in recipe and study.get_trials(deepcopy=False, states=finished):
        raise ConfigError(
            f"study {study.study_name!r} was made by an older version of this project, whose "
            "trials lack attributes this version reads; start a new study with another "
            "--study-name"
        )
    return recipe


def load(storage_url: str, study_name: str) -> dict[str, Any]:
    """The recipe of `study_name` in the storage, or {} when either does not exist yet.

    Opens the storage as a reader: a missing SQLite file is not created.
    """
    from storage import StorageError, get_storage

    try:
        storage = get_storage(storage_url, heartbeat=None, create=False)
    except StorageError:
        return {}  # no storage yet (a first run), or one the command itself will report on
    try:
        return read(optuna.load_study(study_name=study_name, storage=storage))
    except KeyError:
        return {}


def defaults(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """StudyConfig values the recipe provides."""
    values = {key: recipe[key] for key in (*PLAIN, *SEARCH) if key in recipe}
    source = recipe.get("data_source")
    if isinstance(source, str) and source:
        values["data_dir"] = None if source.startswith(HUB_PREFIX) else source
    if "space" in recipe:
        values["space"] = recipe["space"]  # the stored definition; objectives.space reads it
    if "artifact_dir" in recipe:
        values["artifact_dir"] = recipe["artifact_dir"]
    return values


def merge(
    given: Mapping[str, Any],
    recipe: Mapping[str, Any],
    study_name: str,
    fixed: tuple[str, ...] = FIXED_FLAGS,
) -> dict[str, Any]:
    """The study's recipe for the flags not given, then the given ones; a given `fixed` flag
    that differs from the recipe is refused."""
    values = defaults(recipe)
    for key in fixed:
        if key in given and key in values and given[key] != values[key]:
            flag = FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
            raise ConfigError(
                f"study {study_name!r} was made with {key} {values[key]!r}, this call has "
                f"{given[key]!r}: leave {flag} out to use the study's, or pass another "
                "--study-name to start a new study"
            )
    if "data_dir" not in given:
        recorded_data(recipe, study_name)
    return {**values, **given}


def recorded_data(recipe: Mapping[str, Any], study_name: str) -> str | None:
    """The data folder the study was made with (None: the Hub); refused once it is gone."""
    folder = defaults(recipe).get("data_dir")
    if folder and not Path(folder).is_dir():
        raise ConfigError(
            f"study {study_name!r} was made with the data folder {folder}, which no longer "
            "exists; pass --data-dir with the same Banking77 CSVs"
        )
    return folder
