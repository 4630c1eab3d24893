"""Reports for a LoRA study and its full fine-tuning baseline: the maths over trial records, the
figures and the files (docs/ARCHITECTURE.md, "reports/")."""
