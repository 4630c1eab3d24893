"""The end-of-run table: the best LoRA trials beside the baseline, in the reference's columns."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

COLUMNS = (
    "mode", "rank", "LR", "scheduler", "trainable params", "total params", "share %",
    "train time s", "val F1", "test F1",
)  # fmt: skip


def _row(t: FrozenTrial) -> list[str]:
    a, p = t.user_attrs, t.params

    def num(key: str, fmt: str) -> str:
        value = a.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "-"

    return [
        a.get("mode", "-"),
        str(p.get("lora_r", "-")),
        format(p["learning_rate"], ".2e") if "learning_rate" in p else "-",
        str(p.get("lr_scheduler", "-")),
        num("trainable_params", ","),
        num("total_params", ","),
        num("trainable_share_pct", ".2f"),
        num("train_time_s", ".1f"),
        num("val_f1", ".4f"),
        num("test_f1", ".4f"),
    ]


def best_trials(trials: Sequence[FrozenTrial], top: int) -> list[FrozenTrial]:
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(done, key=lambda t: (-t.value, t.number))[:top]


def format_table(lora: Sequence[FrozenTrial], baseline: Sequence[FrozenTrial], top: int = 5) -> str:
    """Plain-text table: the `top` best COMPLETE LoRA trials, then the baseline run(s)."""
    rows = [_row(t) for t in best_trials(lora, top)] + [_row(t) for t in best_trials(baseline, 1)]
    if not rows:
        return "no COMPLETE trial yet"
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
