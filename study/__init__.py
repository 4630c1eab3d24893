"""Command line and orchestration of the Banking77 LoRA study."""

__version__ = "0.6.0"
