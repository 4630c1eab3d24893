"""Orchestration: build the shared run context, open studies safely, run the baseline and trials.

Everything that can be wrong with the input (space, data, model, device, storage URL, a study of
the same name made with another model or data) is checked before the first write to storage.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from objectives.config import FIXED, NEIGHBOUR, SENSITIVITY_FACTORS
from objectives.device import cuda_device_count, detect_device, worker_device
from objectives.objective import (
    TRIAL_FAILURES,
    BaselineObjective,
    LoraObjective,
)
from objectives.record import Attr, is_neighbour
from storage import EXIT_UNAVAILABLE, get_storage, unavailable_in
from study import recipe
from study.config import ConfigError, StudyConfig
from study.keeper import keeping_weights
from study.notes import DashboardNotes, dashboard_missing
from study.prepare import Prepared, prepare_run
from study.quota import optimize_quota
from study.studies import study_or_none

OBJECTIVE_NAME = "val_macro_f1"
DIRECTION = "maximize"


class WorkerError(RuntimeError):
    """A worker process of `--workers` died; its own output says why."""


class MixingError(ConfigError):
    """The study exists but was made with another model, data, space or direction."""


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
    if prep.model_fingerprint is not None:
        ident["model_fingerprint"] = prep.model_fingerprint  # same path, other weights: refused
    if with_space:
        ident["space"] = prep.space.definition()
    return ident


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    cfg: StudyConfig,
    prep: Prepared,
    with_space: bool,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    recipe_changes: dict[str, Any] | None = None,
) -> optuna.Study:
    """Load study `name` if it exists (refusing one made differently, `study_identity`), else
    create it; either way it remembers its recipe (`recipe.make_recipe` with `recipe_changes`, a
    None value leaving its key out; keys it already has are kept)."""
    identity = study_identity(cfg, prep, with_space)
    made = {**recipe.make_recipe(cfg, prep, with_space), **(recipe_changes or {})}
    made_with = {key: value for key, value in made.items() if value is not None}
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
            # keys another worker stored first are kept, and then checked like any study's
            recipe.remember(study, identity)
    check_identity(name, study, identity)
    recipe.remember(study, made_with)
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


def ensure_baseline(
    storage: optuna.storages.BaseStorage,
    cfg: StudyConfig,
    prep: Prepared,
    force: bool = False,
    sensitivity: bool = False,
) -> optuna.Study:
    """Run the fixed full-FT baseline unless one is complete or running; with `sensitivity`,
    also its configuration at lr / 3 and lr x 3 unless those exist.

    A killed run is failed by the heartbeat and retried (its copy waits in the study). A fixed
    run that failed for a reason of its own (NaN, out of memory) is not retried here, where it
    would fail again on every call; `force` (the `baseline` command) runs it again. Every run is
    queued first and the queue is then trained, so an interrupted call resumes where it stopped.
    """
    study = open_study(storage, cfg.baseline_name, cfg, prep, with_space=False)
    optuna.storages.fail_stale_trials(study)
    queue = _missing_runs(study.get_trials(deepcopy=False), force, sensitivity)
    for attrs in queue:
        study.enqueue_trial({}, user_attrs=attrs)
    # Optuna trains queued trials oldest first, whichever this call queued: train them all.
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    fixed_waiting = any(not is_neighbour(t.user_attrs) for t in waiting)
    if not waiting or not (queue or fixed_waiting or sensitivity):
        return study
    what = "baseline" if not sensitivity else "baseline and its learning-rate neighbours"
    print(
        f"running the full fine-tuning {what} ({len(waiting)} run(s)) into study "
        f"{cfg.baseline_name!r}",
        file=sys.stderr,
    )
    objective = BaselineObjective(
        cfg.train_config("full"),
        keeping_weights(prep, cfg, always=True),  # the baseline keeps its weights whatever --keep
    )
    optimize_quota(study, objective, n_trials=len(waiting), catch=TRIAL_FAILURES)
    return study


def _missing_runs(
    trials: Sequence[FrozenTrial], force: bool, sensitivity: bool
) -> list[dict[str, Any]]:
    """The user attributes of the baseline runs to queue: the fixed run unless one is active
    (or failed for a reason of its own, without `force`), and the missing neighbours."""
    active = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    fixed = [t for t in trials if not is_neighbour(t.user_attrs)]
    queue: list[dict[str, Any]] = []
    if not any(t.state in active for t in fixed):
        if fixed and not force:
            reason = fixed[-1].user_attrs.get(Attr.FAIL_REASON, "see the study")
            print(
                f"warning: the baseline failed ({reason}); run `python -m study baseline` to retry",
                file=sys.stderr,
            )
        else:
            queue.append({Attr.ROLE: FIXED, Attr.LR_FACTOR: 1.0})
    if sensitivity:
        present = {
            round(float(t.user_attrs.get(Attr.LR_FACTOR, 0.0)), 6)
            for t in trials
            if is_neighbour(t.user_attrs) and t.state in active
        }
        queue += [
            {Attr.ROLE: NEIGHBOUR, Attr.LR_FACTOR: f}
            for f in SENSITIVITY_FACTORS
            if round(f, 6) not in present
        ]
    return queue


def run_baseline(cfg: StudyConfig) -> optuna.Study:
    """The `baseline` command: the fixed full-FT run, once per storage and study name."""
    prep = prepare_run(cfg, need_space=False)
    storage = get_storage(cfg.storage, cfg.heartbeat)
    return ensure_baseline(storage, cfg, prep, force=True, sensitivity=cfg.baseline_sensitivity)


def split_trials(n_trials: int, workers: int) -> list[int]:
    """Trials per worker, summing exactly to n_trials (the first ones take the remainder)."""
    base, extra = divmod(n_trials, workers)
    return [base + (i < extra) for i in range(workers)]


def optimize_worker(
    cfg: StudyConfig,
    n_trials: int,
    worker: int,
    prep: Prepared | None = None,
    notes: bool = True,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
):
    """One worker: its own sampler seed (so workers do not propose the same points), the study.

    `notes`: keep the dashboard note and plots current; `callbacks` run after every trial too.
    """
    share_cpu_threads(cfg)
    prep = prep or prepare_run(cfg)
    storage = get_storage(cfg.storage, cfg.heartbeat, wait=True)  # it worked for the parent
    seed = cfg.seed if cfg.sampler_seed is None else cfg.sampler_seed
    study = open_study(
        storage,
        cfg.study_name,
        cfg,
        prep,
        with_space=True,
        sampler=make_sampler(cfg.sampler, seed + worker),
        pruner=make_pruner(cfg.pruner, cfg.epochs),
    )
    objective = LoraObjective(prep.space, cfg.train_config(), keeping_weights(prep, cfg))
    optimize_quota(  # study.optimize, surviving a trial taken over after a database outage
        study,
        objective,
        n_trials=n_trials,
        timeout=cfg.timeout,
        catch=TRIAL_FAILURES,
        show_progress_bar=cfg.progress and worker == 0,
        # the note and plots in the dashboard, where optuna-dashboard and plotly are installed
        callbacks=[*([DashboardNotes(storage, cfg.baseline_name)] if notes else []), *callbacks],
    )
    return study


def share_cpu_threads(cfg: StudyConfig) -> None:
    """On a CPU, give each of `cfg.workers` processes its share of the cores.

    Every process would otherwise start one PyTorch thread per core, and N workers would fight
    over the cores N times over. GPUs are shared by the driver; nothing to do there.
    """
    if cfg.workers > 1 and detect_device(cfg.device).type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // cfg.workers))


def _spawned_worker(cfg: StudyConfig, n_trials: int, worker: int, notes: bool = True) -> None:
    from study.quiet import quiet_libraries

    quiet_libraries()
    try:
        optimize_worker(replace(cfg, progress=False), n_trials, worker, notes=notes)
    except KeyboardInterrupt:
        sys.exit(130)  # the interrupted trial is already marked FAIL by Optuna
    except Exception as e:
        outage = unavailable_in(e)  # the database stayed away: one line, as the CLI prints it
        if outage is None:
            raise
        print(f"error: {outage}", file=sys.stderr)
        sys.exit(EXIT_UNAVAILABLE)


def run_optimize(cfg: StudyConfig) -> tuple[optuna.Study, optuna.Study]:
    """The `optimize` command: baseline first, then `cfg.n_trials` new LoRA trials."""
    prep = prepare_run(cfg)
    storage = get_storage(cfg.storage, cfg.heartbeat)
    existing = study_or_none(storage, cfg.study_name)
    if existing is not None:  # checked before anything (the baseline included) is written
        check_identity(cfg.study_name, existing, study_identity(cfg, prep, with_space=True))
    baseline = ensure_baseline(storage, cfg, prep, sensitivity=cfg.baseline_sensitivity)
    return run_workers(cfg, prep, storage), baseline


def run_workers(
    cfg: StudyConfig, prep: Prepared, storage: optuna.storages.BaseStorage
) -> optuna.Study:
    """`cfg.n_trials` new LoRA trials, shared among `cfg.workers` processes (this one included),
    each with its own model copy, all writing to `storage` (that of `cfg.storage`)."""
    lora = open_study(storage, cfg.study_name, cfg, prep, with_space=True)  # before the workers
    missing = dashboard_missing()
    if missing:  # said once here, instead of by every worker after every trial
        print(
            f"warning: {missing} is not installed: no study note or plots in optuna-dashboard "
            "(the trials are stored as usual; `python -m study report` draws the plots later)",
            file=sys.stderr,
        )
    else:
        DashboardNotes(storage, cfg.baseline_name).refresh(lora)  # shown before any trial ends
    quotas = split_trials(cfg.n_trials, cfg.workers)
    # Worker k trains on GPU k mod (visible GPUs) unless one device was named (worker_device).
    gpus = cuda_device_count() if cfg.workers > 1 else 0
    # spawn, not fork: CUDA and the tokenizer's threads do not survive a fork
    mp = multiprocessing.get_context("spawn")
    procs = [
        mp.Process(
            target=_spawned_worker,
            args=(replace(cfg, device=worker_device(cfg.device, i, gpus)), n, i, not missing),
            name=f"worker-{i}",
        )
        for i, n in enumerate(quotas)
        if i > 0 and n > 0
    ]
    for p in procs:
        p.start()
    try:
        study = optimize_worker(cfg, quotas[0], 0, prep, notes=not missing)
    finally:
        for p in procs:
            p.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise WorkerError(f"{', '.join(failed)} stopped with an error (see its output above)")
    return study
