"""Evaluation: the forward pass as `(input_ids, attention_mask) -> logits`, predictions for a
split in its own order, and the split's macro-F1 and accuracy.

BERT classifiers run through the lean forward of `objectives.fastbert` (packed tokens on CPUs,
the last layer only for [CLS]); the training loop uses the same forward with dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from objectives.batching import PreparedSplit
from objectives.fastbert import BertParts, DropFn, bert_logits, bert_parts, no_dropout
from objectives.metrics import accuracy, macro_f1

EVAL_BATCH = 256


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
