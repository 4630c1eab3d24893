"""Building blocks shared by tests: a run context on the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from objectives.data import encode, load_data
from objectives.model import load_pretrained
from objectives.objective import RunContext
from objectives.train import prepare


def tiny_context(data_dir: Path, model_dir: Path, max_length: int = 32) -> RunContext:
    data = load_data(data_dir)
    base, tok = load_pretrained(str(model_dir), data.label_names)
    prepared = prepare(encode(data, tok, max_length), data.num_labels, torch.device("cpu"))
    return RunContext(base, prepared, str(model_dir), data.fingerprint, tuple(data.label_names))
