"""Building blocks shared by tests: a run context on the tiny model, a child that takes Ctrl-C."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from objectives.batching import prepare
from objectives.data import encode, load_data
from objectives.model import load_pretrained
from objectives.objective import RunContext


def tiny_context(data_dir: Path, model_dir: Path, max_length: int = 32) -> RunContext:
    data = load_data(data_dir)
    base, tok = load_pretrained(str(model_dir), data.label_names)
    prepared = prepare(encode(data, tok, max_length), data.num_labels, torch.device("cpu"))
    return RunContext(base, prepared, str(model_dir), data.fingerprint, tuple(data.label_names))


def default_sigint() -> None:
    """`preexec_fn` of a child that a test interrupts with SIGINT: the default disposition, so
    its Python raises KeyboardInterrupt even where the tests were started with SIGINT ignored
    (a background job of a non-interactive shell), which a child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
