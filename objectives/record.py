"""The trial record: what every trial of both studies stores, defined once.

The objective writes a trial's user attributes under the keys of `Attr`; every reader reads them
back through `TrialRecord.from_trial()`, which turns missing, null, non-finite or odd values
into `None` (a table shows an empty cell). A study written by an older version, whose trials may
lack attributes, is refused in one line before anything reads it (`study.recipe`). `ranked()` and
`best_trials()` are the one rule for "the best trial" (docs/ARCHITECTURE.md, "objectives/").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from objectives.config import NEIGHBOUR


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
    ROLE = "baseline_role"
    LR_FACTOR = "lr_factor"  # the run's learning rate / the fixed run's
    # `confirm` runs only: the configuration re-trained (its `seed` is the run's own seed).
    SOURCE_STUDY = "source_study"
    SOURCE_TRIAL = "source_trial"
    SOURCE_MODE = "source_mode"
    SOURCE_PARAMS = "source_params"
    SOURCE_EPOCHS = "source_epochs"


@dataclass(frozen=True)
class TrialRecord:
    """One trial of either study, with the attributes the reports use, `None` where unknown.
    The fields read from user attributes mean what `Attr` says of them."""

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
    train_time_s: float | None = None
    setup_time_s: float | None = None
    # What a user waits for the training, setup + epochs: the Pareto time axis and the time of
    # the baseline ratio.
    wait_time_s: float | None = None
    epochs_run: int | None = None
    max_epochs: int | None = None
    best_epoch: int | None = None
    intermediate: Mapping[int, float] = field(default_factory=dict)
    fail_reason: str | None = None
    role: str | None = None
    lr_factor: float | None = None
    # The load a trial trained under: its times compare only with trials under the same load.
    device: str | None = None
    concurrent_trials: int | None = None
    torch_threads: int | None = None
    model: str | None = None
    seed: int | None = None
    peak_mem_mb: float | None = None
    artifact_id: str | None = None
    cuda_graphs: str | None = None
    test_labels: str | None = field(default=None, repr=False)
    test_predictions: str | None = field(default=None, repr=False)
    num_labels: int | None = None  # how many label names `Attr.LABELS` holds

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE.name

    @property
    def neighbour(self) -> bool:
        return self.role == NEIGHBOUR

    @property
    def label(self) -> str:
        """Short human name used in hover texts and findings."""
        return f"{self.study} #{self.number}"

    @classmethod
    def from_trial(cls, trial: FrozenTrial, study: str, *, baseline: bool = False) -> TrialRecord:
        """One trial of study `study` (`baseline`: of the full fine-tuning baseline study);
        never raises on missing or malformed user attributes."""
        attrs = trial.user_attrs
        values = {name: read(attrs.get(_KEYS.get(name, name))) for name, read in _READ.items()}
        # A COMPLETE trial's value is its objective; an unfinished one's the best it reported.
        val_f1 = as_float(trial.value) if trial.state == TrialState.COMPLETE else None
        train, setup = values["train_time_s"], values["setup_time_s"]
        return cls(
            study=study,
            number=trial.number,
            state=trial.state.name,
            baseline=baseline,
            params=dict(trial.params),
            val_f1=as_float(attrs.get(Attr.VAL_F1)) if val_f1 is None else val_f1,
            wait_time_s=None if train is None or setup is None else setup + train,
            intermediate={
                int(step): v
                for step, raw in sorted(trial.intermediate_values.items())
                if (v := as_float(raw)) is not None
            },
            **values,
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


# The TrialRecord fields read from the user attribute of the same name (or `_KEYS`'s), by type.
_STRINGS = (
    "mode", "fail_reason", "role", "device", "model", "artifact_id", "cuda_graphs",
    "test_labels", "test_predictions",
)  # fmt: skip
_FLOATS = (
    "test_f1", "val_accuracy", "test_accuracy", "trainable_share_pct", "train_time_s",
    "setup_time_s", "lr_factor", "peak_mem_mb",
)  # fmt: skip
_INTS = (
    "trainable_params", "total_params", "epochs_run", "max_epochs", "best_epoch", "seed",
    "concurrent_trials", "torch_threads",
)  # fmt: skip
_READ = {
    **dict.fromkeys(_STRINGS, _as_str),
    **dict.fromkeys(_FLOATS, as_float),
    **dict.fromkeys(_INTS, as_int),
    "num_labels": lambda names: len(names) if isinstance(names, list) else None,
}
_KEYS = {"role": Attr.ROLE, "num_labels": Attr.LABELS}


def is_neighbour(user_attrs: Mapping[str, Any]) -> bool:
    """A sensitivity run of the baseline study."""
    return user_attrs.get(Attr.ROLE) == NEIGHBOUR


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


def count_states(trials: Iterable[FrozenTrial]) -> Counter[str]:
    """How many trials are in each state, by the state's name (COMPLETE, PRUNED, ...)."""
    return Counter(t.state.name for t in trials)
