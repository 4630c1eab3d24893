"""The reference loop of `bench`: the Hugging Face `Trainer` with the reference runs' settings
(docs/development.md, "Speed: bench"), never used to run trials.

It does no evaluation, checkpointing or reporting while it trains, so the Trainer is timed at
its cheapest; its setup (building the Trainer, which moves the model, up to the first epoch) is
timed apart from the epochs, as the project's loop times its own.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from objectives.config import TrainConfig
from objectives.data import Encoded
from objectives.device import compute_dtype, sync_device


@dataclass(frozen=True)
class ReferenceResult:
    epoch_times_s: list[float]  # per epoch, from the Trainer's epoch-begin to epoch-end events
    train_loss: float  # the Trainer's mean training loss over the run
    setup_time_s: float = 0.0  # from building the Trainer to its first epoch

    @property
    def train_time_s(self) -> float:
        return sum(self.epoch_times_s)


class _TokenDataset(torch.utils.data.Dataset):
    """Unpadded examples, as a tokenised `datasets.Dataset` would hand them to the collator."""

    def __init__(self, split: Encoded) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.split.input_ids[i].tolist()
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": int(self.split.labels[i]),
        }


def _epoch_timer(device: torch.device, times: list[float], begins: list[float]):
    """A callback timing each epoch; it syncs the device so queued GPU work is counted."""
    from transformers import TrainerCallback

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            sync_device(device)
            self.t0 = time.perf_counter()
            begins.append(self.t0)

        def on_epoch_end(self, args, state, control, **kwargs):
            sync_device(device)
            times.append(time.perf_counter() - self.t0)

    return EpochTimer()


def training_arguments(cfg: TrainConfig, device: torch.device, output_dir: str):
    """The reference runs' `TrainingArguments`, minus everything that is not training."""
    from transformers import TrainingArguments

    dtype = compute_dtype(device, cfg.mixed_precision)
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the training steps
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def train_reference(
    model: nn.Module, cfg: TrainConfig, train_split: Encoded, tokenizer: Any, device: torch.device
) -> ReferenceResult:
    """Train `model` in place with the Trainer for `cfg.epochs`; return per-epoch times."""
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer

    times: list[float] = []
    begins: list[float] = []
    with tempfile.TemporaryDirectory(prefix="reference-trainer-") as out:
        args = training_arguments(cfg, device, out)
        sync_device(device)
        t0 = time.perf_counter()
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_TokenDataset(train_split),
            data_collator=DataCollatorWithPadding(tokenizer),
            callbacks=[_epoch_timer(device, times, begins)],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        output = trainer.train()
    return ReferenceResult(times, float(output.training_loss), begins[0] - t0 if begins else 0.0)
