"""A trained model's weights on disk: save, reload onto the base model, archive, export.

A LoRA run keeps only what it trained (peft's adapter, with the classifier head and the adapted
layers' biases), a full fine-tuning run the whole model; `weights.json` beside them records what
reloading needs (`WeightsInfo`). Archives are unpacked with tarfile's `data` filter, so one
cannot write outside its folder; folders meant for users are written whole or not at all
(`atomic_folder`).
"""

from __future__ import annotations

import json
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from objectives.errors import UserError, first_line
from objectives.model import load_pretrained

MANIFEST = "weights.json"
FORMAT = 1  # bump when the folder layout changes; older archives are then refused clearly
# In an exported folder: the base model's config with the label map and the classification
# architecture. An adapter folder cannot hold it as config.json: transformers would then take the
# folder for a complete model and look for the base weights in it.
CLASSIFICATION_CONFIG = "classification_config.json"


class WeightsError(UserError):
    """Weights that cannot be read or written as asked: the message is meant for the user."""


@dataclass(frozen=True)
class WeightsInfo:
    """What `weights.json` records beside the weights."""

    mode: str  # "lora" (peft adapter) or "full" (the whole model)
    base_model: str  # Hub id or local folder the run started from (LoRA reloads onto it)
    labels: tuple[str, ...]  # label id = position, as in the trial's `labels` attribute
    max_length: int  # tokens; texts are truncated as in training
    mixed_precision: bool  # the run's autocast setting, so evaluation predicts as training did
    heldout_fingerprint: str  # labels + validation + test texts: the data the metrics are about
    study: str
    trial: int

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> WeightsInfo:
        if doc.get("format") != FORMAT:
            raise WeightsError(
                f"weights written in format {doc.get('format')!r}; this version reads {FORMAT}"
            )
        fields = {k: v for k, v in doc.items() if k != "format"}
        try:
            return cls(**{**fields, "labels": tuple(fields["labels"])})
        except (KeyError, TypeError) as e:
            raise WeightsError(f"{MANIFEST} is incomplete: {e}") from None


@dataclass
class Restored:
    """A reloaded model (CPU, eval mode) with its tokenizer and what was recorded beside it."""

    model: nn.Module
    tokenizer: Any
    info: WeightsInfo


# ----------------------------------------------------------------------------- save and reload


def save_weights(model: nn.Module, folder: Path, info: WeightsInfo) -> None:
    """Write the trainable part of `model` (LoRA: the adapter; full: everything) and the manifest.

    `folder` must exist. A peft model saves its adapter only; a plain transformers model saves
    itself whole, as safetensors.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(info.to_json(), indent=1), encoding="utf-8")


def read_info(folder: Path) -> WeightsInfo:
    try:
        doc = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"the kept weights lack {MANIFEST}: not kept by this project") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the kept {MANIFEST}: {first_line(e)}") from None
    return WeightsInfo.from_json(doc)


def load_weights(folder: Path) -> Restored:
    """The model as it was at the run's best epoch, on the CPU, in eval mode.

    LoRA weights are put back onto a fresh copy of the base model, loaded exactly as training
    loaded it (`load_pretrained`); full weights are loaded as they are. The tokenizer is the base
    model's, as in training.
    """
    folder = Path(folder)
    info = read_info(folder)
    if info.mode == "lora":
        from peft import PeftModel

        base, tokenizer = load_pretrained(info.base_model, list(info.labels))
        try:
            model = PeftModel.from_pretrained(base, folder)
        except (OSError, ValueError, RuntimeError) as e:
            raise WeightsError(
                f"cannot put the kept adapter onto {info.base_model}: {first_line(e)}"
            ) from None
    elif info.mode == "full":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, attn_implementation="sdpa", dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(info.base_model)
        except (OSError, ValueError) as e:
            raise WeightsError(
                f"cannot load the kept model or its tokenizer: {first_line(e)}"
            ) from None
    else:
        raise WeightsError(f"{folder / MANIFEST}: unknown mode {info.mode!r}")
    model.eval()
    return Restored(model, tokenizer, info)


# ----------------------------------------------------------------------------- archives


def archive_folder(folder: Path, file: Path) -> None:
    """Put the files of `folder` (flat, no subfolders) into one uncompressed tar file.

    Uncompressed: weights are float tensors that gzip shrinks by a few percent at a high CPU cost.
    """
    with tarfile.open(file, "w") as tar:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)


def unarchive(source: IO[bytes], folder: Path) -> None:
    """Unpack a tar stream from `archive_folder` into the existing `folder`."""
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            tar.extractall(folder, filter="data")  # refuses absolute paths, `..` and links out
    except (tarfile.TarError, OSError) as e:
        raise WeightsError(f"the weights archive cannot be unpacked: {e}") from None


# ----------------------------------------------------------------------------- user folders


@contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dest`; it becomes `dest` when the block succeeds.

    On any error (or Ctrl-C) the temporary folder is removed and `dest` is as it was. With
    `replace`, an existing `dest` is swapped out only after the new one is complete.
    """
    dest = Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, not a system temp folder: the final rename then stays on one file system.
    tmp = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- export


def _local_or_hub(name: str) -> str:
    """An existing local folder as an absolute path (the export may be used from elsewhere)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def export_model(restored: Restored, folder: Path, merge: bool) -> None:
    """Write a folder that plain transformers (and peft, for an adapter) load without this project.

    LoRA without `merge`: the adapter (its config names the base model), the tokenizer and
    `classification_config.json`. With `merge`, or for a full fine-tuning run: the whole model
    (config.json with the label map), the tokenizer and the same `classification_config.json`, so
    one recipe loads both kinds. The tokenizer's `model_max_length` is the run's max length, so
    `tokenizer(text, truncation=True)` truncates as training did.
    """
    folder = Path(folder)
    model, info = restored.model, restored.info
    if info.mode == "lora" and not merge:
        model.peft_config["default"].base_model_name_or_path = _local_or_hub(info.base_model)
        model.save_pretrained(folder)
        base = model.get_base_model()
        config = base.config
        config.architectures = [type(base).__name__]  # the base's own may be a headless BertModel
    else:
        if info.mode == "lora":
            # merge_and_unload changes the model in place; merge a copy so `restored` stays usable
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.config.name_or_path = _local_or_hub(info.base_model)
        model.save_pretrained(folder)
        config = model.config
    config.to_json_file(folder / CLASSIFICATION_CONFIG)
    tokenizer = restored.tokenizer
    previous = tokenizer.model_max_length
    try:
        tokenizer.model_max_length = info.max_length
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.model_max_length = previous
