"""CUDA graphs for the training step: one captured forward and backward per length bucket.

On a GPU a BERT step for short texts is mostly launch overhead: hundreds of small kernels, each
queued by Python. Capturing the forward and backward pass as CUDA graphs
(`torch.cuda.make_graphed_callables`, no compiler involved) replays each as a single launch.
A graph has fixed shapes, so every batch of a bucket gets the same shape `[batch_size, length]`:
a bucket's last, short batch is filled up with a dummy row whose label the loss ignores. The
mean loss over the real rows and every gradient are then exactly those of the short batch: the
dummy row attends only to itself and its loss term is zero. That keeps the graphs to one per
bucket length (eight or so for Banking77), each captured in well under a second per trial, so
LoRA ranks and trials never wait for a compiler.

The optimizer step, gradient clipping and the schedule stay eager: fused AdamW is a handful of
launches. Where graphs cannot work (CPUs, Apple GPUs, fp16 with its loss scaler, models the lean
BERT forward does not cover) or capture fails, `capture_train_step` returns None and the loop
runs eagerly; setting the environment variable `STUDY_CUDA_GRAPHS=0` forces that too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from objectives.fastbert import BertParts, bert_logits, torch_dropout

IGNORE_LABEL = -100  # cross_entropy's default ignore_index
GRAPHS_ENV = "STUDY_CUDA_GRAPHS"
WARMUP_ITERS = 2  # eager passes per shape before capture: lazy init stays out of the graphs

# make_graphed_callables(callables, sample_args) -> graphed callables
Capture = Callable[[tuple[nn.Module, ...], tuple[tuple[torch.Tensor, ...], ...]], Sequence]


def graphs_unavailable(
    device: torch.device, dtype: torch.dtype, parts: BertParts | None, env: str | None
) -> str | None:
    """Why the step cannot be graph-captured here, or None when it can."""
    if env is not None and env.strip() == "0":
        return f"{GRAPHS_ENV}=0"
    if device.type != "cuda":
        return f"no CUDA graphs on {device.type}"
    if parts is None:
        return "the model is not a BERT classifier the lean forward covers"
    if dtype == torch.float16:
        return "fp16 needs a loss scaler, which syncs with the host"
    return None


@dataclass(frozen=True)
class StaticBucket:
    """A training bucket with one dummy row appended (index `dummy`), on the device."""

    input_ids: torch.Tensor  # [n + 1, length]
    attention_mask: torch.Tensor  # [n + 1, length]
    labels: torch.Tensor  # [n + 1]; the dummy row's label is IGNORE_LABEL

    @property
    def dummy(self) -> int:
        return len(self.labels) - 1

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def static_bucket(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> StaticBucket:
    """Append the dummy row: the first row's [CLS] as its one real token (so its attention row
    is not empty; an empty one gives NaN, and NaN times a zero gradient is still NaN)."""
    dummy_mask = attention_mask.new_zeros((1, attention_mask.shape[1]))
    dummy_mask[0, 0] = 1
    return StaticBucket(
        torch.cat([input_ids, input_ids[:1]]),
        torch.cat([attention_mask, dummy_mask]),
        torch.cat([labels, labels.new_full((1,), IGNORE_LABEL)]),
    )


def fill_rows(rows: torch.Tensor, batch_size: int, dummy: int) -> torch.Tensor:
    """A batch's row indices, filled up to `batch_size` with the dummy row."""
    missing = batch_size - len(rows)
    if missing < 0:
        raise ValueError(f"a batch of {len(rows)} rows does not fit batch size {batch_size}")
    return rows if missing == 0 else torch.cat([rows, rows.new_full((missing,), dummy)])


def batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real rows (dummy rows are ignored, not averaged in)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL)


class LossStep(nn.Module):
    """(input_ids, attention_mask, labels) -> mean loss, through the lean padded forward.

    The model is a submodule, so its parameters are the graph's parameters.
    """

    def __init__(self, model: nn.Module, parts: BertParts, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.parts = parts
        self.dtype = dtype

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        device_type = input_ids.device.type
        # Graph capture needs autocast's weight cache off (make_graphed_callables refuses it).
        with torch.autocast(
            device_type,
            dtype=self.dtype,
            enabled=self.dtype != torch.float32,
            cache_enabled=False,
        ):
            logits = bert_logits(self.parts, input_ids, attention_mask, False, torch_dropout)
        return batch_loss(logits, labels)


class GraphedTrainStep:
    """Forward and backward of one training batch, replayed from the bucket's graph."""

    def __init__(
        self, buckets: list[StaticBucket], steps: Sequence[nn.Module], batch_size: int
    ) -> None:
        self.buckets = buckets
        self.steps = steps  # one graphed LossStep per bucket
        self.batch_size = batch_size

    def fill(self, bucket: int, rows: torch.Tensor) -> torch.Tensor:
        return fill_rows(rows, self.batch_size, self.buckets[bucket].dummy)

    def __call__(self, bucket: int, rows: torch.Tensor) -> torch.Tensor:
        """Run forward and backward for `rows` (already filled, on the device); the loss."""
        b = self.buckets[bucket]
        loss = self.steps[bucket](b.input_ids[rows], b.attention_mask[rows], b.labels[rows])
        loss.backward()
        return loss.detach()


def capture_train_step(
    model: nn.Module,
    parts: BertParts | None,
    buckets: Sequence,  # objectives.train.Bucket: input_ids, attention_mask, labels
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    capture: Capture | None = None,
) -> GraphedTrainStep | None:
    """Capture one graph per bucket, or None (with the reason as a warning on failure).

    `capture` defaults to `torch.cuda.make_graphed_callables`; tests pass an eager stand-in to
    check the static-shape logic on a CPU.
    """
    if capture is None:
        reason = graphs_unavailable(device, dtype, parts, os.environ.get(GRAPHS_ENV))
        if reason is not None:
            return None
        capture = _make_graphed_callables
    assert parts is not None
    static = [
        static_bucket(b.input_ids, b.attention_mask, b.labels) for b in buckets if len(b.labels)
    ]
    if len(static) != len(buckets):
        return None  # an empty bucket would shift the bucket numbers; prepare never makes one
    steps = tuple(LossStep(model, parts, dtype) for _ in static)
    samples = tuple(_sample_batch(b, batch_size) for b in static)
    model.train()
    try:
        graphed = capture(steps, samples)
    except (RuntimeError, AssertionError) as e:  # capture refused: train eagerly instead
        warnings.warn(f"CUDA graph capture failed, training eagerly: {e}", stacklevel=2)
        return None
    return GraphedTrainStep(static, graphed, batch_size)


def _sample_batch(b: StaticBucket, batch_size: int) -> tuple[torch.Tensor, ...]:
    """A capture sample: the bucket's first row, filled up with the dummy row."""
    rows = fill_rows(torch.arange(min(b.dummy, 1), device=b.labels.device), batch_size, b.dummy)
    return b.input_ids[rows], b.attention_mask[rows], b.labels[rows]


def _make_graphed_callables(steps, samples):
    # One capture per bucket, each with its own memory pool: graphs that share a pool are only
    # safe when they replay in the order they were captured, and buckets come in shuffled order.
    # Unused inputs (a frozen head's twin under peft, say) get None gradients, not an error.
    return [
        torch.cuda.make_graphed_callables(
            step, sample, num_warmup_iters=WARMUP_ITERS, allow_unused_input=True
        )
        for step, sample in zip(steps, samples, strict=True)
    ]
