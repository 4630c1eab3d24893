"""Writing the report files: CSV tables, REPORT.md and the self-contained index.html (plotly.js
inlined once, so the page works from a file:// URL offline). Only formatting lives here.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from reports.importance import ImportanceResult

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


def params_text(params: Mapping[str, Any]) -> str:
    """A trial's parameters as `name=value, ...`, each value as `fmt` shows it."""
    return ", ".join(f"{k}={fmt('', v)}" for k, v in params.items())


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


@dataclass(frozen=True)
class Section:
    """One figure of the report: its PNG file name, and the figure or the reason it could not be
    drawn."""

    title: str
    png: str
    figure: go.Figure | None
    note: str | None = None


@dataclass(frozen=True)
class Check:
    """A question the report answers in sentences and an optional table: whether the baseline
    is fair, whether a difference is real on the test set, what the seed repeats show."""

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
    checks: Sequence[Check] = ()  # after the findings, in this order


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
        if section.figure is not None:
            out.append(f"![{section.title}]({section.png})\n")
        else:
            out.append(f"- {section.title}: {section.note}")
    out.append("\n## Findings\n")
    out.extend(f"- {line}" for line in content.findings)
    for part in content.checks:
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
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

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
    for part in content.checks:
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
