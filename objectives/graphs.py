"""CUDA graphs for the training step: one captured forward and backward per length bucket.

On a GPU a BERT step for short texts is mostly launch overhead; a captured graph
(`torch.cuda.make_graphed_callables`, no compiler involved) replays it as a single launch. A
graph has fixed shapes, so a bucket's last, short batch is filled up to `[batch_size, length]`
with a dummy row whose label the loss ignores: it attends only to itself and its loss term is
zero, so the mean loss and every gradient are exactly those of the short batch. The optimizer
step, clipping and the schedule stay eager. When and why the loop trains eagerly instead, and
what graphs cost in memory: docs/methodology.md, "CUDA graphs".
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from objectives.device import clear_cublas_workspaces, release_memory
from objectives.errors import first_line
from objectives.fastbert import BertParts, bert_logits, torch_dropout

IGNORE_LABEL = -100  # cross_entropy's default ignore_index
GRAPHS_ENV = "STUDY_CUDA_GRAPHS"
WARMUP_ITERS = 2  # eager passes per shape before capture: lazy init stays out of the graphs
# Share of the free device memory the graphs and the optimizer state may plan to fill: the rest
# is for the eager parts of a step (clipping, the optimizer's temporaries) and evaluation.
MEMORY_HEADROOM = 0.9

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

    def close(self) -> None:
        """Drop the graphs: the memory they hold is garbage from here on (see `_uncapture`)."""
        _uncapture(self.steps)
        self.steps = ()
        self.buckets = []


def _uncapture(steps: Sequence[nn.Module]) -> None:
    """Undo make_graphed_callables' patch of each module's `forward`.

    The patched `forward` is an instance attribute whose closure refers back to the module (and,
    through the graphed callable, to the graphs, their memory pools and static buffers): a
    reference cycle through the model that would hold all of it until the garbage collector
    happens to run. Removing the attribute breaks the cycle through the model; the graphs' own
    autograd Function class is still a cycle, which `objectives.device.release_memory` collects.
    """
    for step in steps:
        step.__dict__.pop("forward", None)


@dataclass(frozen=True)
class Captured:
    """The outcome of `capture_train_step`: a graphed step, or None and why not."""

    step: GraphedTrainStep | None
    reason: str  # "on: N buckets captured" or "off: <why>", as trials record it


def activation_bytes(
    layers: int, hidden: int, heads: int, intermediate: int, batch: int, length: int, width: int
) -> int:
    """Activations one BERT training batch keeps for backward, in bytes (an estimate).

    Per layer and token: about a dozen hidden-size vectors (the inputs of Q, K, V and the
    attention output, LoRA's dropped-out copies of layer inputs, LayerNorm inputs) and four of
    the feed-forward width (its input and output around the activation function), `width` bytes
    each; plus two attention maps (probabilities and their dropout) per head.
    """
    tokens = batch * length
    per_layer = tokens * (12 * hidden + 4 * intermediate) + 2 * heads * batch * length * length
    return layers * per_layer * width


def graph_memory_bytes(
    trainable_bytes: int,
    cast_bytes: int,
    lengths: Sequence[int],
    batch: int,
    layers: int,
    hidden: int,
    heads: int,
    intermediate: int,
    width: int,
) -> int:
    """Device memory the graphs of all buckets hold while they live, in bytes (an estimate).

    Every bucket has its own pool with its own gradients of the trainable weights
    (`trainable_bytes`), its autocast copies of the weights (`cast_bytes`, 0 in fp32) and the
    activations of one batch of its length.
    """
    fixed = trainable_bytes + cast_bytes
    return sum(
        fixed + activation_bytes(layers, hidden, heads, intermediate, batch, n, width)
        for n in lengths
    )


def graphs_fit(graph_bytes: int, optimizer_bytes: int, free_bytes: int) -> bool:
    """Whether the graphs, and the optimizer state created after them, fit the free memory."""
    return graph_bytes + optimizer_bytes <= MEMORY_HEADROOM * free_bytes


def estimate_graph_memory(
    model: nn.Module, lengths: Sequence[int], batch: int, dtype: torch.dtype
) -> tuple[int, int]:
    """(graph bytes, optimizer bytes) for `model` trained on buckets of `lengths` at `batch`.

    The optimizer bytes are AdamW's two moments plus one more set of gradients (the first
    step's `.grad` may be a copy of the graph's static gradient).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    width = torch.finfo(dtype).bits // 8
    cast = 0
    if dtype != torch.float32:  # autocast without its cache casts every linear weight per graph
        cast = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) * width
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 768)
    graph = graph_memory_bytes(
        trainable_bytes,
        cast,
        lengths,
        batch,
        layers=getattr(cfg, "num_hidden_layers", 12),
        hidden=hidden,
        heads=getattr(cfg, "num_attention_heads", 12),
        intermediate=getattr(cfg, "intermediate_size", 4 * hidden),
        width=width,
    )
    return graph, 3 * trainable_bytes


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on `device` can get: the driver's free memory plus what
    PyTorch's caching allocator holds unused. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def capture_train_step(
    model: nn.Module,
    parts: BertParts | None,
    buckets: Sequence,  # objectives.batching.Bucket: input_ids, attention_mask, labels
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    capture: Capture | None = None,
    free_bytes: int | None = None,
) -> Captured:
    """Capture one graph per bucket when it can work and fit; else no step, with the reason.

    `capture` defaults to `torch.cuda.make_graphed_callables`; tests pass an eager stand-in to
    check the static-shape logic on a CPU. `free_bytes` defaults to the device's free memory
    (on CUDA; elsewhere unknown, and then not checked).
    """
    if capture is None:
        reason = graphs_unavailable(device, dtype, parts, os.environ.get(GRAPHS_ENV))
        if reason is not None:
            return Captured(None, f"off: {reason}")
        capture = _make_graphed_callables
    assert parts is not None
    static = [static_bucket(b.input_ids, b.attention_mask, b.labels) for b in buckets]
    graph_bytes, optimizer_bytes = estimate_graph_memory(
        model, [b.length for b in static], batch_size, dtype
    )
    if free_bytes is None:
        free_bytes = free_device_bytes(device)
    if free_bytes is not None and not graphs_fit(graph_bytes, optimizer_bytes, free_bytes):
        return Captured(
            None,
            f"off: the graphs need about {graph_bytes / 2**30:.2f} GiB and the optimizer "
            f"{optimizer_bytes / 2**30:.2f} GiB, more than {MEMORY_HEADROOM:.0%} of the "
            f"{free_bytes / 2**30:.2f} GiB free",
        )
    steps = tuple(LossStep(model, parts, dtype) for _ in static)
    samples = tuple(_sample_batch(b, batch_size) for b in static)
    model.train()
    graphed, failure = _try_capture(capture, steps, samples)
    if failure is not None:
        # Only now, with the exception and its frames gone: the half-made graphs hold memory
        # through the patched forwards until the forwards are restored and garbage collected.
        _uncapture(steps)
        del steps, samples
        release_memory(device)
        warnings.warn(f"CUDA graphs: {failure}; training eagerly", stacklevel=2)
        return Captured(None, f"off: {failure}")
    step = GraphedTrainStep(static, graphed, batch_size)
    return Captured(step, f"on: {len(static)} buckets captured")


def _try_capture(capture: Capture, steps: tuple, samples: tuple) -> tuple[Sequence, str | None]:
    """(graphed callables, None), or ((), why) when capture ran out of memory or was refused
    (then the loop trains eagerly instead)."""
    try:
        return capture(steps, samples), None
    except torch.OutOfMemoryError as e:
        return (), f"out of memory during capture ({first_line(e)[:160]})"
    except (RuntimeError, AssertionError) as e:
        return (), f"capture failed ({first_line(e)[:160]})"


def _sample_batch(b: StaticBucket, batch_size: int) -> tuple[torch.Tensor, ...]:
    """A capture sample: the bucket's first row, filled up with the dummy row."""
    rows = fill_rows(torch.arange(min(b.dummy, 1), device=b.labels.device), batch_size, b.dummy)
    return b.input_ids[rows], b.attention_mask[rows], b.labels[rows]


def _make_graphed_callables(steps, samples):
    # One capture per bucket, each with its own memory pool: graphs that share a pool are only
    # safe when they replay in the order they were captured, and buckets come in shuffled order.
    # Unused inputs (a frozen head's twin under peft, say) get None gradients, not an error.
    # cuBLAS workspaces are cleared around the captures (as torch's cudagraph trees do), so a
    # workspace a graph needs is allocated inside that graph's pool and dies with it, instead
    # of an earlier trial's workspace being reused from inside a graph or kept forever.
    clear_cublas_workspaces()
    try:
        return [
            torch.cuda.make_graphed_callables(
                step, sample, num_warmup_iters=WARMUP_ITERS, allow_unused_input=True
            )
            for step, sample in zip(steps, samples, strict=True)
        ]
    finally:
        clear_cublas_workspaces()
