"""Reports for a LoRA study and its full fine-tuning baseline.

`reports.write.write_reports(study, baseline, out_dir)` writes summary.csv, pareto_params.csv,
pareto_time.csv, importance.csv, PNG plots, a self-contained offline index.html and REPORT.md.
`reports.figures.pareto_figure(study_trials, baseline_trials, x=...)` builds one Pareto plotly
figure from trials alone, e.g. for optuna-dashboard. Those two need plotly and matplotlib; the
maths underneath do not, and are pure functions over trials: `reports.tables` (summary, Pareto
fronts and how ties are handled, pruning savings, findings), `reports.importance` (fANOVA,
PED-ANOVA) and `reports.perclass` (per-class F1, confusion).
"""
