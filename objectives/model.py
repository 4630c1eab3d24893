"""The model of a run: a pretrained BERT-class encoder with a classification head, full or LoRA.

Weights are read from disk (or the Hub) once per process by `load_pretrained`; each trial gets a
fresh copy from `build_model`, with its own seeded classifier head and, for LoRA, peft adapters.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# At import, not in the first LoRA trial: loading peft takes seconds, and a Ctrl-C landing inside
# that import (in a dataclass's generated code) would end Python with -2 instead of exit code 130.
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn

from objectives.config import LORA_TARGETS, TrainConfig
from objectives.errors import UserError, first_line


class ModelLoadError(UserError):
    """The model or tokenizer cannot be loaded: the message is meant for the user."""


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int

    @property
    def share_pct(self) -> float:
        return 100.0 * self.trainable / self.total


def load_pretrained(name: str, label_names: list[str]) -> tuple[nn.Module, Any]:
    """(sequence-classification model on CPU, tokenizer) from a Hub id or a local folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a checkpoint's own head is replaced anyway
            attn_implementation="sdpa",
            dtype=torch.float32,  # a checkpoint saved in bf16 still trains in fp32
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load model {name!r}: {first_line(e)}. Offline, pass --model DIR with a "
            "Hugging Face model folder (config.json, weights, tokenizer files)"
        ) from None
    return model, tokenizer


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def model_fingerprint(name: str) -> str | None:
    """A short hash of a model folder's config.json and its weight files' names and sizes.

    For a Hub id, the folder is the local snapshot the Hub download left in the cache. None when
    no folder can be found (the caller then records the model by name only). Same files, same
    fingerprint; a folder whose weights were replaced under the same path is told apart.
    """
    folder = Path(name)
    if not folder.is_dir():
        try:
            from transformers.utils import cached_file

            config = cached_file(name, "config.json", local_files_only=True)
        except (OSError, ValueError):
            return None
        if config is None:
            return None
        folder = Path(config).parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    h = hashlib.sha256(config_file.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _classifier(model: nn.Module) -> nn.Linear:
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ModelLoadError(f"{type(model).__name__} has no linear `classifier` head")
    return head


def build_model(base: nn.Module, cfg: TrainConfig) -> nn.Module:
    """A trainable copy of `base`: full fine-tuning, or LoRA adapters plus the classifier head."""
    model = copy.deepcopy(base)
    # The head is new for every run; its init follows the run's seed, not the process history.
    head = _classifier(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        std = getattr(model.config, "initializer_range", 0.02)
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
        head.bias.zero_()
    if cfg.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.mode != "lora":
        raise ValueError(f"unknown mode {cfg.mode!r}")
    targets = LORA_TARGETS[cfg.target_modules]
    torch.manual_seed(cfg.seed)  # peft draws the adapters' A matrices from the global RNG
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        bias=cfg.lora_bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=["classifier"],
    )
    return get_peft_model(model, lora)


def count_params(model: nn.Module) -> ParamCounts:
    """Trainable = parameters with gradients; total = every parameter, adapters included."""
    params = list(model.parameters())
    return ParamCounts(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )
