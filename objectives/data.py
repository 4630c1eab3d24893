"""Banking77 (or any intent CSV in its layout): load, validate, split, fingerprint, tokenise once
(the rules: docs/methodology.md, "Data and splits").
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from objectives.config import DATA_DIR_ENV
from objectives.errors import UserError, first_line

HUB_DATASET = "PolyAI/banking77"
# The Hub's automatic parquet export; recent `datasets` releases refuse the script-based repo.
HUB_PARQUET_REVISION = "refs/convert/parquet"
SPLIT_SEED = 42
VAL_FRACTION = 0.1


class DataError(UserError):
    """Bad or unreachable data: the message is meant for the user, as is."""


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray  # int64 label ids, positions in `IntentData.label_names`


@dataclass(frozen=True)
class IntentData:
    label_names: list[str]
    train: Split
    val: Split
    test: Split
    source: str  # where the data came from, for messages

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def fingerprint(self) -> str:
        """A short hash of the three splits and the label names: equal data, equal fingerprint."""
        h = hashlib.sha256()
        h.update(json.dumps(self.label_names).encode())
        for split in (self.train, self.val, self.test):
            h.update(json.dumps(split.texts).encode())
            h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- reading


def read_csv_split(path: Path) -> tuple[list[str], list[str]]:
    """Read one PolyAI CSV file into (texts, intent names), refusing anything malformed."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, strict=True))
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except csv.Error as e:
        raise DataError(f"{path} is not a valid CSV file (truncated or malformed?): {e}") from None
    if not rows:
        raise DataError(f"{path} is empty; expected a header 'text,category' and rows")
    header = [c.strip().lower() for c in rows[0]]
    missing = [c for c in ("text", "category") if c not in header]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)}; expected a header 'text,category'"
        )
    ti, ci = header.index("text"), header.index("category")
    texts, intents = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(
                f"{path} row {line_no} has {len(row)} fields, expected {len(header)} "
                "(malformed or truncated CSV?)"
            )
        text, intent = row[ti].strip(), row[ci].strip()
        if not any(ch.isalpha() for ch in text):
            raise DataError(f"{path} row {line_no} has no text: {row[ti]!r}")
        if not intent:
            raise DataError(f"{path} row {line_no} has an empty category")
        texts.append(text)
        intents.append(intent)
    if not texts:
        raise DataError(f"{path} has a header but no rows")
    return texts, intents


def load_local(data_dir: Path) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """(train texts, intents), (test texts, intents) from a folder in the PolyAI layout."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"data folder not found: {data_dir} (expected a folder with train.csv and test.csv)"
        )
    return read_csv_split(data_dir / "train.csv"), read_csv_split(data_dir / "test.csv")


def from_hub_dataset(dsd: Any) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """Convert a `datasets.DatasetDict` with `text` and a ClassLabel `label` to intent names."""
    out = []
    for split in ("train", "test"):
        ds = dsd[split]
        names = ds.features["label"].names
        out.append(([str(t).strip() for t in ds["text"]], [names[i] for i in ds["label"]]))
    return out[0], out[1]


def load_hub() -> tuple[tuple[list[str], list[str]], ...]:
    """Banking77 from the Hub; falls back to its parquet export for script-free `datasets`."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "the `datasets` package is not installed, so Banking77 cannot come from the Hub; "
            f"pass --data-dir DIR or set {DATA_DIR_ENV}"
        ) from None
    errors = []
    for revision in (None, HUB_PARQUET_REVISION):
        try:
            return from_hub_dataset(datasets.load_dataset(HUB_DATASET, revision=revision))
        except Exception as e:  # noqa: BLE001 - any Hub failure is reported below with both causes
            errors.append(f"{type(e).__name__}: {first_line(e)}")
    raise DataError(
        f"cannot load {HUB_DATASET} from the Hugging Face Hub ({'; then '.join(errors)}). "
        f"Offline, pass --data-dir DIR (a folder with the PolyAI train.csv and test.csv) "
        f"or set {DATA_DIR_ENV}"
    )


# ----------------------------------------------------------------------------- splitting


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a stratified sample of size n (sorted), via scikit-learn's splitter."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    chosen, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(chosen)


def build_data(
    train: tuple[list[str], list[str]],
    test: tuple[list[str], list[str]],
    source: str,
    max_train_samples: int | None = None,
) -> IntentData:
    """Validate, map intents to sorted ids, and split off the fixed stratified validation set."""
    train_texts, train_intents = train
    test_texts, test_intents = test
    label_names = sorted(set(train_intents))
    if len(label_names) < 2:
        raise DataError(f"{source}: the training split has fewer than two intents")
    unseen = sorted(set(test_intents) - set(label_names))
    if unseen:
        raise DataError(
            f"{source}: test intent(s) never seen in training: {', '.join(unseen[:5])}"
            + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        )
    counts = Counter(train_intents)
    rare = sorted(k for k, c in counts.items() if c < 2)
    if rare:
        raise DataError(
            f"{source}: intent(s) with a single training example cannot be split stratified: "
            + ", ".join(rare[:5])
        )
    ids = {name: i for i, name in enumerate(label_names)}
    y = np.array([ids[t] for t in train_intents], dtype=np.int64)
    y_test = np.array([ids[t] for t in test_intents], dtype=np.int64)

    n_val = max(len(label_names), math.ceil(VAL_FRACTION * len(y)))  # as scikit-learn rounds
    if len(y) - n_val < len(label_names):
        raise DataError(f"{source}: too few training examples to hold out a validation split")
    val_idx = stratified_subset(y, n_val, SPLIT_SEED)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    if max_train_samples is not None and max_train_samples < len(train_idx):
        if max_train_samples < len(label_names):
            raise DataError(
                f"--max-train-samples {max_train_samples} is below the number of intents "
                f"({len(label_names)}); a stratified subsample needs one example per intent"
            )
        train_idx = train_idx[stratified_subset(y[train_idx], max_train_samples, SPLIT_SEED)]

    def take(idx: np.ndarray) -> Split:
        return Split([train_texts[i] for i in idx], y[idx])

    return IntentData(
        label_names=label_names,
        train=take(train_idx),
        val=take(val_idx),
        test=Split(list(test_texts), y_test),
        source=source,
    )


def load_data(data_dir: Path | None, max_train_samples: int | None = None) -> IntentData:
    """Local folder when given, else the Hub."""
    if data_dir is not None:
        train, test = load_local(Path(data_dir))
        return build_data(train, test, str(data_dir), max_train_samples)
    train, test = load_hub()
    return build_data(train, test, HUB_DATASET, max_train_samples)


# ----------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class Encoded:
    """One split tokenised without padding: a ragged list of token-id tensors and the labels."""

    input_ids: list[torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EncodedData:
    train: Encoded
    val: Encoded
    test: Encoded
    pad_token_id: int


def encode(data: IntentData, tokenizer: Any, max_length: int) -> EncodedData:
    """Tokenise the three splits once per process; trials reuse the result."""

    def enc(split: Split) -> Encoded:
        ids = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
        return Encoded(
            [torch.tensor(x, dtype=torch.long) for x in ids],
            torch.as_tensor(split.labels, dtype=torch.long),
        )

    pad = tokenizer.pad_token_id
    if pad is None:
        raise DataError("the tokenizer has no padding token")
    return EncodedData(enc(data.train), enc(data.val), enc(data.test), int(pad))
