"""Writing the report files: CSV tables, REPORT.md and the self-contained index.html.

Only formatting lives here; every number comes from `reports.tables` / `reports.importance`.
index.html inlines plotly.js once in <head> and each figure as a <div> plus an inline script, so
the page loads no script, style or font from the network and works from a file:// URL offline.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from objectives.record import TrialRecord
from reports.importance import ImportanceResult
from reports.tables import Findings

F1_COLUMNS = {"val_f1", "test_f1", "val_accuracy", "test_accuracy", "val_f1_mean", "test_f1_mean"}
COUNT_COLUMNS = {"trainable_params", "total_params"}


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """CSV with a header even when there are no rows; None becomes an empty cell."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def fmt(column: str, value: Any) -> str:
    """Human formatting of one table cell (CSV files keep the raw values)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if column in F1_COLUMNS and isinstance(value, (int, float)):
        return f"{value:.4f}"
    if column in COUNT_COLUMNS and isinstance(value, int):
        return f"{value:,}"
    if column in ("train_time_s", "wait_time_s") and isinstance(value, (int, float)):
        return f"{value:.1f}"
    if column == "trainable_share_pct" and isinstance(value, (int, float)):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "_(no rows)_\n"
    lines = [
        "| " + " | ".join(_md_cell(c) for c in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(fmt(c, row.get(c))) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def html_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p class='empty'>(no rows)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        css = " class='baseline'" if str(row.get("role") or "").startswith("baseline") else ""
        cells = "".join(f"<td>{html.escape(fmt(c, row.get(c)))}</td>" for c in columns)
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _params_text(record: TrialRecord) -> str:
    return ", ".join(f"{k}={fmt('', v)}" for k, v in record.params.items())


def findings_lines(findings: Findings) -> list[str]:
    """The closing findings as plain sentences (no Markdown), shared by REPORT.md and HTML."""
    lines: list[str] = []
    lora, base = findings.best_lora, findings.baseline
    if lora is None:
        lines.append("No COMPLETE LoRA trial yet, so there is no best LoRA setting to compare.")
    else:
        test = f", test F1 {lora.test_f1:.4f}" if lora.test_f1 is not None else ""
        lines.append(
            f"Best LoRA trial (by validation F1): {lora.label} ({_params_text(lora)}): "
            f"validation F1 {lora.val_f1:.4f}{test}."
        )
    if base is None:
        lines.append("No COMPLETE full fine-tuning baseline run, so no comparison with it.")
    else:
        test = f", test F1 {base.test_f1:.4f}" if base.test_f1 is not None else ""
        lines.append(
            f"Full fine-tuning baseline: {base.label}: validation F1 {base.val_f1:.4f}{test}."
        )
    if lora is not None and base is not None:
        deltas = []
        if findings.delta_val_f1 is not None:
            deltas.append(f"validation {findings.delta_val_f1:+.4f}")
        if findings.delta_test_f1 is not None:
            deltas.append(f"test {findings.delta_test_f1:+.4f}")
        else:
            deltas.append("test unknown (no test F1 on one of the two trials)")
        lines.append("Best LoRA minus baseline, macro-F1: " + ", ".join(deltas) + ".")
        if findings.params_vs_baseline_pct is not None:
            share = (
                f"{findings.lora_share_pct:.2f}% of its model's weights, "
                if findings.lora_share_pct is not None
                else ""
            )
            lines.append(
                f"Trainable parameters: the best LoRA trial trains {lora.trainable_params:,} "
                f"({share}{findings.params_vs_baseline_pct:.2f}% of the baseline's "
                f"{base.trainable_params:,})."
            )
        elif findings.lora_share_pct is not None:
            lines.append(
                f"Trainable parameters: the best LoRA trial trains "
                f"{findings.lora_share_pct:.2f}% of its model's weights."
            )
        if findings.time_ratio is not None:
            lines.append(
                f"Training time (setup included): {lora.wait_time_s:.1f} s for the best LoRA "
                f"trial against {base.wait_time_s:.1f} s for the baseline, a ratio of "
                f"{findings.time_ratio:.2f}."
            )
        else:
            lines.append("Training time ratio unknown (train_time_s missing).")
    if findings.top_params:
        tops = findings.top_params
        if len({name for name, _ in tops.values()}) == 1:
            shares = ", ".join(f"{ev} {share:.2f}" for ev, (_, share) in tops.items())
            who = "both evaluators rank it first" if len(tops) > 1 else "the only evaluator run"
            lines.append(
                f"Most important parameter for validation F1: {findings.most_important} "
                f"(share of importance: {shares}; {who})."
            )
        else:
            ranks = "; ".join(f"{ev} ranks {n} first ({s:.2f})" for ev, (n, s) in tops.items())
            lines.append(f"Most important parameter for validation F1: evaluators differ: {ranks}.")
    else:
        lines.append("Most important parameter: not computed (see notes).")
    savings = findings.savings
    if savings is None:
        lines.append("Pruning savings: no finished LoRA trial with a known epoch budget.")
    else:
        extra = []
        if savings.n_budget_assumed:
            extra.append(
                f"{savings.n_budget_assumed} trial(s) without max_epochs given the largest budget"
            )
        if savings.n_skipped:
            extra.append(f"{savings.n_skipped} trial(s) left out, epochs run unknown")
        lines.append(
            f"Pruning: {savings.epochs_run} epochs run of a budget of {savings.epoch_budget} "
            f"over {savings.n_trials} finished LoRA trials ({savings.n_pruned} pruned): "
            f"{_pct(savings.used_fraction)} of the epoch budget used, "
            f"{_pct(savings.saved_fraction)} saved"
            + (f" ({'; '.join(extra)})" if extra else "")
            + "."
        )
    for name, front in findings.fronts.items():
        members = ", ".join(r.label for r in front) or "empty"
        lines.append(f"Pareto front ({name}): {members}.")
    return lines


@dataclass(frozen=True)
class Section:
    """One figure of the report: its PNG file name, or the reason it could not be drawn."""

    title: str
    png: str | None
    figure: go.Figure | None
    note: str | None = None


@dataclass(frozen=True)
class Part:
    """A section of sentences and an optional table: the baseline check, the test-set
    comparison, the seed repeats of `confirm`."""

    title: str
    anchor: str  # the HTML id of its list
    lines: Sequence[str]
    columns: Sequence[str] = ()
    rows: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class ReportContent:
    title: str
    intro: str
    notes: Sequence[str]
    summary_columns: Sequence[str]
    summary_rows: Sequence[Mapping[str, Any]]  # best first, with a "role" column
    pareto: Mapping[str, tuple[Sequence[str], Sequence[Mapping[str, Any]]]]  # title -> table
    importance: ImportanceResult
    findings: Sequence[str]
    sections: Sequence[Section]
    parts: Sequence[Part] = ()  # after the findings, in this order


IMPORTANCE_COLUMNS = ("evaluator", "rank", "param", "importance")


def importance_rows(result: ImportanceResult) -> list[dict[str, Any]]:
    return [
        {"evaluator": r.evaluator, "rank": r.rank, "param": r.param, "importance": r.importance}
        for r in result.rows
    ]


def report_markdown(content: ReportContent) -> str:
    out = [f"# {content.title}\n", content.intro + "\n"]
    if content.notes:
        out.append("## Notes\n")
        out.extend(f"- {note}" for note in content.notes)
        out.append("")
    out.append("## Summary (best first)\n")
    out.append(markdown_table(content.summary_columns, content.summary_rows))
    for title, (columns, rows) in content.pareto.items():
        out.append(f"## {title}\n")
        out.append(markdown_table(columns, rows))
    out.append("## Parameter importance\n")
    out.append(markdown_table(IMPORTANCE_COLUMNS, importance_rows(content.importance)))
    out.append("## Figures\n")
    for section in content.sections:
        if section.png:
            out.append(f"![{section.title}]({section.png})\n")
        else:
            out.append(f"- {section.title}: {section.note}")
    out.append("\n## Findings\n")
    out.extend(f"- {line}" for line in content.findings)
    for part in content.parts:
        out.append(f"\n## {part.title}\n")
        out.extend(f"- {line}" for line in part.lines)
        out.append("")
        if part.columns:
            out.append(markdown_table(part.columns, part.rows))
    return "\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
tr.baseline td { background: #eaf6ea; font-weight: 600; }
.notes { background: #fff6e0; border-left: 4px solid #f0a500; padding: 0.5em 1em; }
.figure { margin: 1.5em 0; }
.note { color: #8a5a00; font-style: italic; }
.scroll { overflow-x: auto; }
"""


def report_html(content: ReportContent) -> str:
    """The whole page as one string: plotly.js inlined once, then one div per figure."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(content.title)}</title>",
        f"<style>{CSS}</style>",
        # Inline, not a CDN: the report must open offline.
        f"<script type='text/javascript'>{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>{esc(content.title)}</h1>",
        f"<p>{esc(content.intro)}</p>",
    ]
    if content.notes:
        items = "".join(f"<li>{esc(n)}</li>" for n in content.notes)
        parts.append(f"<div class='notes' id='notes'><b>Notes</b><ul>{items}</ul></div>")
    items = "".join(f"<li>{esc(line)}</li>" for line in content.findings)
    parts.append(f"<h2>Findings</h2><ul id='findings'>{items}</ul>")
    for part in content.parts:
        items = "".join(f"<li>{esc(line)}</li>" for line in part.lines)
        parts.append(f"<h2>{esc(part.title)}</h2>")
        parts.append(f"<ul id='{esc(part.anchor)}'>{items}</ul>")
        if part.columns:
            parts.append(f"<div class='scroll'>{html_table(part.columns, part.rows)}</div>")
    for i, section in enumerate(content.sections):
        parts.append(f"<div class='figure'><h2>{esc(section.title)}</h2>")
        if section.figure is not None:
            parts.append(
                pio.to_html(
                    section.figure,
                    full_html=False,
                    include_plotlyjs=False,
                    div_id=f"figure-{i}",
                    config={"displaylogo": False, "responsive": True},
                )
            )
        else:
            parts.append(f"<p class='note'>{esc(section.note or 'not available')}</p>")
        parts.append("</div>")
    for title, (columns, rows) in content.pareto.items():
        parts.append(f"<h2>{esc(title)}</h2><div class='scroll'>{html_table(columns, rows)}</div>")
    parts.append("<h2>Parameter importance</h2>")
    parts.append(html_table(IMPORTANCE_COLUMNS, importance_rows(content.importance)))
    parts.append("<h2>Summary (best first)</h2>")
    parts.append(
        f"<div class='scroll'>{html_table(content.summary_columns, content.summary_rows)}</div>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
