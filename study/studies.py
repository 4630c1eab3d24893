"""`python -m study studies`: what a storage holds, one line per study (docs/usage.md,
"Listing studies"), and the lookups of a study by name."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

from objectives.record import best_trials, count_states
from study import recipe
from study.config import BASELINE_SUFFIX, CONFIRM_SUFFIX, ConfigError
from study.terminal import aligned

STUDY_COLUMNS = ("study", "role", "trials", "best val F1", "baseline val F1", "model", "data")
WIDE = 40  # longer model or data paths keep their end, where the name is


def role_of(name: str) -> str:
    if name.endswith(BASELINE_SUFFIX):
        return "baseline"
    if name.endswith(CONFIRM_SUFFIX):
        return "confirm"
    return "LoRA study"


def _trials_cell(trials: Sequence[FrozenTrial]) -> str:
    """`6 (3 complete, 3 pruned)`, states in alphabetical order."""
    counts = sorted(count_states(trials).items())
    parts = ", ".join(f"{n} {state.lower()}" for state, n in counts)
    return f"{len(trials)}" + (f" ({parts})" if parts else "")


def best_text(trials: Sequence[FrozenTrial]) -> str:
    best = best_trials(trials, 1)
    return f"{best[0].value:.4f} (#{best[0].number})" if best else "-"


def _short(text: object) -> str:
    text = "-" if text is None else str(text)
    return text if len(text) <= WIDE else "..." + text[-(WIDE - 3) :]


def study_rows(studies: Sequence[optuna.Study]) -> list[list[str]]:
    """One row per study in `STUDY_COLUMNS` order; each LoRA study is followed by its baseline
    and its confirm study."""
    trials = {s.study_name: s.get_trials(deepcopy=False) for s in studies}
    order = {"LoRA study": 0, "baseline": 1, "confirm": 2}
    rows = []
    for s in studies:
        name, attrs, role = s.study_name, s.user_attrs, role_of(s.study_name)
        baseline = trials.get(name + BASELINE_SUFFIX) if role == "LoRA study" else None
        family = name.removesuffix(BASELINE_SUFFIX).removesuffix(CONFIRM_SUFFIX)
        row = [
            name,
            role,
            _trials_cell(trials[name]),
            best_text(trials[name]),
            best_text(baseline) if baseline is not None else "-",
            _short(attrs.get("model")),
            _short(attrs.get("data_source", attrs.get("data_fingerprint"))),
        ]
        rows.append(((family, order[role]), row))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


def all_studies(storage: optuna.storages.BaseStorage) -> list[optuna.Study]:
    return [
        optuna.load_study(study_name=name, storage=storage)
        for name in optuna.get_all_study_names(storage)
    ]


def list_studies(storage: optuna.storages.BaseStorage) -> str:
    rows = study_rows(all_studies(storage))
    if not rows:
        return "no studies in this storage"
    return aligned(STUDY_COLUMNS, rows, left=("study", "role", "model", "data"))


def load_studies(
    storage: optuna.storages.BaseStorage, name: str
) -> tuple[optuna.Study, optuna.Study | None]:
    """The LoRA study and, when it exists, its baseline; a missing LoRA study is a user error."""
    study = named_study(storage, name)
    baseline = study_or_none(storage, name + BASELINE_SUFFIX)
    for made in (study, baseline):
        if made is not None:
            recipe.read(made)  # a study made by an older version is refused here
    return study, baseline


def named_study(
    storage: optuna.storages.BaseStorage, name: str, missing: str = "no study"
) -> optuna.Study:
    """Study `name`; where there is none, a user error says `missing` and lists the studies."""
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise ConfigError(
            f"{missing} named {name!r} in this storage; it has: {', '.join(names) or 'no studies'}"
        )
    return optuna.load_study(study_name=name, storage=storage)


def study_or_none(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    """Study `name` of the storage, or None when it has none of that name."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
