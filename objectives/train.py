"""The training loop: AdamW, a transformers LR schedule, autocast, clipping, per-epoch validation.

It knows nothing of Optuna: the caller passes `on_epoch_end`, which may raise to stop the run
(a pruner does). Batches come from length buckets prepared once per process (`prepare`), so a
step pads to a multiple of 8 tokens instead of the longest text in a random batch, and the data
lives on the device from the start: no per-step host-to-device copies and no per-step host sync.

What a step computes is the model's function; how it computes it is cheaper where it can be:
- BERT classifiers run through `objectives.fastbert`: no work on pad tokens on CPUs (packed
  tokens), the last layer only for [CLS], LoRA updates fused into one matmul, and on CPUs
  dropout masks from a seeded NumPy generator;
- full fine-tuning on a CPU trains only the word-embedding rows the data uses and decays the
  others lazily (`objectives.embedding_rows`), which is what dense AdamW does to them;
- on CUDA, each bucket's forward and backward are replayed from a CUDA graph
  (`objectives.graphs`), with an eager fallback wherever graphs do not apply.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from objectives.config import TrainConfig
from objectives.data import Encoded, EncodedData
from objectives.embedding_rows import UsedRows
from objectives.fastbert import (
    BertParts,
    DropFn,
    MaskSource,
    bert_logits,
    bert_parts,
    no_dropout,
    torch_dropout,
)
from objectives.graphs import capture_train_step
from objectives.metrics import accuracy, confusion_matrix, macro_f1

PAD_MULTIPLE = 8
EVAL_BATCH = 256
NAN_CHECK_EVERY = 32  # steps between finiteness checks: each one is a host sync on a GPU


class TrainingFailed(RuntimeError):
    """A run that cannot go on (the trial fails; the study goes on)."""


class NonFiniteLossError(TrainingFailed):
    pass


class DeviceError(ValueError):
    """The device asked for does not exist here: the message is meant for the user."""


# ----------------------------------------------------------------------------- device choice


def resolve_device(requested: str, cuda_available: bool, mps_available: bool) -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist."""
    if requested == "auto":
        return "cuda" if cuda_available else "mps" if mps_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if requested == "mps" and not mps_available:
        raise DeviceError("--device mps was asked for, but PyTorch sees no Apple GPU (MPS)")
    if requested not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu, cuda or mps")
    return requested


def detect_device(requested: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None)
    return torch.device(
        resolve_device(requested, torch.cuda.is_available(), bool(mps and mps.is_available()))
    )


def autocast_dtype(device_type: str, mixed_precision: bool, bf16_supported: bool) -> torch.dtype:
    """The compute dtype: bf16 on GPUs that have it, fp16 on older CUDA GPUs, else fp32.

    CPUs stay in fp32: bf16 autocast on CPUs without matrix units is slower, not faster.
    """
    if not mixed_precision or device_type == "cpu":
        return torch.float32
    if device_type == "cuda":
        return torch.bfloat16 if bf16_supported else torch.float16
    return torch.bfloat16 if bf16_supported else torch.float32  # mps


def device_bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return True  # autocast on MPS supports bf16 since PyTorch 2.5 (macOS 14+)
    return False


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run on the device (process peak RSS on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Bucket:
    input_ids: torch.Tensor  # [n, length], padded
    attention_mask: torch.Tensor  # [n, length]
    labels: torch.Tensor  # [n]
    index: torch.Tensor  # [n] positions in the split, to put predictions back in order


@dataclass(frozen=True)
class PreparedSplit:
    buckets: list[Bucket]
    size: int
    labels: np.ndarray  # in split order, for metrics


@dataclass(frozen=True)
class PreparedData:
    train: PreparedSplit
    val: PreparedSplit
    test: PreparedSplit
    device: torch.device
    num_labels: int
    max_token_id: int  # to refuse a tokenizer whose ids the model's embeddings cannot hold


def bucket_length(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return multiple * math.ceil(n / multiple)


def prepare_split(split: Encoded, pad_id: int, device: torch.device) -> PreparedSplit:
    """Group examples by length rounded up to a multiple of 8; pad each group once."""
    lengths = [len(x) for x in split.input_ids]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(bucket_length(n), []).append(i)
    buckets = []
    for length in sorted(groups):
        idx = groups[length]
        ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            n = lengths[i]
            ids[row, :n] = split.input_ids[i]
            mask[row, :n] = 1
        buckets.append(
            Bucket(
                ids.to(device),
                mask.to(device),
                split.labels[idx].to(device),
                torch.tensor(idx, dtype=torch.long),
            )
        )
    return PreparedSplit(buckets, len(split), split.labels.numpy())


def prepare(data: EncodedData, num_labels: int, device: torch.device) -> PreparedData:
    """Tensors for all three splits on the device, once per process."""
    splits = (data.train, data.val, data.test)
    return PreparedData(
        *(prepare_split(s, data.pad_token_id, device) for s in splits),
        device=device,
        num_labels=num_labels,
        max_token_id=max(int(x.max()) for s in splits for x in s.input_ids if len(x)),
    )


def _rows(bucket: Bucket, rows: torch.Tensor) -> Bucket:
    dev = bucket.labels.device
    on_dev = rows.to(dev)
    return Bucket(
        bucket.input_ids[on_dev], bucket.attention_mask[on_dev], bucket.labels[on_dev],
        bucket.index[rows],
    )  # fmt: skip


def _pad_cat(low: Bucket, high: Bucket) -> Bucket:
    """`low`'s rows padded to `high`'s length, then `high`'s rows (pads are masked: no change)."""
    extra = high.input_ids.shape[1] - low.input_ids.shape[1]
    return Bucket(  # the new pad positions hold id 0, a valid row of any embedding table
        torch.cat([F.pad(low.input_ids, (0, extra)), high.input_ids]),
        torch.cat([F.pad(low.attention_mask, (0, extra)), high.attention_mask]),
        torch.cat([low.labels, high.labels]),
        torch.cat([low.index, high.index]),
    )


def full_batches(split: PreparedSplit, batch_size: int) -> PreparedSplit:
    """The split regrouped so that every batch but the epoch's last is full.

    Cut into batches bucket by bucket, each bucket would end in a short batch: an epoch of the
    1,500-example MiniLM benchmark would take 51 optimizer steps at batch 32 instead of the 47 of
    a plain shuffled loader (28 instead of 24 at batch 64), so a fixed number of epochs would
    train more. Here the rows beyond a multiple of `batch_size` in each bucket (drawn at random
    with a fixed seed) move up into the next longer bucket, padded to its length, which the
    attention mask makes invisible. An epoch then has ceil(n / batch_size) steps, and shapes stay
    one per bucket length. Cheap (a gather per bucket), done once per run.
    """
    gen = torch.Generator().manual_seed(0)
    out: list[Bucket] = []
    carry: Bucket | None = None
    last = len(split.buckets) - 1
    for i, bucket in enumerate(split.buckets):
        if carry is not None:
            bucket = _pad_cat(carry, bucket)
        n = len(bucket.labels)
        keep = n if i == last else n - n % batch_size
        carry = None
        if keep < n:
            perm = torch.randperm(n, generator=gen)
            carry = _rows(bucket, perm[keep:].sort().values)
            bucket = _rows(bucket, perm[:keep].sort().values)
        if len(bucket.labels):
            out.append(bucket)
    return PreparedSplit(out, split.size, split.labels)


def epoch_batches(
    split: PreparedSplit, batch_size: int, gen: torch.Generator
) -> list[tuple[int, torch.Tensor]]:
    """(bucket, row indices) for one epoch: shuffled within buckets, then batch order shuffled."""
    batches = []
    for b, bucket in enumerate(split.buckets):
        perm = torch.randperm(len(bucket.labels), generator=gen)
        batches += [(b, chunk) for chunk in perm.split(batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    f1: float
    accuracy: float
    predictions: np.ndarray


def make_forward(
    model: nn.Module,
    device: torch.device,
    drop: DropFn = no_dropout,
    parts: BertParts | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`(input_ids, attention_mask) -> logits`, through the lean BERT forward where it applies.

    On CPUs the encoder runs on packed tokens (no work on pads); elsewhere it keeps the padded,
    static shapes that GPUs and graph capture want. `drop` is the dropout of the lean forward
    (`no_dropout` to evaluate); other models run their own forward and their own dropout.
    `parts` overrides `bert_parts(model)`.
    """
    parts = parts or bert_parts(model)
    if parts is None:
        return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits
    packed = device.type == "cpu"
    return lambda ids, mask: bert_logits(parts, ids, mask, packed, drop)


def training_dropout(device: torch.device, seed: int) -> DropFn:
    """Seeded NumPy masks on CPUs (cheaper than torch's CPU sampling), torch's dropout elsewhere."""
    return MaskSource(seed) if device.type == "cpu" else torch_dropout


@torch.no_grad()
def predict(model: nn.Module, split: PreparedSplit, dtype: torch.dtype) -> np.ndarray:
    model.eval()
    device = split.buckets[0].input_ids.device if split.buckets else torch.device("cpu")
    forward = make_forward(model, device)
    chunks, positions = [], []
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for bucket in split.buckets:
            for start in range(0, len(bucket.labels), EVAL_BATCH):
                sl = slice(start, start + EVAL_BATCH)
                logits = forward(bucket.input_ids[sl], bucket.attention_mask[sl])
                chunks.append(logits.argmax(-1))
                positions.append(bucket.index[sl])
    preds = np.empty(split.size, dtype=np.int64)
    if chunks:  # one device-to-host copy for the whole split
        preds[torch.cat(positions).numpy()] = torch.cat(chunks).cpu().numpy()
    return preds


def evaluate(
    model: nn.Module, split: PreparedSplit, num_labels: int, dtype: torch.dtype
) -> Evaluation:
    preds = predict(model, split, dtype)
    return Evaluation(
        macro_f1(split.labels, preds, num_labels), accuracy(split.labels, preds), preds
    )


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    val_f1: float
    val_accuracy: float
    train_loss: float
    train_time_s: float  # cumulative training time so far, evaluation excluded


@dataclass
class TrainResult:
    history: list[EpochResult]
    best_epoch: int
    val_f1: float
    val_accuracy: float
    test_f1: float
    test_accuracy: float
    test_confusion: np.ndarray
    test_predictions: np.ndarray  # per test example, in split order (paired comparisons)
    train_time_s: float
    peak_mem_mb: float
    device: str
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    setup_time_s: float = 0.0  # once per run before the first epoch: CUDA graph capture

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def make_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    params: list[nn.Parameter] | None = None,
) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (as the HF Trainer does).

    `params` replaces the model's trainable parameters (see `used_rows`).
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device or build
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, foreach=device.type != "cpu")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

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


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train(
    model: nn.Module,
    cfg: TrainConfig,
    data: PreparedData,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train for `cfg.epochs`; evaluate the best epoch's weights on the test split.

    `on_epoch_end` may raise to stop early; whatever it raises propagates unchanged.
    Raises `NonFiniteLossError` when the loss becomes NaN or infinite.
    """
    device = data.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = autocast_dtype(device.type, cfg.mixed_precision, device_bf16_supported(device))
    use_amp = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)

    t_setup = time.perf_counter()
    train_split = full_batches(data.train, cfg.batch_size)
    steps_per_epoch = sum(math.ceil(len(b.labels) / cfg.batch_size) for b in train_split.buckets)
    parts = bert_parts(model)
    graphed = capture_train_step(model, parts, train_split.buckets, cfg.batch_size, dtype, device)
    vocab = used_rows(model, parts, data) if graphed is None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if vocab is not None:
        parts = replace(parts, word_lookup=vocab.lookup)
        trainable = [p for p in trainable if p is not vocab.weight] + [vocab.compact]
    optimizer = make_optimizer(model, cfg, device, trainable)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
    forward = make_forward(model, device, training_dropout(device, cfg.seed), parts)
    setup_time = time.perf_counter() - t_setup

    def eager_step(b: int, rows: torch.Tensor) -> torch.Tensor:
        bucket = train_split.buckets[b]
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            logits = forward(bucket.input_ids[rows], bucket.attention_mask[rows])
        loss = F.cross_entropy(logits.float(), bucket.labels[rows])
        scaler.scale(loss).backward()
        return loss.detach()

    step_fn = graphed if graphed is not None else eager_step
    history: list[EpochResult] = []
    best: EpochResult | None = None
    best_state: dict[str, torch.Tensor] = {}
    train_time = 0.0
    bar = _progress(cfg.epochs, progress)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        sync_device(device)
        t0 = time.perf_counter()
        batches = epoch_batches(train_split, cfg.batch_size, gen)
        if graphed is not None:
            batches = [(b, graphed.fill(b, rows)) for b, rows in batches]
        loss_sum = torch.zeros((), device=device)
        for step, (b, rows) in enumerate(_rows_to_device(batches, device), 1):
            loss_sum += step_fn(b, rows)
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if vocab is not None:
                vocab.record_step(optimizer.param_groups[0]["lr"], cfg.weight_decay)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % NAN_CHECK_EVERY == 0:
                _check_finite(loss_sum, epoch, step)
        _check_finite(loss_sum, epoch, steps_per_epoch)
        if vocab is not None:
            vocab.write_back()  # the model's table is current before anyone reads it
        sync_device(device)
        train_time += time.perf_counter() - t0

        ev = evaluate(model, data.val, data.num_labels, dtype)
        result = EpochResult(
            epoch, ev.f1, ev.accuracy, loss_sum.item() / steps_per_epoch, train_time
        )
        history.append(result)
        if best is None or result.val_f1 > best.val_f1:
            best = result
            best_state = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }
        bar.update(1)
        bar.set_postfix(val_f1=f"{result.val_f1:.4f}", loss=f"{result.train_loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(result)
    bar.close()

    assert best is not None  # epochs >= 1 is validated by the caller's config
    model.load_state_dict(best_state, strict=False)
    test_preds = predict(model, data.test, dtype)
    return TrainResult(
        history=history,
        best_epoch=best.epoch,
        val_f1=best.val_f1,
        val_accuracy=best.val_accuracy,
        test_f1=macro_f1(data.test.labels, test_preds, data.num_labels),
        test_accuracy=accuracy(data.test.labels, test_preds),
        test_confusion=confusion_matrix(data.test.labels, test_preds, data.num_labels),
        test_predictions=test_preds,
        train_time_s=train_time,
        setup_time_s=setup_time,
        peak_mem_mb=peak_memory_mb(device),
        device=str(device),
        best_state=best_state,
    )


def _rows_to_device(
    batches: list[tuple[int, torch.Tensor]], device: torch.device
) -> list[tuple[int, torch.Tensor]]:
    """The epoch's row indices on the device in one copy, not one small copy per step."""
    if device.type == "cpu" or not batches:
        return batches
    rows = torch.cat([r for _, r in batches])
    if device.type == "cuda":
        rows = rows.pin_memory()  # so the copy does not wait for the host
    rows = rows.to(device, non_blocking=True)
    sizes = [len(r) for _, r in batches]
    return list(zip([b for b, _ in batches], rows.split(sizes), strict=True))


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum):
        raise NonFiniteLossError(
            f"training loss became {loss_sum.item()} by epoch {epoch}, step {step}"
        )


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="epochs", unit="epoch", leave=False, disable=not enabled)
