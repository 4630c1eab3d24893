"""The training loop on the tiny model: learning, repeatability, batches, failures, devices."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_context

from objectives.batching import bucket_length, epoch_batches, full_batches
from objectives.config import FULL_FT_DEFAULTS, LORA_DEFAULTS
from objectives.device import DeviceError, autocast_dtype, resolve_device
from objectives.evaluation import evaluate, make_forward
from objectives.model import build_model
from objectives.train import NonFiniteLossError, train


@pytest.fixture(scope="module")
def ctx(tiny_data_dir: Path, tiny_model_dir: Path):
    return tiny_context(tiny_data_dir, tiny_model_dir)


@pytest.mark.parametrize(
    "requested, cuda, mps, expected",
    [
        ("auto", 1, True, "cuda:0"),
        ("auto", 0, True, "mps"),
        ("auto", 0, False, "cpu"),
        ("cpu", 1, True, "cpu"),
        ("mps", 0, True, "mps"),
        ("cuda", 2, False, "cuda:0"),
        ("cuda:1", 2, False, "cuda:1"),
    ],
)
def test_resolve_device(requested: str, cuda: int, mps: bool, expected: str) -> None:
    assert resolve_device(requested, cuda, mps) == expected


def test_missing_device_is_an_error() -> None:
    with pytest.raises(DeviceError, match="no CUDA"):
        resolve_device("cuda", 0, True)
    with pytest.raises(DeviceError, match="MPS"):
        resolve_device("mps", 1, False)


@pytest.mark.parametrize(
    "device, mixed, bf16, expected",
    [
        ("cuda", True, True, torch.bfloat16),
        ("cuda", True, False, torch.float16),
        ("cuda", False, True, torch.float32),
        ("mps", True, True, torch.bfloat16),
        ("mps", True, False, torch.float32),
        ("cpu", True, True, torch.float32),
    ],
)
def test_precision_choice(device: str, mixed: bool, bf16: bool, expected: torch.dtype) -> None:
    assert autocast_dtype(device, mixed, bf16) == expected


def test_buckets_pad_to_multiples_of_8_and_keep_tokens(ctx) -> None:
    assert [bucket_length(n) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]
    split = ctx.data.train
    assert sum(len(b.labels) for b in split.buckets) == split.size
    for b in split.buckets:
        assert b.input_ids.shape[1] % 8 == 0
        # every row is padded only at its end, and its mask counts its real tokens
        lengths = b.attention_mask.sum(1)
        assert (lengths <= b.input_ids.shape[1]).all() and (lengths > 0).all()


def test_epoch_batches_cover_each_row_once_and_shuffle(ctx) -> None:
    split = ctx.data.train
    gen = torch.Generator().manual_seed(0)
    first = epoch_batches(split, 16, gen)
    second = epoch_batches(split, 16, gen)
    seen = sorted(int(split.buckets[b].index[r]) for b, rows in first for r in rows)
    assert seen == list(range(split.size))
    assert all(len(rows) <= 16 for _, rows in first)
    assert [r.tolist() for _, r in first] != [r.tolist() for _, r in second]


def test_full_ft_learns_and_reports_each_epoch(ctx) -> None:
    # A random tiny BERT is touchy: this setting reaches F1 1.0 for seeds 2 and 3 (checked by
    # hand; seed 1 stays on one class, as it may with 36 steps per epoch).
    cfg = replace(FULL_FT_DEFAULTS, epochs=5, learning_rate=3e-3, batch_size=8, seed=2)
    seen = []
    result = train(build_model(ctx.base_model, cfg), cfg, ctx.data, seen.append)
    assert [r.epoch for r in seen] == list(range(1, 6)) and len(result.history) == 5
    assert result.val_f1 == max(r.val_f1 for r in seen) > 0.9  # four separable intents
    assert result.test_f1 > 0.9
    assert seen[-1].train_time_s == pytest.approx(result.train_time_s)
    assert result.test_confusion.sum() == ctx.data.test.size


def test_test_metrics_come_from_the_best_epoch_weights(ctx) -> None:
    cfg = replace(LORA_DEFAULTS, epochs=4, learning_rate=1e-2, batch_size=16)
    model = build_model(ctx.base_model, cfg)
    states = {}  # each epoch's trained weights, as they stand when it is measured

    def keep_state(r) -> None:
        states[r.epoch] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    result = train(model, cfg, ctx.data, keep_state)
    best = max(result.history, key=lambda r: r.val_f1).epoch
    for name, p in model.named_parameters():
        if name in states[best]:
            assert torch.equal(p, states[best][name])
    again = evaluate(model, ctx.data.test, ctx.data.num_labels, torch.float32)
    assert again.f1 == pytest.approx(result.test_f1)


def test_same_seed_same_run_on_cpu(ctx) -> None:
    cfg = replace(LORA_DEFAULTS, epochs=2, learning_rate=5e-3, batch_size=16, seed=7)
    runs = [train(build_model(ctx.base_model, cfg), cfg, ctx.data) for _ in range(2)]
    assert runs[0].history == [
        replace(h, train_time_s=runs[0].history[i].train_time_s)
        for i, h in enumerate(runs[1].history)
    ]
    np.testing.assert_array_equal(runs[0].test_confusion, runs[1].test_confusion)
    other = train(build_model(ctx.base_model, replace(cfg, seed=8)), replace(cfg, seed=8), ctx.data)
    assert other.history[0].train_loss != runs[0].history[0].train_loss


def test_nan_loss_raises(ctx) -> None:
    cfg = replace(FULL_FT_DEFAULTS, epochs=2)
    model = build_model(ctx.base_model, cfg)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="nan"):
        train(model, cfg, ctx.data)


def test_callback_can_stop_the_run(ctx) -> None:
    class Stop(Exception):
        pass

    def stop_after_first(r):
        raise Stop(r.epoch)

    cfg = replace(LORA_DEFAULTS, epochs=3)
    with pytest.raises(Stop, match="1"):
        train(build_model(ctx.base_model, cfg), cfg, ctx.data, stop_after_first)


@pytest.mark.parametrize("batch_size", [3, 16, 64, 500])
def test_full_batches_fill_every_batch_but_the_last(ctx, batch_size: int) -> None:
    split = ctx.data.train
    full = full_batches(split, batch_size)
    sizes = [len(b.labels) for b in full.buckets]
    assert all(n % batch_size == 0 for n in sizes[:-1]) and all(sizes)
    steps = sum(-(-n // batch_size) for n in sizes)
    assert steps == -(-split.size // batch_size)  # as many steps as a plain shuffled loader
    # every example exactly once, with its own label and real tokens
    index = torch.cat([b.index for b in full.buckets])
    assert sorted(index.tolist()) == list(range(split.size))
    for b in full.buckets:
        assert np.array_equal(b.labels.numpy(), split.labels[b.index.numpy()])
        assert bool(b.attention_mask[:, 0].all())


def test_moved_rows_compute_what_they_computed_before(ctx) -> None:
    """A row padded up to a longer bucket gets the same logits (pads are masked)."""
    split = ctx.data.train
    full = full_batches(split, 16)
    model = build_model(ctx.base_model, FULL_FT_DEFAULTS).eval()

    def logits_by_index(buckets, forward):
        out = {}
        for b in buckets:
            logits = forward(b.input_ids, b.attention_mask)
            out.update(zip(b.index.tolist(), logits, strict=True))
        return out

    with torch.no_grad():
        for forward in (
            make_forward(model, torch.device("cpu")),  # the lean packed forward
            lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits,  # the model's own
        ):
            before = logits_by_index(split.buckets, forward)
            after = logits_by_index(full.buckets, forward)
            assert before.keys() == after.keys()
            for i in before:
                torch.testing.assert_close(after[i], before[i], rtol=1e-4, atol=1e-5)
    lengths = {i: b.input_ids.shape[1] for b in split.buckets for i in b.index.tolist()}
    padded = {i: b.input_ids.shape[1] for b in full.buckets for i in b.index.tolist()}
    assert any(padded[i] > lengths[i] for i in lengths)  # some rows really moved up
