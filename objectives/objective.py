"""The Optuna objectives: the LoRA study's and the fixed full fine-tuning baseline's.

Both follow suggest -> config -> `train(cfg, on_epoch_end=...)` -> value, and record the same
user attributes (DESIGN.md), so the two studies sit side by side in reports and the dashboard.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from objectives.config import (
    BASELINE_PARAMS,
    FIXED,
    LR_FACTOR_ATTR,
    ROLE_ATTR,
    TrainConfig,
)
from objectives.model import build_model, count_params
from objectives.occupancy import Occupancy
from objectives.predictions import encode_labels
from objectives.space import Space
from objectives.train import (
    EpochResult,
    GraphMemoryError,
    PreparedData,
    RunSetup,
    TrainingFailed,
    TrainResult,
    release_memory,
    train,
)

# Receives a COMPLETE trial's model (holding its best epoch's weights) before the trial ends:
# a finished trial's attributes and artifacts can no longer be written.
KeepWeights = Callable[[optuna.Trial, nn.Module, TrainConfig, TrainResult], None]


class DuplicateRun(TrainingFailed):
    """Another worker already runs this (single-run) study's trial."""


# A trial that fails for these reasons ends as FAIL and the study goes on; any other exception
# is a bug and stops the study.
TRIAL_FAILURES = (TrainingFailed,)


@dataclass(frozen=True)
class RunContext:
    """What every trial of a process shares: built once in `main()`, passed in."""

    base_model: nn.Module  # pretrained weights on the CPU, copied per trial
    data: PreparedData
    model_name: str
    data_fingerprint: str
    label_names: tuple[str, ...]
    progress: bool = False  # bars; otherwise one plain line per epoch on stderr
    keep_weights: KeepWeights | None = None  # None: no weights are kept


def run_trial(trial: optuna.Trial, cfg: TrainConfig, ctx: RunContext, prune: bool) -> float:
    """Train one configuration inside a trial; return the best validation macro-F1.

    A trial that trained all its epochs is never pruned: pruning it would save nothing and lose
    its test F1 and weights.
    """
    model = build_model(ctx.base_model, cfg)
    load = Occupancy(str(ctx.data.device))
    try:
        counts = count_params(model)
        vocab = model.get_input_embeddings().num_embeddings
        for key, value in {
            "mode": cfg.mode,
            "trainable_params": counts.trainable,
            "total_params": counts.total,
            "trainable_share_pct": counts.share_pct,
            "model": ctx.model_name,
            "device": str(ctx.data.device),
            "seed": cfg.seed,
            "data_fingerprint": ctx.data_fingerprint,
            "max_epochs": cfg.epochs,
            "torch_threads": torch.get_num_threads(),
        }.items():
            trial.set_user_attr(key, value)
        if ctx.data.max_token_id >= vocab:
            raise TrainingFailed(
                f"tokenizer/model mismatch: token id {ctx.data.max_token_id} but the model's "
                f"embedding table has {vocab} rows"
            )

        best: list[EpochResult] = []
        # Trials training on this device meanwhile, the most seen at the start and after each
        # epoch: times are comparable only between trials that ran under the same load.
        busy = [0]

        def note_load() -> None:
            busy[0] = max(busy[0], load.others())
            trial.set_user_attr("concurrent_trials", busy[0])

        def on_epoch_end(r: EpochResult) -> None:
            note_load()
            if not ctx.progress:  # a log, not bars: one plain line per epoch
                print(
                    f"{trial.study.study_name} trial {trial.number} epoch {r.epoch}/{cfg.epochs}:"
                    f" val F1 {r.val_f1:.4f}, loss {r.train_loss:.4f}, {r.train_time_s:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            if not best or r.val_f1 > best[0].val_f1:
                best[:] = [r]
            trial.report(r.val_f1, r.epoch)
            trial.set_user_attr("epochs_run", r.epoch)
            trial.set_user_attr("train_time_s", r.train_time_s)
            trial.set_user_attr("best_epoch", best[0].epoch)
            trial.set_user_attr("val_f1", best[0].val_f1)
            trial.set_user_attr("val_accuracy", best[0].val_accuracy)
            if prune and r.epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {r.epoch} (val F1 {r.val_f1:.4f})")

        lost_s = 0.0  # a failed graphed attempt's time: the user waited for it too

        def on_setup(s: RunSetup) -> None:
            trial.set_user_attr("setup_time_s", s.setup_time_s + lost_s)
            trial.set_user_attr("cuda_graphs", s.graphs)

        try:
            with load:
                note_load()
                try:
                    result = train(
                        model, cfg, ctx.data, on_epoch_end, progress=ctx.progress, on_setup=on_setup
                    )
                except GraphMemoryError as e:
                    # The graphs' pools and the optimizer state did not fit: once more, eagerly,
                    # from fresh weights (the failed step may have half-updated these).
                    lost_s, reason = e.elapsed_s, f"{e}; retried eagerly"
                    drop_frames(e, keep_text=False)
                    model = None
                    release_memory(ctx.data.device)
                    model = build_model(ctx.base_model, cfg)
                    result = train(
                        model,
                        cfg,
                        ctx.data,
                        on_epoch_end,
                        progress=ctx.progress,
                        on_setup=on_setup,
                        eager_reason=reason,
                    )
        except torch.OutOfMemoryError as e:
            raise TrainingFailed(f"out of memory on {ctx.data.device}: {str(e)[:200]}") from e
        for key, value in {
            "test_f1": result.test_f1,
            "test_accuracy": result.test_accuracy,
            "peak_mem_mb": round(result.peak_mem_mb, 1),
            "labels": list(ctx.label_names),
            "test_confusion": result.test_confusion.tolist(),
            # per example, for the paired test-set comparisons of the report
            "test_predictions": encode_labels(result.test_predictions),
            "test_labels": encode_labels(ctx.data.test.labels),
        }.items():
            trial.set_user_attr(key, value)
        if ctx.keep_weights is not None:
            ctx.keep_weights(trial, model, cfg, result)
        return result.val_f1
    except TrainingFailed as e:
        trial.set_user_attr("fail_reason", str(e))
        drop_frames(e)
        raise
    except optuna.TrialPruned as e:
        drop_frames(e, keep_text=False)
        raise
    finally:
        del model
        release_memory(ctx.data.device)


def drop_frames(e: BaseException, keep_text: bool = True) -> None:
    """Let go of the frames an exception's traceback holds (and its chained exceptions').

    A pruned or failed trial ends in an exception raised inside `train()`. Its traceback keeps
    every frame down to the raise alive, with their variables and functions: the model, the
    optimizer, the CUDA graphs (through `train()`'s step closures and torch's graphed callables),
    for as long as the exception lives, and Optuna keeps it beyond the trial (in a reference
    cycle only the garbage collector breaks). Clearing the frames' variables is not enough: a
    frame still holds the closure it runs. So the traceback goes; its text is kept as a note on
    the exception (`keep_text`), which Optuna's log of a failed trial prints. The next raise
    starts a fresh traceback from the frame that raises.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if keep_text and exc.__traceback__ is not None:
            exc.add_note("".join(traceback.format_tb(exc.__traceback__)).rstrip())
        exc.__traceback__ = None
        todo += [exc.__cause__, exc.__context__]


@dataclass(frozen=True)
class LoraObjective:
    space: Space
    base_cfg: TrainConfig  # epochs, seed, precision; sampled fields are replaced per trial
    ctx: RunContext

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = replace(self.base_cfg, mode="lora", **self.space.suggest(trial))
        return run_trial(trial, cfg, self.ctx, prune=True)


@dataclass(frozen=True)
class BaselineObjective:
    """The fixed full fine-tuning run; its settings are recorded as single-valued params.

    A trial queued with the user attributes `baseline_role` = neighbour and `lr_factor` = f
    trains the same configuration at f x the learning rate (`baseline --sensitivity`); any other
    trial is the fixed run, the yardstick.
    """

    cfg: TrainConfig
    ctx: RunContext

    def __call__(self, trial: optuna.Trial) -> float:
        role = trial.user_attrs.get(ROLE_ATTR, FIXED)
        factor = float(trial.user_attrs.get(LR_FACTOR_ATTR, 1.0)) if role != FIXED else 1.0
        # Workers that start together may each open the same run; the lowest number runs it.
        rivals = trial.study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)
        )
        first = min(
            (t.number for t in rivals if t.number < trial.number and _run_of(t) == (role, factor)),
            default=None,
        )
        trial.set_user_attr(ROLE_ATTR, role)
        trial.set_user_attr(LR_FACTOR_ATTR, factor)
        if first is not None:
            what = "the baseline" if role == FIXED else f"the baseline at lr x {factor:.3g}"
            trial.set_user_attr("fail_reason", f"trial {first} already runs {what}")
            raise DuplicateRun(f"trial {first} already runs {what}")
        cfg = replace(self.cfg, learning_rate=self.cfg.learning_rate * factor)
        for name in BASELINE_PARAMS:
            value = getattr(cfg, name)
            if isinstance(value, str):
                trial.suggest_categorical(name, [value])
            elif isinstance(value, int):
                trial.suggest_int(name, value, value)
            else:
                trial.suggest_float(name, value, value)
        return run_trial(trial, cfg, self.ctx, prune=False)


def _run_of(trial: optuna.trial.FrozenTrial) -> tuple[str, float]:
    """(role, learning-rate factor) of a baseline-study trial; trials from before roles: fixed."""
    role = trial.user_attrs.get(ROLE_ATTR, FIXED)
    return role, float(trial.user_attrs.get(LR_FACTOR_ATTR, 1.0)) if role != FIXED else 1.0
