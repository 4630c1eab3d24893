"""What the terminal shows after a run: the best LoRA trials beside the baseline in the
reference's columns, the comparison's checks, and the seed repeats of `confirm`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial

from objectives.record import TrialRecord, ranked

if TYPE_CHECKING:
    from reports.comparison import Comparison

TRIAL_COLUMNS = (
    "mode", "rank", "LR", "scheduler", "trainable params", "total params", "share %",
    "train time s", "val F1", "test F1",
)  # fmt: skip
TOP = 5  # LoRA trials shown, best first (the terminal table and the dashboard note)


def cell(value: float | None, fmt: str) -> str:
    """`value` in `fmt`, "-" where it is unknown."""
    return "-" if value is None else format(value, fmt)


def _setting_cells(mode: str | None, p: Mapping[str, Any], counts: Sequence[Any]) -> list[str]:
    """What was trained, in the first seven `TRIAL_COLUMNS`; `counts`: trainable parameters,
    total parameters, trainable share (%)."""
    trainable, total, share = counts
    return [
        mode or "-",
        str(p.get("lora_r", "-")),
        format(p["learning_rate"], ".2e") if "learning_rate" in p else "-",
        str(p.get("lr_scheduler", "-")),
        cell(trainable, ","),
        cell(total, ","),
        cell(share, ".2f"),
    ]


def trial_row(r: TrialRecord) -> list[str]:
    """A trial's cells in `TRIAL_COLUMNS` order, "-" where unknown."""
    counts = (r.trainable_params, r.total_params, r.trainable_share_pct)
    cells = [cell(r.train_time_s, ".1f"), cell(r.val_f1, ".4f"), cell(r.test_f1, ".4f")]
    return [*_setting_cells(r.mode, r.params, counts), *cells]


def format_table(comparison: Comparison, lora: Sequence[TrialRecord]) -> str:
    """Plain-text table: the `TOP` best COMPLETE trials of `lora`, then the baseline run(s)."""
    base = [comparison.baseline] if comparison.baseline is not None else []
    shown = [*ranked(lora)[:TOP], *base, *comparison.fairness.neighbours]
    if not shown:
        return "no COMPLETE trial yet"
    return aligned(TRIAL_COLUMNS, [trial_row(r) for r in shown])


def format_checks(comparison: Comparison) -> str:
    """Each check of the comparison: its title, then its sentences as a list."""
    return "\n".join(
        f"\n{check.title}\n" + "\n".join(f"- {line}" for line in check.lines)
        for check in comparison.checks
    )


def aligned(columns: Sequence[str], rows: list[list[str]], left: Sequence[str] = ()) -> str:
    """Header and rows, each column aligned to its widest cell: right (numbers), or left for
    the columns named in `left` (names, paths), whose last column is not padded."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        out = [
            v.ljust(w) if c in left else v.rjust(w)
            for v, w, c in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(columns), *(line(r) for r in rows)])


def _pm(interval, fmt: str) -> str:
    """`mean ± half-width` of a 95% interval (`mean` alone with one seed)."""
    if interval is None:
        return "-"
    half = interval.half_width
    return format(interval.mean, fmt) + ("" if half is None else " ± " + format(half, fmt))


def format_confirm_table(trials: Sequence[FrozenTrial]) -> str:
    """The confirmed configurations in the reference's columns: mean ± 95% half-width over seeds,
    then the verdict on the best LoRA configuration against the baseline."""
    from reports.confirm import confirmed_configs, verdict

    configs = confirmed_configs(trials)
    if not configs:
        return "no COMPLETE confirmation run yet"
    columns = ("source", "seeds", *TRIAL_COLUMNS)
    rows = [
        [
            f"{c.source_study}#{c.source_trial}",
            str(len(c.seeds)),
            *_setting_cells(
                c.mode, c.params, (c.trainable_params, c.total_params, c.trainable_share_pct)
            ),
            _pm(c.train_time_s, ".1f"),
            _pm(c.val_f1, ".4f"),
            _pm(c.test_f1, ".4f"),
        ]
        for c in configs
    ]
    return aligned(columns, rows) + "\n" + verdict(configs).text
