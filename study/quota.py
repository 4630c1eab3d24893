"""`optimize_quota`: `study.optimize` that finishes exactly its trials even when one is taken.

After a long database outage another process may fail this worker's running trial as stale and
queue a copy of it (docs/operations.md, "When things go wrong"); Optuna then cannot record the
trial's end and `study.optimize` raises (`UpdateFinishedTrialError`, or "Cannot tell a FAIL
trial"). That one trial is given up, since its copy runs instead, and the loop goes on until
this call has finished its `n_trials`. Any other exception propagates unchanged.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from storage import unavailable_in

Callback = Callable[[optuna.Study, FrozenTrial], None]


def optimize_quota(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    n_trials: int,
    timeout: float | None = None,
    callbacks: Sequence[Callback] = (),
    **kwargs: Any,
) -> None:
    finished = 0
    current: list[int] = []  # the number of the trial in flight

    def count(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal finished
        finished += 1

    def tracked(trial: optuna.Trial) -> Any:
        current[:] = [trial.number]
        return objective(trial)

    start = time.monotonic()
    while finished < n_trials:
        left = None if timeout is None else timeout - (time.monotonic() - start)
        if left is not None and left <= 0:
            return
        try:
            study.optimize(
                tracked,
                n_trials=n_trials - finished,
                timeout=left,
                callbacks=[*callbacks, count],
                **kwargs,
            )
            return
        except Exception as e:
            if unavailable_in(e) is not None or not current or not taken_over(study, current[0]):
                raise
            print(
                f"warning: trial {current[0]} was failed as stale by another worker after the "
                "database outage; its copy with the same parameters runs instead",
                file=sys.stderr,
            )
            current.clear()


def taken_over(study: optuna.Study, number: int) -> bool:
    """Whether trial `number` ended FAIL by a heartbeat check that queued a copy of it."""
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    if number not in by_number or by_number[number].state != TrialState.FAIL:
        return False
    return any(t.system_attrs.get("failed_trial") == number for t in trials)
