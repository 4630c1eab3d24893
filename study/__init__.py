"""Command line and orchestration of the Banking77 LoRA study."""
