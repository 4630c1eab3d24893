"""Parameter counts follow the reference table's definitions, checked against closed forms."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from objectives.config import FULL_FT_DEFAULTS, LORA_DEFAULTS
from objectives.model import build_model, count_params


@pytest.fixture(scope="module")
def bert_base():
    """The bert-base-uncased architecture, randomly initialised (no download), 77 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=77))


def lora_closed_form(r: int, hidden=768, inner=3072, layers=12, labels=77) -> tuple[int, int]:
    """(trainable, added) parameters of LoRA on query,key,value,dense with bias=lora_only."""
    square = r * (hidden + hidden)  # A: r x in, B: out x r
    per_layer = 4 * square + r * (hidden + inner) + r * (inner + hidden)  # q,k,v,attn-out; ffn
    adapters = layers * per_layer + square  # + pooler.dense, which "dense" also matches
    biases = layers * (4 * hidden + inner + hidden) + hidden
    head = hidden * labels + labels
    # peft keeps the original head and trains a copy of it (modules_to_save)
    return adapters + biases + head, adapters + head


def test_full_ft_count_matches_reference(bert_base) -> None:
    counts = count_params(build_model(bert_base, FULL_FT_DEFAULTS))
    assert counts.trainable == counts.total == 109_541_453
    assert counts.share_pct == 100.0


@pytest.mark.parametrize("r", [4, 16])
def test_lora_counts_match_closed_form(bert_base, r: int) -> None:
    counts = count_params(build_model(bert_base, replace(LORA_DEFAULTS, lora_r=r)))
    trainable, added = lora_closed_form(r)
    assert counts.trainable == trainable
    assert counts.total == 109_541_453 + added
    assert 0 < counts.share_pct < 5


def test_head_init_follows_the_seed_and_base_is_untouched(bert_base) -> None:
    before = bert_base.classifier.weight.clone()
    a = build_model(bert_base, replace(FULL_FT_DEFAULTS, seed=1))
    b = build_model(bert_base, replace(FULL_FT_DEFAULTS, seed=1))
    c = build_model(bert_base, replace(FULL_FT_DEFAULTS, seed=2))
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(bert_base.classifier.weight, before)


def closed_form(r: int, targets: str, dora: bool, hidden=768, inner=3072, layers=12, labels=77):
    """(trainable, added) for every target set of the extended space, with or without DoRA.

    Each adapted layer in->out adds A (r x in) and B (out x r); bias=lora_only trains its bias;
    DoRA adds a trainable magnitude per output feature. rsLoRA changes the scaling only.
    """
    attention = [(hidden, hidden)] * 3  # query, key, value
    per_layer = {
        "attention": attention,
        "attention_dense": attention + [(hidden, hidden)],  # + attention.output.dense
        "all_linear": attention + [(hidden, hidden), (hidden, inner), (inner, hidden)],
    }[targets]
    adapted = per_layer * layers + ([(hidden, hidden)] if targets == "all_linear" else [])
    adapters = sum(r * (i + o) + (o if dora else 0) for i, o in adapted)
    biases = sum(o for _, o in adapted)
    head = hidden * labels + labels
    return adapters + biases + head, adapters + head


@pytest.mark.parametrize("targets", ["attention", "attention_dense", "all_linear"])
@pytest.mark.parametrize("dora", [False, True])
def test_every_extended_choice_counts_as_its_closed_form(bert_base, targets, dora) -> None:
    cfg = replace(LORA_DEFAULTS, lora_r=8, target_modules=targets, use_dora=dora, use_rslora=True)
    counts = count_params(build_model(bert_base, cfg))
    trainable, added = closed_form(8, targets, dora)
    assert (counts.trainable, counts.total) == (trainable, 109_541_453 + added)


def test_default_targets_are_the_reference_runs_set(bert_base) -> None:
    """The reference's query,key,value,dense hits every linear layer of BERT: all_linear."""
    from peft import LoraConfig, TaskType, get_peft_model

    ref = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32,
        target_modules=["query", "key", "value", "dense"], bias="lora_only",
        modules_to_save=["classifier"],
    )  # fmt: skip
    expected = count_params(get_peft_model(copy.deepcopy(bert_base), ref))
    assert LORA_DEFAULTS.target_modules == "all_linear"
    assert count_params(build_model(bert_base, LORA_DEFAULTS)) == expected
