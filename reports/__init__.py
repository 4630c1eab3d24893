"""Reports for a LoRA study and its full fine-tuning baseline.

`write_reports(study, baseline, out_dir)` writes summary.csv, pareto_params.csv, pareto_time.csv,
importance.csv, PNG plots, a self-contained offline index.html and REPORT.md.
`pareto_figure(study_trials, baseline_trials, x=...)` builds one Pareto plotly figure from trials
alone, e.g. for optuna-dashboard. The maths underneath are pure functions over trials:
`reports.tables` (summary, Pareto fronts and how ties are handled, pruning savings, findings),
`reports.importance` (fANOVA, PED-ANOVA) and `reports.perclass` (per-class F1, confusion).
"""

from typing import Any

__all__ = ["pareto_figure", "write_reports"]


def __getattr__(name: str) -> Any:
    # Imported on first use: these need plotly and matplotlib, while the pure tables
    # (`reports.records`, `reports.tables`) must import where those are not installed.
    if name == "pareto_figure":
        from reports.figures import pareto_figure

        return pareto_figure
    if name == "write_reports":
        from reports.write import write_reports

        return write_reports
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
