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
import platform
import re
import resource
import sys
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
from objectives.errors import UserError
from objectives.fastbert import (
    BertParts,
    DropFn,
    MaskSource,
    bert_logits,
    bert_parts,
    no_dropout,
    torch_dropout,
)
from objectives.graphs import Captured, GraphedTrainStep, capture_train_step
from objectives.metrics import accuracy, confusion_matrix, macro_f1

PAD_MULTIPLE = 8
EVAL_BATCH = 256
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


class DeviceError(UserError):
    """The device asked for does not exist here: the message is meant for the user."""


# ----------------------------------------------------------------------------- device choice

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")  # and cuda:N, one GPU by its index
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def is_device_name(name: str) -> bool:
    """A name `--device` accepts: auto, cpu, cuda, cuda:N or mps (whether it exists is checked
    later, by `resolve_device`, on the machine that trains)."""
    return name in DEVICE_NAMES or _CUDA_INDEX.fullmatch(name) is not None


def resolve_device(requested: str, cuda_count: int, mps_available: bool) -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist.

    A CUDA device comes back with its index (`cuda` is `cuda:0`, as PyTorch means it), so a trial
    records which GPU it ran on. `cuda_count` is the number of visible GPUs.
    """
    if requested == "auto":
        requested = "cuda" if cuda_count else "mps" if mps_available else "cpu"
    if requested == "mps" and not mps_available:
        raise DeviceError("--device mps was asked for, but PyTorch sees no Apple GPU (MPS)")
    if requested in ("mps", "cpu"):
        return requested
    index = 0 if requested == "cuda" else _cuda_index(requested)
    if index is None:
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    if not cuda_count:
        raise DeviceError(f"--device {requested} was asked for, but PyTorch sees no CUDA GPU")
    if index >= cuda_count:
        raise DeviceError(
            f"--device {requested} was asked for, but PyTorch sees {cuda_count} CUDA GPU(s): "
            f"cuda:0 to cuda:{cuda_count - 1} (CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )
    return f"cuda:{index}"


def _cuda_index(name: str) -> int | None:
    m = _CUDA_INDEX.fullmatch(name)
    return int(m.group(1)) if m else None


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detect_device(requested: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None)
    return torch.device(
        resolve_device(requested, cuda_device_count(), bool(mps and mps.is_available()))
    )


def worker_device(requested: str, worker: int, cuda_count: int) -> str:
    """The device of worker `worker` (0, 1, ...) of `optimize --workers N`.

    `auto` and `cuda` spread the workers over the visible GPUs, worker k on GPU k mod count
    (`--workers 8` on 2 GPUs: 4 on each); an explicit `cuda:N`, `mps` or `cpu` keeps every
    worker there. Several workers per GPU are allowed: a trial of a small model leaves most of
    a large GPU idle.
    """
    if requested in ("auto", "cuda") and cuda_count > 0:
        return f"cuda:{worker % cuda_count}"
    return requested


# ----------------------------------------------------------------------------- precision


def autocast_dtype(device_type: str, mixed_precision: bool, bf16_supported: bool) -> torch.dtype:
    """The compute dtype: bf16 where the device has it, fp16 on older CUDA GPUs, else fp32.

    CPUs stay in fp32: bf16 autocast on CPUs without matrix units is slower, not faster. An Apple
    GPU without bf16 (macOS before 14) stays in fp32 too: fp16 would need a loss scaler whose
    overflow checks wait for the GPU every step, and fp16 attention on MPS is untested here.
    """
    if not mixed_precision or device_type == "cpu":
        return torch.float32
    if device_type == "cuda":
        return torch.bfloat16 if bf16_supported else torch.float16
    return torch.bfloat16 if bf16_supported else torch.float32  # mps


def bf16_capable(
    device_type: str,
    cuda_capability: tuple[int, int] | None = None,
    macos: tuple[int, ...] | None = None,
) -> bool:
    """Whether the device computes in bf16 natively: the precision choice as a pure function.

    CUDA: compute capability 8.0 (Ampere) or newer. `torch.cuda.is_bf16_supported()` is not
    used: its default counts emulation, so it says yes on V100 and T4, where bf16 autocast is
    slow and SDPA's memory-efficient kernel refuses bf16; those get fp16 with loss scaling.
    MPS: macOS 14 or newer (bf16 on Apple GPUs needs it). CPUs: never (see `autocast_dtype`).
    """
    if device_type == "cuda":
        return cuda_capability is not None and tuple(cuda_capability) >= (8, 0)
    if device_type == "mps":
        return macos is not None and macos >= (14, 0)
    return False


def macos_version(release: str) -> tuple[int, ...] | None:
    """`platform.mac_ver()[0]` ("14.2.1") as (14, 2, 1); None off macOS (an empty string)."""
    parts = release.split(".") if release else []
    try:
        return tuple(int(p) for p in parts) or None
    except ValueError:
        return None


def device_bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bf16_capable("cuda", torch.cuda.get_device_capability(device))
    if device.type == "mps":
        return bf16_capable("mps", macos=macos_version(platform.mac_ver()[0]))
    return False


# ----------------------------------------------------------------------------- memory


def maxrss_mb(ru_maxrss: int, system: str) -> float:
    """`getrusage().ru_maxrss` in MiB: macOS reports bytes, Linux (and the BSDs) KiB."""
    return ru_maxrss / (2**20 if system == "darwin" else 2**10)


class PeakMemory:
    """The peak memory of one run on its device, in MiB.

    CUDA counts its own peak (`max_memory_allocated`, reset when the run starts). MPS has no peak
    counter in torch 2.13, only the memory allocated now (`current_allocated_memory`) and the
    driver's total (`driver_allocated_memory`, cached blocks included, and also only "now"), so the
    loop calls `sample()` at a step's high points: after the forward pass (activations held for
    backward) and after the optimizer step (its state exists). That is a lower bound of the true
    peak, which may lie inside the backward pass. CPUs: the process's high-water resident set.
    `read_mps` replaces `torch.mps.current_allocated_memory` (tests).
    """

    def __init__(self, device: torch.device, read_mps: Callable[[], int] | None = None) -> None:
        self.device = device
        self.peak_bytes = 0
        if read_mps is None and device.type == "mps":
            read_mps = torch.mps.current_allocated_memory
        self._read = read_mps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if self._read is None:
            self.sample = _nothing  # nothing to sample: the counters above keep the peak
        else:
            self.sample()

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._read())

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._read is not None:
            self.sample()
            return self.peak_bytes / 2**20
        return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)


def _nothing() -> None:
    pass


def release_memory(device: torch.device) -> None:
    """Give a finished run's device memory back, before the next run starts.

    Garbage collection first: CUDA graphs live in reference cycles (each graphed callable is an
    autograd Function class made for it, and make_graphed_callables points a module's `forward`
    back at the module), so only the collector frees them and their memory pools. cuBLAS keeps a
    workspace per stream it has seen, in the caching allocator and never freed by `empty_cache`;
    graph capture brings new streams, so the workspaces are cleared too (as torch's own
    cudagraph trees do), while no graph is alive.
    """
    import gc

    gc.collect()
    if device.type == "cuda":
        clear_cublas = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_cublas is not None:
            torch.cuda.synchronize(device)
            clear_cublas()
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


@dataclass(frozen=True)
class RunSetup:
    """What happened before the first epoch, reported once per run (`on_setup`)."""

    setup_time_s: float  # weights to the device, CUDA graph capture, optimizer
    graphs: str  # "on: ..." when the step replays CUDA graphs, else "off: <why>"
    graph_mem_estimate_mb: float | None = None  # the estimate the capture decision used
    graph_mem_mb: float | None = None  # device memory the captured graphs took (measured)


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
    train_time_s: float  # the epochs' training, evaluation excluded
    peak_mem_mb: float
    device: str
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    setup: RunSetup = RunSetup(0.0, "off: not run")

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def setup_time_s(self) -> float:
        return self.setup.setup_time_s

    @property
    def wait_time_s(self) -> float:
        """What a user waits for the training: setup and the epochs (evaluation excluded)."""
        return self.setup.setup_time_s + self.train_time_s


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
    device = data.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # capture and its streams work on the current device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = autocast_dtype(device.type, cfg.mixed_precision, device_bf16_supported(device))
    use_amp = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    memory = PeakMemory(device)

    # Setup is part of what a user waits for: the copy to the device, capture, the optimizer.
    t_setup = time.perf_counter()
    model.to(device)
    train_split = full_batches(data.train, cfg.batch_size)
    steps_per_epoch = sum(math.ceil(len(b.labels) / cfg.batch_size) for b in train_split.buckets)
    parts = bert_parts(model)
    if eager_reason is None:
        captured = capture_train_step(
            model, parts, train_split.buckets, cfg.batch_size, dtype, device
        )
    else:
        captured = Captured(None, f"off: {eager_reason}")
    graphed: GraphedTrainStep | None = captured.step
    vocab = used_rows(model, parts, data) if graphed is None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if vocab is not None:
        parts = replace(parts, word_lookup=vocab.lookup)
        trainable = [p for p in trainable if p is not vocab.weight] + [vocab.compact]
    optimizer = make_optimizer(model, cfg, device, trainable)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
    forward = make_forward(model, device, training_dropout(device, cfg.seed), parts)
    sync_device(device)
    setup = RunSetup(
        time.perf_counter() - t_setup,
        captured.reason,
        captured.estimate_mb,
        captured.measured_mb,
    )
    if on_setup is not None:
        on_setup(setup)

    def eager_step(b: int, rows: torch.Tensor) -> torch.Tensor:
        bucket = train_split.buckets[b]
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            logits = forward(bucket.input_ids[rows], bucket.attention_mask[rows])
        loss = F.cross_entropy(logits.float(), bucket.labels[rows])
        memory.sample()  # activations are held for backward: a high point of the step
        scaler.scale(loss).backward()
        return loss.detach()

    step_fn = graphed if graphed is not None else eager_step

    def optimizer_step(b: int, rows: torch.Tensor) -> torch.Tensor:
        loss = step_fn(b, rows)
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        if vocab is not None:
            vocab.record_step(optimizer.param_groups[0]["lr"], cfg.weight_decay)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        memory.sample()  # the optimizer's state exists from the first step on
        optimizer.zero_grad(set_to_none=True)
        return loss

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
            if graphed is not None and epoch == 1 and step == 1:
                loss_sum += _first_graphed_step(optimizer_step, b, rows, device, t_setup)
            else:
                loss_sum += optimizer_step(b, rows)
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
    if graphed is not None:
        graphed.close()  # its pools are garbage from here on (`release_memory` frees them)

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
        peak_mem_mb=memory.peak_mb(),
        device=str(device),
        best_state=best_state,
        setup=setup,
    )


def _first_graphed_step(
    step: Callable[[int, torch.Tensor], torch.Tensor],
    b: int,
    rows: torch.Tensor,
    device: torch.device,
    t_setup: float,
) -> torch.Tensor:
    """The first step with graphs, where the optimizer's state joins the graphs' pools in memory;
    running out of memory there is a `GraphMemoryError` (the caller may retry eagerly)."""
    try:
        loss = step(b, rows)
        sync_device(device)  # an asynchronous failure surfaces here, not some steps later
        return loss
    except torch.OutOfMemoryError as e:
        raise GraphMemoryError(
            f"out of memory in the first step with CUDA graphs: {str(e)[:200]}",
            time.perf_counter() - t_setup,
        ) from e


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
