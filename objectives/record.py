"""The trial record: what every trial of both studies stores, defined once.

The objective writes a trial's user attributes under the keys of `Attr`; every reader (the
terminal table, the dashboard note, the reports, confirm, evaluate, export) reads them back
through `TrialRecord.from_trial()`, and `ranked()` / `best_trials()` are the one rule for "the
best trial": COMPLETE, highest validation F1 (never test F1: the test split chooses nothing),
the earliest on ties as with Optuna's `best_trial`, and in a baseline study never a
learning-rate neighbour (the fixed run is the yardstick).

Trials come from two studies and from any age of the code, so every attribute may be missing,
null, non-finite or of an unexpected type: `from_trial` turns all of those into `None` instead of
raising (a report shows an empty cell, never crashes on an odd trial).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from objectives.config import FIXED, LR_FACTOR_ATTR, NEIGHBOUR, ROLE_ATTR


class Attr:
    """The user-attribute keys of a trial (LoRA study and baseline alike)."""

    MODE = "mode"  # "lora" or "full"
    TRAINABLE_PARAMS = "trainable_params"  # parameters with gradients
    TOTAL_PARAMS = "total_params"  # all parameters of the trained model, adapters included
    TRAINABLE_SHARE_PCT = "trainable_share_pct"
    MODEL = "model"  # Hub id or folder, as given
    DEVICE = "device"  # with its index where there are several: cuda:1
    SEED = "seed"
    DATA_FINGERPRINT = "data_fingerprint"
    MAX_EPOCHS = "max_epochs"  # the epochs it was given (the pruner's budget)
    TORCH_THREADS = "torch_threads"
    CONCURRENT_TRIALS = "concurrent_trials"  # trials training on the same device meanwhile
    EPOCHS_RUN = "epochs_run"
    TRAIN_TIME_S = "train_time_s"  # the epochs, evaluation excluded
    SETUP_TIME_S = "setup_time_s"  # device copy, graph capture, optimizer
    CUDA_GRAPHS = "cuda_graphs"  # how the steps ran: graphed, or eager and why
    BEST_EPOCH = "best_epoch"
    VAL_F1 = "val_f1"  # at the best epoch
    VAL_ACCURACY = "val_accuracy"
    # COMPLETE trials only, measured at the best epoch:
    TEST_F1 = "test_f1"
    TEST_ACCURACY = "test_accuracy"
    PEAK_MEM_MB = "peak_mem_mb"
    LABELS = "labels"  # the label names, in label-id order
    TEST_CONFUSION = "test_confusion"
    TEST_PREDICTIONS = "test_predictions"  # per example, compact (`objectives.predictions`)
    TEST_LABELS = "test_labels"
    FAIL_REASON = "fail_reason"  # FAIL trials: why, in one line
    ARTIFACT_ID = "artifact_id"  # kept weights in the artifact store
    # Baseline study only: "fixed" (the yardstick) or "neighbour", and its lr / the fixed lr.
    ROLE = ROLE_ATTR
    LR_FACTOR = LR_FACTOR_ATTR
    # `confirm` runs only: the configuration re-trained (its `seed` is the run's own seed).
    SOURCE_STUDY = "source_study"
    SOURCE_TRIAL = "source_trial"
    SOURCE_MODE = "source_mode"
    SOURCE_PARAMS = "source_params"
    SOURCE_EPOCHS = "source_epochs"


@dataclass(frozen=True)
class TrialRecord:
    """One trial of either study, with the attributes the reports use, `None` where unknown."""

    study: str
    number: int
    state: str  # TrialState name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    baseline: bool  # True for trials of the full fine-tuning baseline study
    mode: str | None
    params: Mapping[str, Any] = field(default_factory=dict)
    # For COMPLETE trials the objective value (best validation macro-F1 over the epochs run);
    # for the others the best validation F1 they reported before stopping, if any.
    val_f1: float | None = None
    test_f1: float | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_share_pct: float | None = None
    train_time_s: float | None = None  # the epochs, evaluation excluded (the trial attribute)
    setup_time_s: float | None = None  # before the first epoch: device copy, graph capture, ...
    # The time a user waits for the training, setup + epochs: the Pareto time axis and the time
    # of the baseline ratio; trials from before `setup_time_s` existed count their epochs.
    wait_time_s: float | None = None
    epochs_run: int | None = None
    max_epochs: int | None = None
    best_epoch: int | None = None
    intermediate: Mapping[int, float] = field(default_factory=dict)
    fail_reason: str | None = None
    # Baseline study only: "fixed" (the yardstick; also trials from before roles) or "neighbour"
    # (the fixed configuration at lr_factor x its learning rate, `baseline --sensitivity`).
    role: str | None = None
    lr_factor: float | None = None
    # The load a trial trained under: its times compare only with trials under the same load.
    device: str | None = None
    concurrent_trials: int | None = None
    torch_threads: int | None = None
    model: str | None = None  # Hub id or folder, as given
    seed: int | None = None
    peak_mem_mb: float | None = None
    artifact_id: str | None = None  # its kept weights in the artifact store, if any
    cuda_graphs: str | None = None  # "on: ..." or "off: <why>"

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE.name

    @property
    def neighbour(self) -> bool:
        return self.role == NEIGHBOUR

    @property
    def yardstick(self) -> bool:
        """The fixed full fine-tuning run every LoRA trial is compared with."""
        return self.baseline and not self.neighbour

    @property
    def label(self) -> str:
        """Short human name used in hover texts and findings."""
        return f"{self.study} #{self.number}"

    @classmethod
    def from_trial(cls, trial: FrozenTrial, study: str, *, baseline: bool = False) -> TrialRecord:
        """One trial of study `study` (`baseline`: of the full fine-tuning baseline study);
        never raises on missing or malformed user attributes."""
        attrs = trial.user_attrs
        intermediate = {
            int(step): v
            for step, raw in sorted(trial.intermediate_values.items())
            if (v := as_float(raw)) is not None
        }

        val_f1 = _objective_value(trial) if trial.state == TrialState.COMPLETE else None
        if val_f1 is None:
            val_f1 = as_float(attrs.get(Attr.VAL_F1))
        if val_f1 is None and trial.state != TrialState.COMPLETE and intermediate:
            # A pruned or running trial's best so far is the best F1 it reported per epoch.
            val_f1 = max(intermediate.values())

        trainable = as_int(attrs.get(Attr.TRAINABLE_PARAMS))
        total = as_int(attrs.get(Attr.TOTAL_PARAMS))
        share = as_float(attrs.get(Attr.TRAINABLE_SHARE_PCT))
        if share is None and trainable is not None and total:
            share = 100.0 * trainable / total

        epochs_run = as_int(attrs.get(Attr.EPOCHS_RUN))
        if epochs_run is None and intermediate:
            epochs_run = len(intermediate)

        return cls(
            study=study,
            number=trial.number,
            state=trial.state.name,
            baseline=baseline,
            mode=_as_str(attrs.get(Attr.MODE)),
            params=dict(trial.params),
            val_f1=val_f1,
            test_f1=as_float(attrs.get(Attr.TEST_F1)),
            val_accuracy=as_float(attrs.get(Attr.VAL_ACCURACY)),
            test_accuracy=as_float(attrs.get(Attr.TEST_ACCURACY)),
            trainable_params=trainable,
            total_params=total,
            trainable_share_pct=share,
            train_time_s=as_float(attrs.get(Attr.TRAIN_TIME_S)),
            setup_time_s=as_float(attrs.get(Attr.SETUP_TIME_S)),
            wait_time_s=wait_time_s(attrs),
            epochs_run=epochs_run,
            max_epochs=as_int(attrs.get(Attr.MAX_EPOCHS)),
            best_epoch=as_int(attrs.get(Attr.BEST_EPOCH)),
            intermediate=intermediate,
            fail_reason=_as_str(attrs.get(Attr.FAIL_REASON)),
            role=_as_str(attrs.get(Attr.ROLE)) or (FIXED if baseline else None),
            lr_factor=as_float(attrs.get(Attr.LR_FACTOR)) or (1.0 if baseline else None),
            device=_as_str(attrs.get(Attr.DEVICE)),
            concurrent_trials=as_int(attrs.get(Attr.CONCURRENT_TRIALS)),
            torch_threads=as_int(attrs.get(Attr.TORCH_THREADS)),
            model=_as_str(attrs.get(Attr.MODEL)),
            seed=as_int(attrs.get(Attr.SEED)),
            peak_mem_mb=as_float(attrs.get(Attr.PEAK_MEM_MB)),
            artifact_id=_as_str(attrs.get(Attr.ARTIFACT_ID)),
            cuda_graphs=_as_str(attrs.get(Attr.CUDA_GRAPHS)),
        )


def as_float(value: Any) -> float | None:
    """A finite float, or None for missing, boolean, non-numeric or non-finite values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def as_int(value: Any) -> int | None:
    """An int, or None; floats are accepted only when integral (JSON storage may widen ints)."""
    number = as_float(value)
    if number is None or number != int(number):
        return None
    return int(number)


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def wait_time_s(attrs: Mapping[str, Any]) -> float | None:
    """Seconds a user waited for a trial's training: `setup_time_s` + `train_time_s`.

    None without a training time; a missing setup time (older trials) counts as 0.
    """
    train = as_float(attrs.get(Attr.TRAIN_TIME_S))
    if train is None:
        return None
    return train + (as_float(attrs.get(Attr.SETUP_TIME_S)) or 0.0)


def _objective_value(trial: FrozenTrial) -> float | None:
    # Multi-objective values are not expected here; take the first one rather than crash.
    values = trial.values
    return as_float(values[0]) if values else None


def to_records(
    trials: Iterable[FrozenTrial], study: str, *, baseline: bool = False
) -> list[TrialRecord]:
    """Flatten all trials of one study, in trial-number order."""
    return [
        TrialRecord.from_trial(t, study, baseline=baseline)
        for t in sorted(trials, key=lambda t: t.number)
    ]


def rank_key(number: int, val_f1: float) -> tuple[float, int]:
    """The order of "best": higher validation F1 first, the earlier trial on ties."""
    return (-val_f1, number)


def ranked(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """COMPLETE records with a validation F1, best first (the earliest on ties); a baseline
    study's learning-rate neighbours never count: the fixed run is the yardstick."""
    pool = [r for r in records if r.complete and r.val_f1 is not None and not r.neighbour]
    return sorted(pool, key=lambda r: rank_key(r.number, r.val_f1))


def best_trials(trials: Sequence[FrozenTrial], top: int) -> list[FrozenTrial]:
    """The `top` best trials of one study by `ranked`'s rule."""
    by_number = {t.number: t for t in trials}
    return [by_number[r.number] for r in ranked(to_records(trials, ""))[:top]]


def neighbour_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE learning-rate neighbours of a baseline study, smallest learning rate first."""
    done = [r for r in to_records(trials, "", baseline=True) if r.complete and r.neighbour]
    by_number = {t.number: t for t in trials}
    ordered = sorted(done, key=lambda r: (r.lr_factor or 1.0, r.number))
    return [by_number[r.number] for r in ordered]


def state_counts(trials: Iterable[FrozenTrial]) -> Counter[TrialState]:
    """How many trials are in each state."""
    return Counter(t.state for t in trials)
