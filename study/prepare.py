"""What a process builds once before its trials: space, data, device, model, tensors.

`prepare_run(cfg)` builds everything a study's trials share, touching no storage;
optimize, confirm, the workers bench and device-check all start from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from objectives.batching import prepare
from objectives.data import IntentData, encode, load_data
from objectives.device import detect_device
from objectives.model import load_pretrained, model_fingerprint
from objectives.objective import RunContext
from objectives.space import Space, load_space
from study.config import StudyConfig


@dataclass(frozen=True)
class Prepared:
    """Everything a process builds once and every trial shares."""

    ctx: RunContext
    space: Space
    data: IntentData
    model_fingerprint: str | None = None  # of the model's files, for the study's recipe


def prepare_run(cfg: StudyConfig, need_space: bool = True) -> Prepared:
    """Build, touching no storage, for a validated `cfg` (`study.config.validate` checked its
    flags and storage URL): space, data, device, model, tensors."""
    space = load_space(cfg.space) if need_space else load_space(None)
    data = load_data(cfg.resolved_data_dir, cfg.max_train_samples)
    device = detect_device(cfg.device)
    base_model, tokenizer = load_pretrained(cfg.model, data.label_names)
    encoded = encode(data, tokenizer, cfg.max_length)
    ctx = RunContext(
        base_model=base_model,
        data=prepare(encoded, data.num_labels, device),
        model_name=cfg.model,
        data_fingerprint=data.fingerprint,
        label_names=tuple(data.label_names),
        progress=cfg.progress,
    )
    return Prepared(ctx, space, data, model_fingerprint(cfg.model))
