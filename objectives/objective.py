"""The Optuna objectives: the LoRA study's and the fixed full fine-tuning baseline's.

Both follow suggest -> config -> `train(cfg, on_epoch_end=...)` -> value, and record the same
user attributes (`objectives.record`), so the two studies sit side by side in reports and the
dashboard.
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

from objectives.batching import PreparedData
from objectives.config import (
    BASELINE_PARAMS,
    FIXED,
    TrainConfig,
)
from objectives.device import release_memory
from objectives.model import build_model, count_params
from objectives.occupancy import Occupancy
from objectives.predictions import encode_labels
from objectives.record import Attr
from objectives.space import ParamSpec, Space
from objectives.train import (
    EpochResult,
    GraphMemoryError,
    RunSetup,
    TrainingFailed,
    TrainResult,
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
        _record_start(trial, cfg, ctx, model)
        reporter = _EpochReporter(trial, cfg, ctx, prune, load)
        try:
            with load:
                reporter.note_load()
                eager_reason = None  # set once a graphed attempt ran out of memory
                while True:
                    try:
                        result = train(
                            model,
                            cfg,
                            ctx.data,
                            reporter,
                            progress=ctx.progress,
                            on_setup=reporter.on_setup,
                            eager_reason=eager_reason,
                        )
                        break
                    except GraphMemoryError as e:
                        if eager_reason is not None:
                            raise
                        # The graphs' pools and the optimizer state did not fit: once more,
                        # eagerly, from fresh weights (the failed step may have half-updated
                        # these). Here, so this frame lets go of the failed model first.
                        reporter.lost_s, eager_reason = e.elapsed_s, f"{e}; retried eagerly"
                        drop_frames(e, keep_text=False)
                        model = None
                        release_memory(ctx.data.device)
                        model = build_model(ctx.base_model, cfg)
        except torch.OutOfMemoryError as e:
            raise TrainingFailed(f"out of memory on {ctx.data.device}: {str(e)[:200]}") from e
        _record_result(trial, ctx, result)
        if ctx.keep_weights is not None:
            ctx.keep_weights(trial, model, cfg, result)
        return result.val_f1
    except TrainingFailed as e:
        trial.set_user_attr(Attr.FAIL_REASON, str(e))
        drop_frames(e)
        raise
    except optuna.TrialPruned as e:
        drop_frames(e, keep_text=False)
        raise
    finally:
        del model
        release_memory(ctx.data.device)


def _record_start(trial: optuna.Trial, cfg: TrainConfig, ctx: RunContext, model: nn.Module) -> None:
    """What the trial trains and where; a tokenizer the model cannot embed fails it at once."""
    counts = count_params(model)
    for key, value in {
        Attr.MODE: cfg.mode,
        Attr.TRAINABLE_PARAMS: counts.trainable,
        Attr.TOTAL_PARAMS: counts.total,
        Attr.TRAINABLE_SHARE_PCT: counts.share_pct,
        Attr.MODEL: ctx.model_name,
        Attr.DEVICE: str(ctx.data.device),
        Attr.SEED: cfg.seed,
        Attr.DATA_FINGERPRINT: ctx.data_fingerprint,
        Attr.MAX_EPOCHS: cfg.epochs,
        Attr.TORCH_THREADS: torch.get_num_threads(),
    }.items():
        trial.set_user_attr(key, value)
    vocab = model.get_input_embeddings().num_embeddings
    if ctx.data.max_token_id >= vocab:
        raise TrainingFailed(
            f"tokenizer/model mismatch: token id {ctx.data.max_token_id} but the model's "
            f"embedding table has {vocab} rows"
        )


class _EpochReporter:
    """`train()`'s callbacks inside a trial: record each epoch, report it, let the pruner stop it.

    Holds the trial and the load, never the model: a pruned trial's exception keeps this alive.
    """

    def __init__(
        self, trial: optuna.Trial, cfg: TrainConfig, ctx: RunContext, prune: bool, load: Occupancy
    ) -> None:
        self.trial, self.cfg, self.prune, self.load = trial, cfg, prune, load
        self.progress = ctx.progress
        self.best: EpochResult | None = None
        # Trials training on this device meanwhile, the most seen at the start and after each
        # epoch: times are comparable only between trials that ran under the same load.
        self.busy = 0
        self.lost_s = 0.0  # a failed graphed attempt's time: the user waited for it too

    def note_load(self) -> None:
        self.busy = max(self.busy, self.load.others())
        self.trial.set_user_attr(Attr.CONCURRENT_TRIALS, self.busy)

    def on_setup(self, s: RunSetup) -> None:
        self.trial.set_user_attr(Attr.SETUP_TIME_S, s.setup_time_s + self.lost_s)
        self.trial.set_user_attr(Attr.CUDA_GRAPHS, s.graphs)

    def __call__(self, r: EpochResult) -> None:
        trial, epochs = self.trial, self.cfg.epochs
        self.note_load()
        if not self.progress:  # a log, not bars: one plain line per epoch
            print(
                f"{trial.study.study_name} trial {trial.number} epoch {r.epoch}/{epochs}:"
                f" val F1 {r.val_f1:.4f}, loss {r.train_loss:.4f}, {r.train_time_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        if self.best is None or r.val_f1 > self.best.val_f1:
            self.best = r
        trial.report(r.val_f1, r.epoch)
        trial.set_user_attr(Attr.EPOCHS_RUN, r.epoch)
        trial.set_user_attr(Attr.TRAIN_TIME_S, r.train_time_s)
        trial.set_user_attr(Attr.BEST_EPOCH, self.best.epoch)
        trial.set_user_attr(Attr.VAL_F1, self.best.val_f1)
        trial.set_user_attr(Attr.VAL_ACCURACY, self.best.val_accuracy)
        if self.prune and r.epoch < epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {r.epoch} (val F1 {r.val_f1:.4f})")


def _record_result(trial: optuna.Trial, ctx: RunContext, result: TrainResult) -> None:
    """A COMPLETE trial's test measurements, at its best epoch."""
    for key, value in {
        Attr.TEST_F1: result.test_f1,
        Attr.TEST_ACCURACY: result.test_accuracy,
        Attr.PEAK_MEM_MB: round(result.peak_mem_mb, 1),
        Attr.LABELS: list(ctx.label_names),
        Attr.TEST_CONFUSION: result.test_confusion.tolist(),
        # per example, for the paired test-set comparisons of the report
        Attr.TEST_PREDICTIONS: encode_labels(result.test_predictions),
        Attr.TEST_LABELS: encode_labels(ctx.data.test.labels),
    }.items():
        trial.set_user_attr(key, value)


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
        role = trial.user_attrs.get(Attr.ROLE, FIXED)
        factor = float(trial.user_attrs.get(Attr.LR_FACTOR, 1.0)) if role != FIXED else 1.0
        # Workers that start together may each open the same run; the lowest number runs it.
        rivals = trial.study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)
        )
        first = min(
            (t.number for t in rivals if t.number < trial.number and _run_of(t) == (role, factor)),
            default=None,
        )
        trial.set_user_attr(Attr.ROLE, role)
        trial.set_user_attr(Attr.LR_FACTOR, factor)
        if first is not None:
            what = "the baseline" if role == FIXED else f"the baseline at lr x {factor:.3g}"
            trial.set_user_attr(Attr.FAIL_REASON, f"trial {first} already runs {what}")
            raise DuplicateRun(f"trial {first} already runs {what}")
        cfg = replace(self.cfg, learning_rate=self.cfg.learning_rate * factor)
        for name in BASELINE_PARAMS:
            value = getattr(cfg, name)
            one = {"choices": (value,)} if isinstance(value, str) else {"low": value, "high": value}
            ParamSpec(name, **one).suggest(trial)
        return run_trial(trial, cfg, self.ctx, prune=False)


def _run_of(trial: optuna.trial.FrozenTrial) -> tuple[str | None, float | None]:
    """(role, learning-rate factor) of a baseline-study trial, as it records them when it starts."""
    return trial.user_attrs.get(Attr.ROLE), trial.user_attrs.get(Attr.LR_FACTOR)
