"""Batches: the splits as length buckets on the device, and the order of an epoch's batches.

Examples are grouped by length rounded up to a multiple of 8 and padded once per process
(`prepare`), so a step pads to its bucket's length instead of the longest text in a random
batch, and the data lives on the device from the start: no per-step host-to-device copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from objectives.data import Encoded, EncodedData

PAD_MULTIPLE = 8


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


def bucket_length(n: int) -> int:
    return PAD_MULTIPLE * math.ceil(n / PAD_MULTIPLE)


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


def rows_to_device(
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
