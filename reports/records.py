"""Flatten Optuna trials into typed `TrialRecord`s, the one shape the report maths works on.

Trials come from two studies (the LoRA study and its `<name>-full-ft` baseline) and from any age of
the code, so every user attribute may be missing, null, non-finite or of an unexpected type. The
coercion helpers here turn all of those into `None` instead of raising: a report must never crash
on an odd trial, it shows an empty cell instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from objectives.config import FIXED, LR_FACTOR_ATTR, NEIGHBOUR, ROLE_ATTR


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
    train = as_float(attrs.get("train_time_s"))
    if train is None:
        return None
    return train + (as_float(attrs.get("setup_time_s")) or 0.0)


def _objective_value(trial: FrozenTrial) -> float | None:
    # Multi-objective values are not expected here; take the first one rather than crash.
    values = trial.values
    return as_float(values[0]) if values else None


def to_record(trial: FrozenTrial, study: str, *, baseline: bool = False) -> TrialRecord:
    """Flatten one FrozenTrial; never raises on missing or malformed user attributes."""
    attrs = trial.user_attrs
    intermediate = {
        int(step): v
        for step, raw in sorted(trial.intermediate_values.items())
        if (v := as_float(raw)) is not None
    }

    val_f1 = _objective_value(trial) if trial.state == TrialState.COMPLETE else None
    if val_f1 is None:
        val_f1 = as_float(attrs.get("val_f1"))
    if val_f1 is None and trial.state != TrialState.COMPLETE and intermediate:
        # A pruned or running trial's best so far is the best F1 it reported per epoch.
        val_f1 = max(intermediate.values())

    trainable = as_int(attrs.get("trainable_params"))
    total = as_int(attrs.get("total_params"))
    share = as_float(attrs.get("trainable_share_pct"))
    if share is None and trainable is not None and total:
        share = 100.0 * trainable / total

    epochs_run = as_int(attrs.get("epochs_run"))
    if epochs_run is None and intermediate:
        epochs_run = len(intermediate)

    return TrialRecord(
        study=study,
        number=trial.number,
        state=trial.state.name,
        baseline=baseline,
        mode=_as_str(attrs.get("mode")),
        params=dict(trial.params),
        val_f1=val_f1,
        test_f1=as_float(attrs.get("test_f1")),
        val_accuracy=as_float(attrs.get("val_accuracy")),
        test_accuracy=as_float(attrs.get("test_accuracy")),
        trainable_params=trainable,
        total_params=total,
        trainable_share_pct=share,
        train_time_s=as_float(attrs.get("train_time_s")),
        setup_time_s=as_float(attrs.get("setup_time_s")),
        wait_time_s=wait_time_s(attrs),
        epochs_run=epochs_run,
        max_epochs=as_int(attrs.get("max_epochs")),
        best_epoch=as_int(attrs.get("best_epoch")),
        intermediate=intermediate,
        fail_reason=_as_str(attrs.get("fail_reason")),
        role=(_as_str(attrs.get(ROLE_ATTR)) or FIXED) if baseline else None,
        lr_factor=(as_float(attrs.get(LR_FACTOR_ATTR)) or 1.0) if baseline else None,
        device=_as_str(attrs.get("device")),
        concurrent_trials=as_int(attrs.get("concurrent_trials")),
        torch_threads=as_int(attrs.get("torch_threads")),
    )


def to_records(
    trials: Iterable[FrozenTrial], study: str, *, baseline: bool = False
) -> list[TrialRecord]:
    """Flatten all trials of one study, in trial-number order."""
    return [to_record(t, study, baseline=baseline) for t in sorted(trials, key=lambda t: t.number)]
