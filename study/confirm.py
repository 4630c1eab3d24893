"""`python -m study confirm`: re-train the best LoRA trials and the baseline with several seeds,
as trials of the study `<NAME>-confirm` (docs/methodology.md, "Seed repeats").

Runs are queued as WAITING trials first, so an interrupted `confirm` resumes where it stopped,
a run whose worker died is failed by the heartbeat and queued again, and several `confirm`
processes on one storage share the queue. The statistics over the seeds are in `reports.confirm`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from objectives.config import TrainConfig, run_config
from objectives.objective import TRIAL_FAILURES, RunContext, run_trial
from objectives.record import Attr, TrialRecord, best_trials
from storage import get_storage
from study.config import CONFIRM_SUFFIX, ConfigError, StudyConfig
from study.prepare import prepare_run
from study.quota import optimize_quota
from study.runner import check_identity, open_study, study_identity
from study.studies import load_studies

JOB_KEYS = (Attr.SOURCE_STUDY, Attr.SOURCE_TRIAL, Attr.SEED)


def confirm_name(study_name: str) -> str:
    return study_name + CONFIRM_SUFFIX


@dataclass(frozen=True)
class Job:
    """One re-training run: a source trial's configuration with one seed."""

    source_study: str
    source_trial: int
    mode: str  # lora or full
    params: dict[str, Any]  # the source trial's parameters (TrainConfig field names)
    epochs: int
    seed: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.source_study, self.source_trial, self.seed)

    def user_attrs(self) -> dict[str, Any]:
        return {
            Attr.SOURCE_STUDY: self.source_study,
            Attr.SOURCE_TRIAL: self.source_trial,
            Attr.SEED: self.seed,
            Attr.SOURCE_MODE: self.mode,
            Attr.SOURCE_EPOCHS: self.epochs,
            Attr.SOURCE_PARAMS: self.params,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Job | None:
        """The job a queued trial names, or None for a trial that names none."""
        try:
            return cls(
                attrs[Attr.SOURCE_STUDY],
                int(attrs[Attr.SOURCE_TRIAL]),
                attrs[Attr.SOURCE_MODE],
                dict(attrs[Attr.SOURCE_PARAMS]),
                int(attrs[Attr.SOURCE_EPOCHS]),
                int(attrs[Attr.SEED]),
            )
        except (KeyError, TypeError, ValueError):
            return None


def plan_jobs(
    lora: optuna.Study, baseline: optuna.Study, top: int, seeds: list[int], epochs: int | None
) -> list[Job]:
    """Every run the confirmation needs: top LoRA trials and the baseline, each with every seed.

    `epochs` None trains as many epochs as the source trial was given (`max_epochs`).
    """
    chosen = best_trials(lora.get_trials(deepcopy=False), top)
    if not chosen:
        raise ConfigError(f"study {lora.study_name!r} has no COMPLETE LoRA trial to confirm")
    base = best_trials(baseline.get_trials(deepcopy=False), 1)
    if not base:
        raise ConfigError(
            f"study {baseline.study_name!r} has no COMPLETE baseline; run `optimize` or "
            "`baseline` first"
        )
    jobs = []
    for study, trials, mode in ((lora, chosen, "lora"), (baseline, base, "full")):
        for t in trials:
            budget = TrialRecord.from_trial(t, "").max_epochs
            n_epochs = epochs or (TrainConfig().epochs if budget is None else budget)
            for seed in seeds:
                jobs.append(Job(study.study_name, t.number, mode, dict(t.params), n_epochs, seed))
    return jobs


@dataclass(frozen=True)
class ConfirmObjective:
    """Trains the job a queued trial names (its user attributes), without pruning.

    The configuration stays in the user attribute `source_params`, not in trial parameters: one
    study holds LoRA and baseline runs, whose parameters Optuna would refuse to mix (a
    categorical `lr_scheduler` with other choices, `batch_size` sampled as int or categorical).

    The job is read from the trial, not from this call's plan, so runs queued by an earlier call
    (another --top or --seeds, or a dead worker's run queued again) are trained as queued.
    """

    ctx: RunContext
    mixed_precision: bool

    def config(self, job: Job) -> TrainConfig:
        base = run_config(job.mode, job.epochs, job.seed, self.mixed_precision)
        return replace(base, **job.params)

    def __call__(self, trial: optuna.Trial) -> float:
        job = Job.from_attrs(trial.user_attrs)
        # Only queued trials are run. None left: another `confirm` took the last run between
        # this process's `stop_when_drained` check and its next ask.
        if job is None:
            raise RuntimeError(f"trial {trial.number} of {trial.study.study_name} names no run")
        return run_trial(trial, self.config(job), self.ctx, prune=False)


def queue_jobs(study: optuna.Study, jobs: list[Job]) -> int:
    """Queue the jobs not yet COMPLETE, queued or running; return how many are WAITING now."""
    optuna.storages.fail_stale_trials(study)  # a dead worker's run: FAIL, and queued again
    active = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    taken = {
        tuple(t.user_attrs.get(k) for k in JOB_KEYS)
        for t in study.get_trials(deepcopy=False, states=active)
    }
    for job in jobs:
        if job.key not in taken:
            study.enqueue_trial({}, user_attrs=job.user_attrs())
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_confirm(
    cfg: StudyConfig, top: int, n_seeds: int, epochs: int | None
) -> tuple[optuna.Study, list[Job]]:
    """The `confirm` command: queue the runs, then train every queued one. `top`, `n_seeds`
    and `epochs` are checked with the other flags (`study.config.check_confirm_counts`)."""
    storage = get_storage(cfg.storage, cfg.heartbeat, create=False)
    lora, baseline = load_studies(storage, cfg.study_name)
    if baseline is None:
        raise ConfigError(f"no baseline study {cfg.baseline_name!r} in this storage")
    prep = prepare_run(cfg, need_space=False)
    identity = study_identity(cfg, prep, with_space=False)
    check_identity(cfg.study_name, lora, identity)  # same model and data, or refuse
    seeds = [cfg.seed + 1 + i for i in range(n_seeds)]
    jobs = plan_jobs(lora, baseline, top, seeds, epochs)
    # each run trains as many epochs as its source trial: the study itself has no epochs
    changes = {"source_study": cfg.study_name, "epochs": None}
    name = confirm_name(cfg.study_name)
    study = open_study(storage, name, cfg, prep, with_space=False, recipe_changes=changes)
    waiting = queue_jobs(study, jobs)
    print(
        f"confirm: {len(jobs)} runs ({top} best LoRA trial(s) and the baseline, seeds "
        f"{seeds[0]}..{seeds[-1]}) into {study.study_name!r}; {waiting} to train now",
        file=sys.stderr,
    )
    objective = ConfirmObjective(prep.ctx, cfg.mixed_precision)
    if waiting:
        optimize_quota(
            study, objective, n_trials=waiting, catch=TRIAL_FAILURES, callbacks=[stop_when_drained]
        )
    return study, jobs


def stop_when_drained(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Stop once no run is queued: other `confirm` processes sharing the storage take runs
    from the same queue, and a trial started with none left would name no run."""
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.stop()
