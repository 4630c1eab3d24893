"""The configuration of one training run (a trial or the baseline), frozen and typed.

Field names equal the Optuna parameter names, so a trial's params map onto a config with
``dataclasses.replace(cfg, **trial.params)``. Defaults mirror the reference runs
(docs/methodology.md, "Model and defaults").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

DATA_DIR_ENV = "BANKING77_DATA_DIR"  # a folder with Banking77's train.csv and test.csv


def resolve_data_dir(given: str | None) -> str | None:
    """Where the data comes from: `given` (--data-dir), else $BANKING77_DATA_DIR, else None,
    which means the Hugging Face Hub."""
    return given or os.environ.get(DATA_DIR_ENV) or None


LORA_TARGETS = {
    # peft matches module names by suffix. The reference runs' "query,key,value,dense" hits every
    # linear layer of BERT ("dense" is also the FFN's and the pooler's), so it is `all_linear`;
    # `attention_dense` is the attention block alone: Q, K, V and its output projection.
    "attention": "query,key,value",
    "attention_dense": "query,key,value,attention.output.dense",
    "all_linear": "all-linear",
}


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "lora"  # "lora" (peft adapters + trained classifier) or "full" fine-tuning
    epochs: int = 6
    learning_rate: float = 5e-4
    lr_scheduler: str = "linear"  # any transformers scheduler name; warmup applies where it can
    batch_size: int = 64
    weight_decay: float = 0.1
    warmup_ratio: float = 0.06  # share of all optimizer steps spent warming up
    max_grad_norm: float = 1.0
    seed: int = 42  # the trial's training seed (init of adapters/head, dropout, batch order)
    mixed_precision: bool = True  # bf16/fp16 autocast where the device supports it
    # LoRA only
    lora_r: int = 16
    lora_alpha_ratio: float = 2.0  # alpha = ratio x rank; the reference used alpha = 2r
    lora_dropout: float = 0.05
    target_modules: str = "all_linear"  # a key of LORA_TARGETS; for BERT the reference's set
    lora_bias: str = "lora_only"  # peft `bias`: biases of adapted layers are trained too
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def lora_alpha(self) -> float:
        return self.lora_alpha_ratio * self.lora_r


LORA_DEFAULTS = TrainConfig()
# The fixed full fine-tuning baseline of the reference runs.
FULL_FT_DEFAULTS = replace(
    TrainConfig(), mode="full", learning_rate=1e-4, batch_size=32, weight_decay=0.05
)


def run_config(mode: str, epochs: int, seed: int, mixed_precision: bool) -> TrainConfig:
    """The defaults of `mode` ("lora", or "full": the fixed baseline) with one run's budget and
    seed: the one place a study's settings become a training configuration."""
    base = FULL_FT_DEFAULTS if mode == "full" else LORA_DEFAULTS
    return replace(base, epochs=epochs, seed=seed, mixed_precision=mixed_precision)


# What the baseline trial records as its (single-valued) parameters.
BASELINE_PARAMS = ("learning_rate", "lr_scheduler", "batch_size", "weight_decay")

# The baseline study holds the fixed run, the yardstick every LoRA trial is compared with, and
# (with `--sensitivity`) the same configuration at neighbouring learning rates, which only show
# whether the yardstick sits near its own optimum. Each trial says which it is
# (`objectives.record.Attr.ROLE`).
FIXED = "fixed"
NEIGHBOUR = "neighbour"
SENSITIVITY_FACTORS = (1 / 3, 3.0)
