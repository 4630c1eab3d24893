"""The lean BERT forward and the CUDA-graph step logic, on the tiny model (CPU).

The lean forward must compute what the model computes: same logits with dropout off, same
gradients, for full fine-tuning and LoRA, packed and padded. The graph step's static shapes
(short batches filled with an ignored dummy row) must not change the loss or the gradients.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_context

from objectives.config import FULL_FT_DEFAULTS, LORA_DEFAULTS
from objectives.evaluation import make_forward
from objectives.fastbert import MaskSource, bert_logits, bert_parts, no_dropout
from objectives.graphs import (
    IGNORE_LABEL,
    LossStep,
    batch_loss,
    capture_train_step,
    fill_rows,
    graphs_unavailable,
    static_bucket,
)
from objectives.model import build_model
from objectives.train import train


@pytest.fixture(scope="module")
def ctx(tiny_data_dir: Path, tiny_model_dir: Path):
    return tiny_context(tiny_data_dir, tiny_model_dir)


def _model(ctx, cfg):
    model = build_model(ctx.base_model, cfg)
    with torch.no_grad():  # non-zero adapters, so that LoRA's path matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", [FULL_FT_DEFAULTS, LORA_DEFAULTS], ids=["full", "lora"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_lean_forward_matches_the_model(ctx, cfg, packed: bool) -> None:
    model = _model(ctx, cfg).eval()
    parts = bert_parts(model)
    assert parts is not None
    for bucket in ctx.data.train.buckets:
        ids, mask, labels = bucket.input_ids[:12], bucket.attention_mask[:12], bucket.labels[:12]
        ref = model(input_ids=ids, attention_mask=mask).logits
        F.cross_entropy(ref, labels).backward()
        want = _grads(model)
        model.zero_grad(set_to_none=True)
        out = bert_logits(parts, ids, mask, packed, no_dropout)
        F.cross_entropy(out, labels).backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert want.keys() == got.keys()
        scale = max(g.abs().max() for g in want.values())
        for name in want:
            # key biases get a zero gradient in theory (softmax ignores a per-query shift)
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale)


def test_other_models_and_lora_variants_take_the_models_own_forward(ctx) -> None:
    assert bert_parts(torch.nn.Linear(2, 2)) is None
    dora = replace(LORA_DEFAULTS, use_dora=True)
    model = build_model(ctx.base_model, dora)
    assert bert_parts(model) is None
    forward = make_forward(model.eval(), torch.device("cpu"))
    bucket = ctx.data.val.buckets[0]
    torch.testing.assert_close(
        forward(bucket.input_ids, bucket.attention_mask),
        model(input_ids=bucket.input_ids, attention_mask=bucket.attention_mask).logits,
    )


def test_mask_source_drops_at_rate_p_scales_and_repeats() -> None:
    x = torch.ones(400, 500)
    y = MaskSource(3)(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert torch.equal(MaskSource(3)(x, 0.1), y)
    assert not torch.equal(MaskSource(4)(x, 0.1), y)
    assert MaskSource(3)(x, 0.0) is x


# ----------------------------------------------------------------------------- CUDA graph logic


@pytest.mark.parametrize(
    "device, dtype, parts, env, expected",
    [
        ("cuda", torch.bfloat16, True, None, None),
        ("cuda", torch.float32, True, "1", None),
        ("cpu", torch.float32, True, None, "no CUDA graphs on cpu"),
        ("mps", torch.bfloat16, True, None, "no CUDA graphs on mps"),
        ("cuda", torch.float16, True, None, "fp16 needs a loss scaler"),
        ("cuda", torch.bfloat16, False, None, "not a BERT classifier"),
        ("cuda", torch.bfloat16, True, "0", "STUDY_CUDA_GRAPHS=0"),
    ],
)
def test_when_graphs_are_used(device, dtype, parts, env, expected, ctx) -> None:
    p = bert_parts(ctx.base_model) if parts else None
    reason = graphs_unavailable(torch.device(device), dtype, p, env)
    assert reason is None if expected is None else expected in reason


def test_no_capture_on_cpu(ctx) -> None:
    model = build_model(ctx.base_model, FULL_FT_DEFAULTS)
    captured = capture_train_step(
        model, bert_parts(model), ctx.data.train.buckets, 8, torch.float32, torch.device("cpu")
    )
    assert captured.step is None and captured.reason == "off: no CUDA graphs on cpu"


def test_fill_rows_pads_short_batches_with_the_dummy_row() -> None:
    rows = torch.tensor([4, 1, 7])
    assert fill_rows(rows, 3, 9) is rows
    assert fill_rows(rows, 5, 9).tolist() == [4, 1, 7, 9, 9]
    with pytest.raises(ValueError):
        fill_rows(rows, 2, 9)


def test_static_bucket_appends_one_ignored_row(ctx) -> None:
    b = ctx.data.train.buckets[0]
    s = static_bucket(b.input_ids, b.attention_mask, b.labels)
    n = len(b.labels)
    assert s.dummy == n and s.length == b.input_ids.shape[1]
    assert s.labels[n] == IGNORE_LABEL and s.attention_mask[n].tolist()[:2] == [1, 0]
    assert s.attention_mask[n].sum() == 1


@pytest.mark.parametrize("cfg", [FULL_FT_DEFAULTS, LORA_DEFAULTS], ids=["full", "lora"])
def test_filled_batch_gives_the_short_batchs_loss_and_gradients(ctx, cfg) -> None:
    model = _model(ctx, cfg).eval()  # eval: no dropout, so both passes are deterministic
    parts = bert_parts(model)
    b = ctx.data.train.buckets[1]
    s = static_bucket(b.input_ids, b.attention_mask, b.labels)
    rows = torch.arange(5)
    short = batch_loss(
        bert_logits(parts, b.input_ids[rows], b.attention_mask[rows], False), b.labels[rows]
    )
    short.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    full_rows = fill_rows(rows, 16, s.dummy)
    filled = batch_loss(
        bert_logits(parts, s.input_ids[full_rows], s.attention_mask[full_rows], False),
        s.labels[full_rows],
    )
    filled.backward()
    torch.testing.assert_close(filled, short)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)


def _eager_capture(steps, samples):
    """A stand-in for make_graphed_callables: the same modules, run eagerly."""
    for step, args in zip(steps, samples, strict=True):
        assert isinstance(step, LossStep)
        assert all(a.shape[0] == samples[0][0].shape[0] for a in args)  # one batch size
    return steps


def test_static_shape_step_trains_like_the_eager_loop(ctx, monkeypatch) -> None:
    """The graph path's batching and loss, run eagerly on the CPU, learns the tiny task."""
    import objectives.train as T

    def capture(model, parts, buckets, batch_size, dtype, device):
        outcome = capture_train_step(
            model, parts, buckets, batch_size, dtype, device, capture=_eager_capture
        )
        captured.append(outcome.step)
        lengths.append(len(outcome.step.steps))
        return outcome

    captured, lengths = [], []
    monkeypatch.setattr(T, "capture_train_step", capture)
    cfg = replace(FULL_FT_DEFAULTS, epochs=5, learning_rate=3e-3, batch_size=8, seed=1)
    result = train(build_model(ctx.base_model, cfg), cfg, ctx.data)
    assert captured and captured[0] is not None
    assert lengths[0] == len(ctx.data.train.buckets)
    assert result.setup.graphs == f"on: {lengths[0]} buckets captured"
    assert result.val_f1 > 0.9 and np.isfinite(result.history[-1].train_loss)


class _KeepAll(MaskSource):
    """A CPU mask source that drops nothing: the training code path without randomness."""

    def __call__(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return x


@pytest.mark.parametrize("cfg", [FULL_FT_DEFAULTS, LORA_DEFAULTS], ids=["full", "lora"])
def test_cpu_training_path_computes_the_models_function(ctx, cfg) -> None:
    """The CPU training path (explicit attention, NumPy dropout) with nothing dropped."""
    model = _model(ctx, cfg).eval()
    parts = bert_parts(model)
    b = ctx.data.train.buckets[-1]
    ids, mask = b.input_ids[:10], b.attention_mask[:10]
    torch.testing.assert_close(
        bert_logits(parts, ids, mask, True, _KeepAll(0)),
        model(input_ids=ids, attention_mask=mask).logits,
        rtol=1e-5,
        atol=1e-5,
    )


def test_used_rows_training_equals_dense_adamw(ctx, monkeypatch) -> None:
    """Full FT with the compact embedding rows ends where dense AdamW over the table ends."""
    import objectives.train as T

    cfg = replace(FULL_FT_DEFAULTS, epochs=2, learning_rate=3e-3, batch_size=8, seed=3)
    compact = build_model(ctx.base_model, cfg)
    T.train(compact, cfg, ctx.data)
    monkeypatch.setattr(T, "used_rows", lambda model, parts, data: None)
    dense = build_model(ctx.base_model, cfg)
    T.train(dense, cfg, ctx.data)
    dense_params = dict(dense.named_parameters())
    for name, p in compact.named_parameters():
        if name.endswith("key.bias"):
            continue  # its true gradient is zero: Adam turns rounding noise into lr-sized steps
        torch.testing.assert_close(p, dense_params[name], rtol=1e-4, atol=1e-5)
    # rows of tokens the training split never uses only decayed, and did so in both runs
    table = "bert.embeddings.word_embeddings.weight"
    base = dict(ctx.base_model.named_parameters())[table]
    used = torch.unique(
        torch.cat([b.input_ids[b.attention_mask.bool()] for b in ctx.data.train.buckets])
    )
    unused = torch.ones(len(base), dtype=torch.bool)
    unused[used] = False
    after, before = dense_params[table][unused].detach(), base[unused].detach()
    factor = after.norm() / before.norm()
    assert factor < 1
    torch.testing.assert_close(after, before * factor)
