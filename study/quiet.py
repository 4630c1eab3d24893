"""Keep the terminal for progress and results: hide library notices a user cannot act on.

Called once a command has been parsed and validated, in the main process and in every worker
process. It imports neither torch nor transformers: transformers reads the environment
variables below when it is first imported, by whichever command needs it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _TrialFailureTracebacks(logging.Filter):
    """Drops the traceback from Optuna's "Trial N failed" warning when the failure is one the
    study expects (TRIAL_FAILURES: a NaN loss, out of memory, a worker that lost the race for
    the baseline): the trial's fail_reason says why, and a traceback there reads like a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        from objectives.objective import TRIAL_FAILURES

        if record.exc_info and isinstance(record.exc_info[1], TRIAL_FAILURES):
            record.exc_info = None
        return True


def quiet_libraries() -> None:
    import optuna

    optimize_log = optuna.logging.get_logger("optuna.study._optimize")
    if not any(isinstance(f, _TrialFailureTracebacks) for f in optimize_log.filters):
        optimize_log.addFilter(_TrialFailureTracebacks())

    # heartbeat, metric names and stale-trial handling are stable in practice; they are the point
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*"
    )  # peft vs transformers 5
    # "classifier newly initialised" is by design here; weight loading takes a second, no bar.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # imported already (a test, a caller): set it directly
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
