"""Orchestration: build the shared run context, open studies safely, run the baseline and trials.

Everything that can be wrong with the input (space, data, model, device, storage URL, a study of
the same name made with another model or data) is checked before the first write to storage.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from objectives.config import TrainConfig
from objectives.data import IntentData, encode, load_data
from objectives.model import load_pretrained
from objectives.objective import (
    TRIAL_FAILURES,
    BaselineObjective,
    LoraObjective,
    RunContext,
    baseline_config,
)
from objectives.space import Space, load_space
from objectives.train import detect_device, prepare
from storage import get_storage, parse_url
from study.config import BASELINE_SUFFIX, ConfigError, StudyConfig

OBJECTIVE_NAME = "val_macro_f1"
DIRECTION = "maximize"


class MixingError(ConfigError):
    """The study exists but was made with another model, data, space or direction."""


@dataclass(frozen=True)
class Prepared:
    """Everything a process builds once and every trial shares."""

    ctx: RunContext
    space: Space
    data: IntentData


def prepare_run(cfg: StudyConfig, need_space: bool = True) -> Prepared:
    """Validate and build, touching no storage: space, URL, data, device, model, tensors."""
    space = load_space(cfg.space) if need_space else load_space(None)
    parse_url(cfg.storage)
    data = load_data(cfg.resolved_data_dir, cfg.max_train_samples)
    device = detect_device(cfg.device)
    base_model, tokenizer = load_pretrained(cfg.model, data.label_names)
    encoded = encode(data, tokenizer, cfg.max_length)
    ctx = RunContext(
        base_model=base_model,
        data=prepare(encoded, data.num_labels, device),
        model_name=cfg.model,
        data_fingerprint=data.fingerprint,
        label_names=tuple(data.label_names),
        progress=cfg.progress,
    )
    return Prepared(ctx, space, data)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}")


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=epochs, reduction_factor=3
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}")


def study_identity(cfg: StudyConfig, prep: Prepared, with_space: bool) -> dict[str, Any]:
    """What must match for trials to be comparable within one study."""
    ident = {
        "model": cfg.model,
        "data_fingerprint": prep.ctx.data_fingerprint,
        "direction": DIRECTION,
        "objective": OBJECTIVE_NAME,
    }
    if with_space:
        ident["space"] = prep.space.definition()
    return ident


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    identity: dict[str, Any],
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Load the study if it exists (refusing one made differently), else create it."""
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction=DIRECTION,
            load_if_exists=True,  # another worker may create it at the same moment
        )
        if "model" not in study.user_attrs:
            study.set_metric_names([OBJECTIVE_NAME])
            for key, value in identity.items():
                study.set_user_attr(key, value)
            return study
    check_identity(name, study, identity)
    return study


def check_identity(name: str, study: optuna.Study, identity: dict[str, Any]) -> None:
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise MixingError(f"study {name!r} minimises its objective; this project maximises F1")
    stored = study.user_attrs
    for key, value in identity.items():
        if key in stored and stored[key] != value:
            shown = _short(stored[key]), _short(value)
            raise MixingError(
                f"study {name!r} was made with {key} {shown[0]}, this run has {shown[1]}; "
                "pass another --study-name to start a new study"
            )


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def train_config(cfg: StudyConfig) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, seed=cfg.seed, mixed_precision=cfg.mixed_precision)


def ensure_baseline(
    storage: optuna.storages.BaseStorage, cfg: StudyConfig, prep: Prepared
) -> optuna.Study:
    """Run the fixed full-FT baseline unless a complete (or running) one exists."""
    study = open_study(
        storage, cfg.baseline_name, study_identity(cfg, prep, with_space=False), pruner=None
    )
    optuna.storages.fail_stale_trials(study)
    states = {t.state for t in study.get_trials(deepcopy=False)}
    if TrialState.COMPLETE in states or TrialState.RUNNING in states:
        return study
    print(
        f"running the full fine-tuning baseline into study {cfg.baseline_name!r}", file=sys.stderr
    )
    objective = BaselineObjective(
        baseline_config(cfg.epochs, cfg.seed, cfg.mixed_precision), prep.ctx
    )
    study.optimize(objective, n_trials=1, catch=TRIAL_FAILURES)
    return study


def run_baseline(cfg: StudyConfig) -> optuna.Study:
    """The `baseline` command: the fixed full-FT run, once per storage and study name."""
    prep = prepare_run(cfg, need_space=False)
    return ensure_baseline(get_storage(cfg.storage), cfg, prep)


def run_optimize(cfg: StudyConfig) -> tuple[optuna.Study, optuna.Study]:
    """The `optimize` command: baseline first, then `cfg.n_trials` new LoRA trials."""
    prep = prepare_run(cfg)
    storage = get_storage(cfg.storage)
    identity = study_identity(cfg, prep, with_space=True)
    # Check the LoRA study before anything (the baseline included) is written.
    try:
        existing = optuna.load_study(study_name=cfg.study_name, storage=storage)
        check_identity(cfg.study_name, existing, identity)
    except KeyError:
        pass
    baseline = ensure_baseline(storage, cfg, prep)
    study = open_study(
        storage,
        cfg.study_name,
        identity,
        sampler=make_sampler(cfg.sampler, cfg.seed),
        pruner=make_pruner(cfg.pruner, cfg.epochs),
    )
    objective = LoraObjective(prep.space, train_config(cfg), prep.ctx)
    study.optimize(
        objective,
        n_trials=cfg.n_trials,
        timeout=cfg.timeout,
        catch=TRIAL_FAILURES,
        show_progress_bar=cfg.progress,
    )
    return study, baseline


def load_studies(
    storage: optuna.storages.BaseStorage, name: str
) -> tuple[optuna.Study, optuna.Study | None]:
    """The LoRA study and, when it exists, its baseline; a missing LoRA study is a user error."""
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise ConfigError(
            f"no study named {name!r} in this storage; it has: {', '.join(names) or 'no studies'}"
        )
    baseline_name = name + BASELINE_SUFFIX
    baseline = (
        optuna.load_study(study_name=baseline_name, storage=storage)
        if baseline_name in names
        else None
    )
    return optuna.load_study(study_name=name, storage=storage), baseline
