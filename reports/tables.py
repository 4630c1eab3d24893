"""Pure report maths over `TrialRecord`s: the summary table, Pareto fronts and pruning savings.
Nothing here reads storage or writes files.

A Pareto front (maximise validation F1, minimise a cost) is every candidate no other candidate
dominates; `a` dominates `b` when it is no worse on both axes and strictly better on one. So
equal points are all kept (each is a setting a user may pick) and weakly dominated points (the
same F1 at a higher cost, a lower F1 at the same cost) are dropped. Front rows are ordered by
cost ascending, then F1 descending, then study and trial number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from optuna.trial import FrozenTrial

from objectives.record import TrialRecord, ranked, to_records

CostKey = Literal["trainable_params", "wait_time_s"]
COST_KEYS: tuple[CostKey, ...] = ("trainable_params", "wait_time_s")
FRONT_NAMES: dict[CostKey, str] = {
    "trainable_params": "validation F1 vs trainable parameters",
    "wait_time_s": "validation F1 vs training time",
}
FRONT_AXES: dict[CostKey, str] = {"trainable_params": "params", "wait_time_s": "time"}

# Fixed summary columns around the sampled parameters (which are inserted after "mode").
SUMMARY_HEAD = ("study", "trial", "state", "mode")
SUMMARY_TAIL = (
    "trainable_params",
    "total_params",
    "trainable_share_pct",
    "train_time_s",
    "setup_time_s",
    "wait_time_s",
    "epochs_run",
    "max_epochs",
    "best_epoch",
    "val_f1",
    "test_f1",
)
PARETO_HEAD = (
    "study", "trial", "val_f1", "test_f1", "trainable_params", "train_time_s", "wait_time_s",
    "mode",
)  # fmt: skip


def trial_records(
    lora: Iterable[FrozenTrial],
    study_name: str,
    baseline: Iterable[FrozenTrial],
    baseline_name: str,
) -> list[TrialRecord]:
    """The records of the LoRA study's trials, then its baseline's."""
    return to_records(lora, study_name) + to_records(baseline, baseline_name, baseline=True)


def param_names(records: Sequence[TrialRecord]) -> list[str]:
    """Every parameter name seen, in first-seen order (that is the order the objective suggests)."""
    names: dict[str, None] = {}
    for record in records:
        for name in record.params:
            names.setdefault(name, None)
    return list(names)


def _param_columns(names: Sequence[str], reserved: Sequence[str]) -> dict[str, str]:
    # A parameter called e.g. "mode" would silently overwrite a fixed column; prefix it instead.
    return {name: (f"param_{name}" if name in reserved else name) for name in names}


def summary_columns(records: Sequence[TrialRecord]) -> list[str]:
    """Column order of summary.csv and of the REPORT.md table."""
    reserved = SUMMARY_HEAD + SUMMARY_TAIL
    params = _param_columns(param_names(records), reserved)
    return [*SUMMARY_HEAD, *params.values(), *SUMMARY_TAIL]


def _row(
    r: TrialRecord, head: Sequence[str], names: Sequence[str], tail: Sequence[str] = ()
) -> dict[str, Any]:
    """The record's `head` columns, its parameters (None where missing), its `tail` columns."""
    fields = {"study": r.study, "trial": r.number}
    row = {c: fields[c] if c in fields else getattr(r, c) for c in head}
    params = _param_columns(names, (*head, *tail))
    row.update({column: r.params.get(name) for name, column in params.items()})
    row.update({c: getattr(r, c) for c in tail})
    return row


def summary_row(record: TrialRecord, names: Sequence[str]) -> dict[str, Any]:
    """One summary row; `names` are all parameter names of the report (missing ones are None)."""
    return _row(record, SUMMARY_HEAD, names, SUMMARY_TAIL)


def summary_rows(records: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    """summary.csv: the LoRA study's trials then the baseline's, each in trial-number order."""
    names = param_names(records)
    ordered = sorted(records, key=lambda r: (r.baseline, r.study, r.number))
    return [summary_row(r, names) for r in ordered]


def best_first(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Records ordered for REPORT.md: COMPLETE trials by validation F1 (best first), then the
    unfinished ones (pruned, failed, running) by the best F1 they reached; unknown F1 last."""
    return sorted(
        records,
        key=lambda r: (
            not r.complete,
            r.val_f1 is None,
            -(r.val_f1 or 0.0),
            r.baseline,
            r.study,
            r.number,
        ),
    )


def check_cost(cost: str) -> CostKey:
    """`cost` itself if it names a front's cost axis; a clear ValueError otherwise."""
    if cost not in COST_KEYS:
        raise ValueError(f"cost must be one of {', '.join(COST_KEYS)}; got {cost!r}")
    return cost  # type: ignore[return-value]


def cost_of(record: TrialRecord, cost: CostKey) -> float | None:
    value = getattr(record, check_cost(cost))
    return None if value is None else float(value)


def pareto_candidates(records: Sequence[TrialRecord], cost: CostKey) -> list[TrialRecord]:
    """COMPLETE trials (LoRA and the fixed baseline) with a known F1 and a known cost.

    The baseline's learning-rate neighbours stay out: they test the yardstick, they are not
    settings the study proposes.
    """
    check_cost(cost)
    return [
        r
        for r in records
        if r.complete and not r.neighbour and r.val_f1 is not None and cost_of(r, cost) is not None
    ]


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(f1, cost) point `a` dominates `b`: no worse on both axes, strictly better on one."""
    (fa, ca), (fb, cb) = a, b
    return fa >= fb and ca <= cb and (fa > fb or ca < cb)


def pareto_front(records: Sequence[TrialRecord], cost: CostKey) -> list[TrialRecord]:
    """The non-dominated candidates (maximise val F1, minimise `cost`); ties as in the module
    docstring. Quadratic, which is fine for the hundreds of trials a study holds."""
    candidates = pareto_candidates(records, cost)
    points = [(float(r.val_f1), float(cost_of(r, cost))) for r in candidates]  # type: ignore[arg-type]
    front = [
        record
        for record, point in zip(candidates, points, strict=True)
        if not any(dominates(other, point) for other in points)
    ]
    return sorted(
        front, key=lambda r: (cost_of(r, cost), -float(r.val_f1), r.baseline, r.study, r.number)
    )


def pareto_rows(front: Sequence[TrialRecord], names: Sequence[str]) -> list[dict[str, Any]]:
    """pareto_*.csv rows: the contract's columns, then the trial's parameters."""
    return [_row(r, PARETO_HEAD, names) for r in front]


def pareto_columns(names: Sequence[str]) -> list[str]:
    return [*PARETO_HEAD, *_param_columns(names, PARETO_HEAD).values()]


@dataclass(frozen=True)
class PruningSavings:
    """Epochs actually trained against the epoch budget of the finished LoRA trials."""

    n_trials: int  # finished (COMPLETE or PRUNED) trials counted
    n_pruned: int
    epochs_run: int
    epoch_budget: int  # sum over counted trials of max_epochs

    @property
    def used_fraction(self) -> float:
        return self.epochs_run / self.epoch_budget

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.used_fraction


def pruning_savings(records: Sequence[TrialRecord]) -> PruningSavings | None:
    """Epochs run / (trials x max epochs) over the LoRA study's COMPLETE and PRUNED trials.

    FAIL trials stopped for another reason than pruning and RUNNING ones have not finished, so
    neither is counted. None when no trial can be counted.
    """
    counted = [
        r
        for r in records
        if not r.baseline
        and r.state in ("COMPLETE", "PRUNED")
        and r.epochs_run is not None
        and r.max_epochs
    ]
    if not counted:
        return None
    return PruningSavings(
        n_trials=len(counted),
        n_pruned=sum(r.state == "PRUNED" for r in counted),
        epochs_run=sum(r.epochs_run for r in counted),
        epoch_budget=sum(r.max_epochs for r in counted),
    )


def best_record(records: Sequence[TrialRecord], *, baseline: bool) -> TrialRecord | None:
    """The best trial of the LoRA study or (`baseline`) of the baseline study, by
    `objectives.record.ranked`'s rule."""
    best = ranked(r for r in records if r.baseline == baseline)
    return best[0] if best else None


def best_so_far(records: Sequence[TrialRecord]) -> list[tuple[int, float]]:
    """(trial number, best validation F1 of the COMPLETE LoRA trials up to it), in trial order:
    the optimisation history's running best for a maximised objective."""
    best: float | None = None
    points = []
    for r in sorted(records, key=lambda r: r.number):
        if r.baseline or not r.complete or r.val_f1 is None:
            continue
        best = r.val_f1 if best is None else max(best, r.val_f1)
        points.append((r.number, best))
    return points
