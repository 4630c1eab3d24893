"""The training loop: AdamW, a transformers LR schedule, autocast, clipping, per-epoch validation.

It knows nothing of Optuna: the caller passes `on_epoch_end`, which may raise to stop the run
(a pruner does). One optimizer step is `_step`: forward, loss, backward, clip, step. The
speed-ups it uses compute the same function more cheaply: `objectives.fastbert`,
`objectives.embedding_rows` and, on CUDA, `objectives.graphs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# At import, not in a trial's setup: loading transformers' optimization module (which loads peft)
# takes seconds that would count as the first trial's setup time, and a Ctrl-C landing inside
# that import (in a dataclass's generated code) would end Python with -2 instead of exit code 130.
from transformers import get_scheduler

from objectives.batching import (
    PreparedData,
    PreparedSplit,
    epoch_batches,
    full_batches,
    rows_to_device,
)
from objectives.config import TrainConfig
from objectives.device import StepPeakMemory, compute_dtype, sync_device
from objectives.embedding_rows import UsedRows
from objectives.evaluation import evaluate, make_forward
from objectives.fastbert import BertParts, DropFn, MaskSource, bert_parts, torch_dropout
from objectives.graphs import Captured, GraphedTrainStep, capture_train_step
from objectives.metrics import confusion_matrix

NAN_CHECK_EVERY = 32  # steps between finiteness checks: each one is a host sync on a GPU


class TrainingFailed(RuntimeError):
    """A run that cannot go on (the trial fails; the study goes on)."""


class NonFiniteLossError(TrainingFailed):
    pass


class GraphMemoryError(TrainingFailed):
    """Out of memory in the first training step with CUDA graphs (their pools take memory the
    eager loop would not). The optimizer may have half-updated the weights, so a caller that
    retries starts again from fresh weights with `train(..., eager_reason=...)`; one that does
    not sees a failed run."""

    def __init__(self, message: str, elapsed_s: float) -> None:
        super().__init__(message)
        self.elapsed_s = elapsed_s  # setup and the failed step: time the user waited for nothing


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    val_f1: float
    val_accuracy: float
    train_loss: float
    train_time_s: float  # cumulative training time so far, evaluation excluded


@dataclass(frozen=True)
class RunSetup:
    """What happened before the first epoch, reported once per run (`on_setup`)."""

    setup_time_s: float  # weights to the device, CUDA graph capture, optimizer
    graphs: str  # "on: ..." when the step replays CUDA graphs, else "off: <why>"


@dataclass
class TrainResult:
    history: list[EpochResult]
    val_f1: float
    test_f1: float
    test_accuracy: float
    test_confusion: np.ndarray
    test_predictions: np.ndarray  # per test example, in split order (paired comparisons)
    train_time_s: float  # the epochs' training, evaluation excluded
    peak_mem_mb: float
    setup: RunSetup


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trained `params` with no weight decay on biases and LayerNorm weights (as
    the HF Trainer does)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The pinned torch has fused AdamW kernels for every device the study runs on (CPU, CUDA, MPS).
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


def used_rows(model: nn.Module, parts: BertParts | None, data: PreparedData) -> UsedRows | None:
    """Compact training of the word-embedding rows the training split uses (CPU full FT only).

    On GPUs the dense table costs little next to the rest of a step, and the graph-captured
    step keeps to the model's own parameters.
    """
    if parts is None or data.device.type != "cpu":
        return None
    embedding = parts.embeddings.word_embeddings
    if not embedding.weight.requires_grad:
        return None
    used = torch.cat([b.input_ids[b.attention_mask.bool()] for b in data.train.buckets])
    return UsedRows(embedding, used)


def training_dropout(device: torch.device, seed: int) -> DropFn:
    """Seeded NumPy masks on CPUs (cheaper than torch's CPU sampling), torch's dropout elsewhere."""
    return MaskSource(seed) if device.type == "cpu" else torch_dropout


def train(
    model: nn.Module,
    cfg: TrainConfig,
    data: PreparedData,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    progress: bool = False,
    on_setup: Callable[[RunSetup], None] | None = None,
    eager_reason: str | None = None,
) -> TrainResult:
    """Train for `cfg.epochs`; evaluate the best epoch's weights on the test split.

    `on_setup` hears once, before the first epoch, how long setup took and whether the step runs
    from CUDA graphs. `on_epoch_end` may raise to stop early; whatever it raises propagates
    unchanged. `eager_reason` skips graph capture (say why: it is reported).
    Raises `NonFiniteLossError` when the loss becomes NaN or infinite, and `GraphMemoryError`
    when the first step with CUDA graphs runs out of memory.
    """
    run = _set_up(model, cfg, data, eager_reason)
    if on_setup is not None:
        on_setup(run.setup)
    history: list[EpochResult] = []
    best: EpochResult | None = None
    best_state: dict[str, torch.Tensor] = {}
    bar = _progress(cfg.epochs, progress)
    for epoch in range(1, cfg.epochs + 1):
        result = _end_epoch(run, epoch, _train_epoch(run, epoch))
        history.append(result)
        if best is None or result.val_f1 > best.val_f1:
            best, best_state = result, _trainable_state(model)
        bar.update(1)
        bar.set_postfix(val_f1=f"{result.val_f1:.4f}", loss=f"{result.train_loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(result)
    bar.close()
    if run.graphed is not None:
        run.graphed.close()  # its pools are garbage from here on (`release_memory` frees them)
    assert best is not None  # epochs >= 1 is validated by the caller's config
    return _test_result(run, history, best, best_state)


@dataclass
class _Run:
    """One run's state from setup to the test split. It holds no callable bound to itself: a
    cycle would keep the model alive after a failure until the garbage collector runs."""

    model: nn.Module
    cfg: TrainConfig
    data: PreparedData
    train_split: PreparedSplit  # regrouped so that every batch but the epoch's last is full
    steps_per_epoch: int
    gen: torch.Generator  # the epochs' batch order
    dtype: torch.dtype
    scaler: torch.amp.GradScaler
    # the lean forward (or the model's own), with training dropout; unused when graphed
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    graphed: GraphedTrainStep | None  # forward, loss and backward replayed from CUDA graphs
    vocab: UsedRows | None  # the word-embedding rows trained compactly (CPU full FT)
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    memory: StepPeakMemory
    t_setup: float
    setup: RunSetup
    train_time: float = 0.0  # the epochs' training so far, evaluation excluded

    @property
    def device(self) -> torch.device:
        return self.data.device


def _set_up(
    model: nn.Module, cfg: TrainConfig, data: PreparedData, eager_reason: str | None
) -> _Run:
    """Seeds, precision, the model on the device, graph capture, the optimizer and schedule."""
    device = data.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # capture and its streams work on the current device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = compute_dtype(device, cfg.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    memory = StepPeakMemory(device)

    # Setup is part of what a user waits for: the copy to the device, capture, the optimizer.
    t_setup = time.perf_counter()
    model.to(device)
    train_split = full_batches(data.train, cfg.batch_size)
    steps_per_epoch = sum(math.ceil(len(b.labels) / cfg.batch_size) for b in train_split.buckets)
    parts = bert_parts(model)
    captured = (
        Captured(None, f"off: {eager_reason}")
        if eager_reason is not None
        else capture_train_step(model, parts, train_split.buckets, cfg.batch_size, dtype, device)
    )
    vocab = used_rows(model, parts, data) if captured.step is None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if vocab is not None:
        parts = replace(parts, word_lookup=vocab.lookup)
        trainable = [p for p in trainable if p is not vocab.weight] + [vocab.compact]
    optimizer = make_optimizer(trainable, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
    forward = make_forward(model, device, training_dropout(device, cfg.seed), parts)
    sync_device(device)
    setup = RunSetup(time.perf_counter() - t_setup, captured.reason)
    # In the order of `_Run`'s fields: what is trained, on what, and how.
    return _Run(
        model, cfg, data, train_split, steps_per_epoch, gen, dtype, scaler, forward,
        captured.step, vocab, trainable, optimizer, scheduler, memory, t_setup, setup,
    )  # fmt: skip


def _train_epoch(run: _Run, epoch: int) -> torch.Tensor:
    """One pass over the training split; returns the summed loss (on the device)."""
    run.model.train()
    sync_device(run.device)
    t0 = time.perf_counter()
    batches = epoch_batches(run.train_split, run.cfg.batch_size, run.gen)
    if run.graphed is not None:
        batches = [(b, run.graphed.fill(b, rows)) for b, rows in batches]
    loss_sum = torch.zeros((), device=run.device)
    for step, (b, rows) in enumerate(rows_to_device(batches, run.device), 1):
        if run.graphed is not None and epoch == 1 and step == 1:
            loss_sum += _first_graphed_step(run, b, rows)
        else:
            loss_sum += _step(run, b, rows)
        if step % NAN_CHECK_EVERY == 0:
            _check_finite(loss_sum, epoch, step)
    _check_finite(loss_sum, epoch, run.steps_per_epoch)
    if run.vocab is not None:
        run.vocab.write_back()  # the model's table is current before anyone reads it
    sync_device(run.device)
    run.train_time += time.perf_counter() - t0
    return loss_sum


def _step(run: _Run, b: int, rows: torch.Tensor) -> torch.Tensor:
    """One optimizer step on rows `rows` of bucket `b`: forward, loss, backward, clip, step.

    With CUDA graphs the forward, loss and backward are one replay of the bucket's graph, which
    computes the same (`objectives.graphs`); the rest is the same code either way.
    """
    if run.graphed is not None:
        loss = run.graphed(b, rows)
    else:
        bucket = run.train_split.buckets[b]
        with torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32):
            logits = run.forward(bucket.input_ids[rows], bucket.attention_mask[rows])
        loss = F.cross_entropy(logits.float(), bucket.labels[rows])
        run.memory.sample()  # activations are held for backward: a high point of the step
        run.scaler.scale(loss).backward()
        loss = loss.detach()
    run.scaler.unscale_(run.optimizer)
    nn.utils.clip_grad_norm_(run.trainable, run.cfg.max_grad_norm)
    if run.vocab is not None:  # the unused embedding rows' decay, applied when they are read
        run.vocab.record_step(run.optimizer.param_groups[0]["lr"], run.cfg.weight_decay)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.memory.sample()  # the optimizer's state exists from the first step on
    run.optimizer.zero_grad(set_to_none=True)
    return loss


def _end_epoch(run: _Run, epoch: int, loss_sum: torch.Tensor) -> EpochResult:
    """The epoch measured on the validation split."""
    ev = evaluate(run.model, run.data.val, run.data.num_labels, run.dtype)
    train_loss = loss_sum.item() / run.steps_per_epoch
    return EpochResult(epoch, ev.f1, ev.accuracy, train_loss, run.train_time)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _test_result(
    run: _Run,
    history: list[EpochResult],
    best: EpochResult,
    best_state: dict[str, torch.Tensor],
) -> TrainResult:
    """The best epoch's weights back in the model, measured on the test split."""
    run.model.load_state_dict(best_state, strict=False)
    data = run.data
    test = evaluate(run.model, data.test, data.num_labels, run.dtype)
    return TrainResult(
        history=history,
        val_f1=best.val_f1,
        test_f1=test.f1,
        test_accuracy=test.accuracy,
        test_confusion=confusion_matrix(data.test.labels, test.predictions, data.num_labels),
        test_predictions=test.predictions,
        train_time_s=run.train_time,
        peak_mem_mb=run.memory.peak_mb(),
        setup=run.setup,
    )


def _first_graphed_step(run: _Run, b: int, rows: torch.Tensor) -> torch.Tensor:
    """The first step with graphs, where the optimizer's state joins the graphs' pools in memory;
    running out of memory there is a `GraphMemoryError` (the caller may retry eagerly)."""
    try:
        loss = _step(run, b, rows)
        sync_device(run.device)  # an asynchronous failure surfaces here, not some steps later
        return loss
    except torch.OutOfMemoryError as e:
        raise GraphMemoryError(
            f"out of memory in the first step with CUDA graphs: {str(e)[:200]}",
            time.perf_counter() - run.t_setup,
        ) from e


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum):
        raise NonFiniteLossError(
            f"training loss became {loss_sum.item()} by epoch {epoch}, step {step}"
        )


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="epochs", unit="epoch", leave=False, disable=not enabled)
