"""A leaner forward pass for BERT sequence classifiers: the same function, less work.

`bert_logits` computes what `model(input_ids, attention_mask).logits` of a
`BertForSequenceClassification` computes, from the model's own parameters and modules (so LoRA
adapters are the model's, and what is trained is the model), and skips work that feeds nothing:

- packed tokens (on CPUs): linear layers, LayerNorms, activations and dropouts see only the
  batch's real tokens; only attention sees the padded `[batch, heads, length, head_dim]` layout;
- the last layer computes keys and values for all tokens, the rest only for `[CLS]`;
- a LoRA layer adds its low-rank update inside one `addmm` (scaling folded into `alpha`);
- on CPUs, dropout masks come from a seeded NumPy generator (`MaskSource`), about three times
  cheaper than PyTorch's CPU Bernoulli sampling (profiled); only the random stream differs.

Up to float rounding, logits and gradients equal the model's own (the tests compare them with
dropout off). Anything else, or LoRA variants it does not reproduce, gives None from
`bert_parts`, and the loop calls the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (tensor, p) -> tensor with dropout p applied (or the tensor itself when p is 0)
DropFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class BertParts:
    """The modules of a BERT classifier that the lean forward reads, and the LoRA adapter name."""

    embeddings: nn.Module
    layers: tuple[nn.Module, ...]
    pooler: nn.Module
    dropout: nn.Module  # the classifier's dropout
    classifier: nn.Module
    num_heads: int
    head_dim: int
    adapter: str | None  # the active peft adapter, None for a plain model
    # ids -> word embeddings, where training reads them elsewhere (objectives.embedding_rows)
    word_lookup: Callable[[torch.Tensor], torch.Tensor] | None = None


def _linear_ok(mod: nn.Module, adapter: str | None) -> bool:
    """A plain nn.Linear, or a peft LoRA Linear that `_linear` reproduces exactly."""
    if type(mod) is nn.Linear:
        return True
    if adapter is None:
        return False
    from peft.tuners.lora.layer import Linear as LoraLinear

    return (
        type(mod) is LoraLinear
        and type(mod.base_layer) is nn.Linear
        and adapter in mod.lora_A
        and not mod.merged
        and not mod.disable_adapters
        and adapter not in mod.lora_variant  # DoRA and friends compute something else
        and not mod.lora_bias.get(adapter, False)
        and not getattr(mod, "fan_in_fan_out", False)
        and isinstance(mod.lora_dropout[adapter], nn.Dropout | nn.Identity)
    )


def bert_parts(model: nn.Module) -> BertParts | None:
    """The parts of a (peft-wrapped or plain) `BertForSequenceClassification`, else None.

    Anything the lean forward does not reproduce exactly (decoders, cross-attention, chunked
    feed-forward, relative positions, other LoRA variants) gives None.
    """
    from transformers import BertForSequenceClassification

    peft_model = hasattr(model, "get_base_model")
    inner = model.get_base_model() if peft_model else model
    if not isinstance(inner, BertForSequenceClassification):
        return None
    adapter = None
    if peft_model:
        if len(model.active_adapters) != 1:
            return None
        adapter = model.active_adapters[0]
    cfg, bert = inner.config, inner.bert
    emb = bert.embeddings
    if (
        cfg.is_decoder
        or cfg.add_cross_attention
        or getattr(cfg, "chunk_size_feed_forward", 0)
        or getattr(cfg, "position_embedding_type", "absolute") != "absolute"
        or bert.pooler is None
        or not all(
            type(m) is nn.Embedding
            for m in (emb.word_embeddings, emb.token_type_embeddings, emb.position_embeddings)
        )
    ):
        return None
    linears = [bert.pooler.dense]
    for layer in bert.encoder.layer:
        att = layer.attention.self
        linears += [att.query, att.key, att.value, layer.attention.output.dense]
        linears += [layer.intermediate.dense, layer.output.dense]
    if not all(_linear_ok(m, adapter) for m in linears):
        return None
    att = bert.encoder.layer[0].attention.self
    return BertParts(
        embeddings=emb,
        layers=tuple(bert.encoder.layer),
        pooler=bert.pooler,
        dropout=inner.dropout,
        classifier=inner.classifier,
        num_heads=att.num_attention_heads,
        head_dim=att.attention_head_size,
        adapter=adapter,
    )


# ----------------------------------------------------------------------------- dropout


class MaskSource:
    """Dropout with keep-masks drawn from a seeded NumPy generator, for CPUs.

    A 32-bit uniform integer per element is kept when it is at least p * 2**32 (the keep
    probability is 1 - p to within 2**-32, finer than a float32 uniform), and kept values are
    scaled by 1 / (1 - p), as `torch.nn.functional.dropout` does.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.SFC64(seed))

    def __call__(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if p == 0.0:
            return x
        n = x.numel()
        words = self.rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
        keep = words >= np.uint32(min(round(p * 2**32), 2**32 - 1))
        mask = keep.astype(np.float32)
        mask *= np.float32(1.0 / (1.0 - p))
        return x * torch.from_numpy(mask).view(x.shape).to(x.dtype)


def torch_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=True) if p else x


def no_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return x


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where the tokens of a `[batch, length]` batch live while the encoder runs.

    `index` None: the padded layout, hidden states `[batch, length, hidden]` (static shapes, for
    GPUs and graph capture). Otherwise the packed layout, hidden states `[tokens, hidden]`, with
    `index` the flat positions of the real tokens in the `batch * length` grid, row by row.
    """

    batch: int
    length: int
    key_mask: torch.Tensor  # [batch, 1, 1, length] bool: True where a key is a real token
    index: torch.Tensor | None = None
    first: torch.Tensor | None = None  # [batch] where each row's [CLS] sits among packed tokens

    @property
    def packed(self) -> bool:
        return self.index is not None


def make_layout(attention_mask: torch.Tensor, packed: bool) -> Layout:
    """The layout of one batch; packing reads the mask (a host sync on GPUs: CPU only)."""
    batch, length = attention_mask.shape
    key_mask = attention_mask.bool()[:, None, None, :]
    if not packed:
        return Layout(batch, length, key_mask)
    index = attention_mask.reshape(-1).nonzero().squeeze(1)
    lengths = attention_mask.sum(1)
    first = torch.cumsum(lengths, 0) - lengths  # rows are padded at their end: [CLS] comes first
    return Layout(batch, length, key_mask, index, first)


def _to_heads(x: torch.Tensor, lay: Layout, num_heads: int, head_dim: int) -> torch.Tensor:
    """The layout's `[..., hidden]` -> `[batch, heads, length, head_dim]`, zeros at pads."""
    if lay.packed:
        x = x.new_zeros(lay.batch * lay.length, x.shape[-1]).index_copy_(0, lay.index, x)
    return x.view(lay.batch, lay.length, num_heads, head_dim).transpose(1, 2)


def _from_heads(o: torch.Tensor, lay: Layout) -> torch.Tensor:
    """`[batch, heads, length, head_dim]` -> the layout's hidden states."""
    o = o.transpose(1, 2).reshape(lay.batch, lay.length, -1)
    if lay.packed:
        return o.reshape(lay.batch * lay.length, -1).index_select(0, lay.index)
    return o


# ----------------------------------------------------------------------------- the forward


def _linear(mod: nn.Module, x: torch.Tensor, adapter: str | None, drop: DropFn) -> torch.Tensor:
    """`mod(x)` for nn.Linear or vanilla LoRA: base(x) + scaling * B(A(dropout(x)))."""
    if type(mod) is nn.Linear:
        return F.linear(x, mod.weight, mod.bias)
    base = mod.base_layer
    out = F.linear(x, base.weight, base.bias)
    dropout = mod.lora_dropout[adapter]
    down = F.linear(drop(x, getattr(dropout, "p", 0.0)), mod.lora_A[adapter].weight)
    flat = torch.addmm(
        out.reshape(-1, out.shape[-1]),
        down.reshape(-1, down.shape[-1]),
        mod.lora_B[adapter].weight.t(),
        alpha=mod.scaling[adapter],
    )
    return flat.view(out.shape)


def _add_norm(
    out: nn.Module, x: torch.Tensor, residual: torch.Tensor, adapter: str | None, drop: DropFn
) -> torch.Tensor:
    """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(x)) + residual)."""
    return out.LayerNorm(drop(_linear(out.dense, x, adapter, drop), out.dropout.p) + residual)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
    p: float,
    drop: DropFn,
) -> torch.Tensor:
    """Softmax attention over the real keys, with dropout p on the probabilities in training."""
    if p == 0.0 or not isinstance(drop, MaskSource):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=0.0 if drop is no_dropout else p, scale=scale
        )
    # CPU training: with dropout, SDPA on a CPU runs this same math, but samples its mask with
    # torch's slower Bernoulli and checks the mask for empty rows (every row here has [CLS]).
    bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~key_mask, float("-inf"))
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
    return torch.matmul(drop(scores.softmax(-1), p), v)


def _layer(
    layer: nn.Module, h: torch.Tensor, lay: Layout, parts: BertParts, drop: DropFn, last: bool
) -> torch.Tensor:
    """One BertLayer; the last one returns the [CLS] states only, `[batch, hidden]`."""
    att = layer.attention.self
    heads, dim, adapter = parts.num_heads, parts.head_dim, parts.adapter
    k = _to_heads(_linear(att.key, h, adapter, drop), lay, heads, dim)
    v = _to_heads(_linear(att.value, h, adapter, drop), lay, heads, dim)
    if last:  # only [CLS] reaches the classifier
        h = h.index_select(0, lay.first) if lay.packed else h[:, 0]
        q = _linear(att.query, h, adapter, drop).view(lay.batch, 1, heads, dim).transpose(1, 2)
    else:
        q = _to_heads(_linear(att.query, h, adapter, drop), lay, heads, dim)
    o = _attention(q, k, v, lay.key_mask, att.scaling, att.dropout.p, drop)
    o = o.transpose(1, 2).reshape(lay.batch, heads * dim) if last else _from_heads(o, lay)
    a = _add_norm(layer.attention.output, o, h, adapter, drop)
    inter = layer.intermediate
    i = inter.intermediate_act_fn(_linear(inter.dense, a, adapter, drop))
    return _add_norm(layer.output, i, a, adapter, drop)


def _embed(
    emb: nn.Module,
    input_ids: torch.Tensor,
    lay: Layout,
    drop: DropFn,
    lookup: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """BertEmbeddings.forward with token type 0 and absolute positions, on the layout's tokens."""
    if lay.packed:
        ids = input_ids.reshape(-1).index_select(0, lay.index)
        positions = lay.index % lay.length
    else:
        ids = input_ids
        positions = torch.arange(lay.length, device=input_ids.device)
    # Same order of additions as transformers: (word + token type) + position.
    if lookup is None:
        x = F.embedding(ids, emb.word_embeddings.weight, emb.word_embeddings.padding_idx)
    else:
        x = lookup(ids)
    x = x + emb.token_type_embeddings.weight[0]
    x = x + F.embedding(positions, emb.position_embeddings.weight)
    return drop(emb.LayerNorm(x), emb.dropout.p)


def bert_logits(
    parts: BertParts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    packed: bool,
    drop: DropFn = no_dropout,
) -> torch.Tensor:
    """The classifier's logits for a right-padded batch, as `model(...).logits` computes them.

    `drop` applies dropout: `no_dropout` in evaluation, `torch_dropout` or a `MaskSource` in
    training (the modules' own train/eval flags are not consulted).
    """
    lay = make_layout(attention_mask, packed)
    h = _embed(parts.embeddings, input_ids, lay, drop, parts.word_lookup)
    for i, layer in enumerate(parts.layers):
        h = _layer(layer, h, lay, parts, drop, last=i == len(parts.layers) - 1)
    pooled = parts.pooler.activation(_linear(parts.pooler.dense, h, parts.adapter, drop))
    return parts.classifier(drop(pooled, parts.dropout.p))
