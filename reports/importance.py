"""Hyperparameter importance for validation F1 with fANOVA and PED-ANOVA (`optuna.importance`).

PED-ANOVA compares the best trials with all trials, so direction matters: the installed Optuna
reads the study direction only when no `target` is given, and with a `target` it assumes lower
is better. So the evaluators run on a private in-memory study of the COMPLETE trials, PED-ANOVA
gets the target `-F1` and fANOVA (a variance decomposition, sign-free) F1 itself.

Too few trials give importances that are noise (Optuna returns zeros, which `normalize=True` would
turn into misleading equal shares), so below `MIN_TRIALS` an evaluator is skipped with a note.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import optuna
from optuna.importance import (
    BaseImportanceEvaluator,
    FanovaImportanceEvaluator,
    PedAnovaImportanceEvaluator,
    get_param_importances,
)
from optuna.trial import FrozenTrial, TrialState

FANOVA = "fANOVA"
PED_ANOVA = "PED-ANOVA"
# Fewest COMPLETE trials for a ranking worth printing. PED-ANOVA looks at the top quantile only,
# and its authors advise at least 5 trials there; with the quantile capped at 0.5 that takes 10.
MIN_TRIALS: Mapping[str, int] = {FANOVA: 5, PED_ANOVA: 10}
FANOVA_SEED = 0  # fANOVA's random forest: a report gives the same ranking every time
PED_ANOVA_TOP_TRIALS = 5  # aim for this many trials in PED-ANOVA's top quantile
PED_ANOVA_QUANTILE_RANGE = (0.1, 0.5)  # Optuna's default quantile, and at most half the trials


@dataclass(frozen=True)
class ImportanceRow:
    evaluator: str
    param: str
    importance: float  # normalised to sum to 1 per evaluator (all 0 when nothing separates)
    rank: int  # 1 = most important for this evaluator


@dataclass(frozen=True)
class ImportanceResult:
    rows: list[ImportanceRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_trials: int = 0

    def top(self) -> dict[str, tuple[str, float]]:
        """Evaluator -> (most important parameter, its share), for evaluators with a signal."""
        tops: dict[str, tuple[str, float]] = {}
        for row in self.rows:
            if row.rank == 1 and row.importance > 0:
                tops[row.evaluator] = (row.param, row.importance)
        return tops


def ped_anova_quantile(n_trials: int) -> float:
    """Target quantile giving about `PED_ANOVA_TOP_TRIALS` top trials, within the allowed range."""
    low, high = PED_ANOVA_QUANTILE_RANGE
    return min(high, max(low, PED_ANOVA_TOP_TRIALS / max(n_trials, 1)))


def _f1(trial: FrozenTrial) -> float:
    return float(trial.values[0])


def _negated_f1(trial: FrozenTrial) -> float:
    return -float(trial.values[0])


def _scratch_study(trials: Sequence[FrozenTrial]) -> optuna.Study:
    # The storage logs every new study at INFO; a report has no use for that line.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(trials)
    return study


def _usable(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE and math.isfinite(t.values[0])]


def _varying_params(trials: Sequence[FrozenTrial]) -> list[str]:
    """Parameters whose distribution can take more than one value (fixed ones carry no signal)."""
    names: dict[str, None] = {}
    for trial in trials:
        for name, dist in trial.distributions.items():
            if not dist.single():
                names.setdefault(name, None)
    return list(names)


def _run(
    study: optuna.Study,
    evaluator: BaseImportanceEvaluator,
    target: Callable[[FrozenTrial], float],
) -> dict[str, float]:
    with warnings.catch_warnings():
        # normalize=False is flagged experimental, and PED-ANOVA warns that a target means
        # "lower is better", which is exactly why -F1 is passed.
        warnings.simplefilter("ignore")
        raw = get_param_importances(study, evaluator=evaluator, target=target, normalize=False)
    total = sum(raw.values())
    return {name: (float(value / total) if total > 0 else 0.0) for name, value in raw.items()}


def param_importances(trials: Sequence[FrozenTrial]) -> ImportanceResult:
    """Importance of each sampled parameter for validation F1 (maximised), per evaluator.

    `trials` are the LoRA study's trials of any state; only COMPLETE ones with a finite value are
    used. Never raises for lack of data: the notes say why an evaluator was skipped.
    """
    usable = _usable(trials)
    n = len(usable)
    notes: list[str] = []
    params = _varying_params(usable)
    if n == 0:
        notes.append("Importance not computed: no COMPLETE trial yet.")
        return ImportanceResult(notes=notes, n_trials=n)
    if not params:
        notes.append(
            f"Importance not computed: {n} COMPLETE trial(s) and no sampled parameter that varies."
        )
        return ImportanceResult(notes=notes, n_trials=n)

    evaluators = {
        FANOVA: (lambda: FanovaImportanceEvaluator(seed=FANOVA_SEED), _f1),
        PED_ANOVA: (
            lambda: PedAnovaImportanceEvaluator(target_quantile=ped_anova_quantile(n)),
            _negated_f1,
        ),
    }
    rows: list[ImportanceRow] = []
    study: optuna.Study | None = None
    for name, (make, target) in evaluators.items():
        if n < MIN_TRIALS[name]:
            notes.append(
                f"{name} importance not computed: {n} COMPLETE trial(s), "
                f"it needs at least {MIN_TRIALS[name]}."
            )
            continue
        study = study or _scratch_study(usable)
        try:
            scores = _run(study, make(), target)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as error:
            # A study whose search space changed between runs can defeat an evaluator; the rest
            # of the report is still worth writing.
            notes.append(f"{name} importance failed: {error}")
            continue
        scores = {p: s for p, s in scores.items() if p in params}
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        rows.extend(ImportanceRow(name, p, s, i) for i, (p, s) in enumerate(ranked, start=1))
        if ranked and all(s == 0 for _, s in ranked):
            notes.append(f"{name}: no parameter separates the trials (all importances are 0).")
    if any(r.evaluator == PED_ANOVA for r in rows):
        notes.append(
            f"PED-ANOVA measures what the top {ped_anova_quantile(n):.0%} of the {n} COMPLETE "
            "trials by validation F1 have in common."
        )
    return ImportanceResult(rows=rows, notes=notes, n_trials=n)
