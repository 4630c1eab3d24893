"""The `predict` command: classify texts with a folder written by `export`.

The folder is loaded the way the docs tell users to load it with plain transformers, so what
`predict` prints is what users' own code gets. The request is checked before torch is imported.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objectives.errors import UserError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

BATCH_SIZE = 64


class PredictError(UserError):
    """Bad model folder or input: the message is meant for the user."""


@dataclass(frozen=True)
class Prediction:
    text: str
    top: list[tuple[str, float]]  # (intent, probability), most likely first


def load_exported(folder: Path) -> tuple[nn.Module, Any]:
    """(model on the CPU in eval mode, tokenizer) from an exported folder."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from objectives.weights import CLASSIFICATION_CONFIG

    config_source = folder / CLASSIFICATION_CONFIG
    try:
        config = AutoConfig.from_pretrained(config_source if config_source.is_file() else folder)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder,
            config=config,
            # a base checkpoint with its own head of another size: the folder's head replaces it
            ignore_mismatched_sizes=True,
            attn_implementation="sdpa",
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PredictError(f"cannot load the model in {folder}: {first_line(e)}") from None
    model.eval()
    return model, tokenizer


def read_texts(path: Path) -> list[str]:
    """The `text` column of a CSV file with a header (the PolyAI layout works as it is)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, strict=True))
    except FileNotFoundError:
        raise PredictError(f"input file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PredictError(f"cannot read {path} as CSV: {e}") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "text" not in header:
        raise PredictError(f"{path} needs a header row with a 'text' column")
    col = header.index("text")
    texts = []
    for line_no, row in enumerate(rows[1:], start=2):
        text = row[col].strip() if col < len(row) else ""
        if not text:
            raise PredictError(f"{path} row {line_no} has no text")
        texts.append(text)
    if not texts:
        raise PredictError(f"{path} has a header but no rows")
    return texts


def top_intents(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    device: torch.device,
    dtype: torch.dtype,
    top_k: int,
) -> list[Prediction]:
    """Each text's `top_k` intents with softmax probabilities, in the order of `texts`."""
    import torch

    model.to(device)
    id2label = model.config.id2label
    k = min(top_k, len(id2label))
    # Similar lengths batched together: less padding, and padding never changes a prediction.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[Prediction | None] = [None] * len(texts)
    for start in range(0, len(order), BATCH_SIZE):
        idx = order[start : start + BATCH_SIZE]
        batch = tokenizer(
            [texts[i] for i in idx], truncation=True, padding=True, return_tensors="pt"
        ).to(device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with torch.no_grad(), autocast:
            logits = model(**batch).logits
        probs, ids = logits.float().softmax(-1).topk(k, dim=-1)
        for row, i in enumerate(idx):
            top = [(id2label[int(j)], float(p)) for p, j in zip(probs[row], ids[row], strict=True)]
            out[i] = Prediction(texts[i], top)
    return [p for p in out if p is not None]


def format_predictions(predictions: list[Prediction]) -> str:
    width = max(len(label) for p in predictions for label, _ in p.top)
    lines = []
    for p in predictions:
        lines.append(p.text)
        lines += [f"  {label:<{width}}  {prob:.3f}" for label, prob in p.top]
    return "\n".join(lines)


def run_predict(
    model_dir: str,
    texts: list[str],
    input_file: str | None,
    top_k: int,
    device_name: str,
    mixed_precision: bool,
) -> list[Prediction]:
    """The `predict` command: texts from the command line and/or `--input`, classified."""
    texts = [t.strip() for t in texts]
    if any(not t for t in texts):
        raise PredictError("an empty text cannot be classified")
    if input_file is not None:
        texts += read_texts(Path(input_file))
    if not texts:
        raise PredictError('give texts to classify ("text" ...) or --input FILE.csv')
    if top_k < 1:
        raise PredictError(f"--top-k must be a positive number, got {top_k}")
    folder = Path(model_dir)
    if not folder.is_dir():
        raise PredictError(f"no model folder at {folder}; write one with `python -m study export`")
    from objectives.device import compute_dtype, detect_device

    device = detect_device(device_name)
    model, tokenizer = load_exported(folder)
    return top_intents(
        model, tokenizer, texts, device, compute_dtype(device, mixed_precision), top_k
    )
