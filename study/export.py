"""`export`: a kept trial as a standalone Hugging Face folder, with a model card.

The folder loads with `AutoModelForSequenceClassification.from_pretrained` (LoRA adapters through
transformers' peft integration, or merged into the base model with `--merge`); `trial.json`
says where it came from and `README.md` is its model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from optuna.trial import FrozenTrial

from objectives.record import TrialRecord
from objectives.weights import Restored, atomic_folder, export_model
from study.restore import WinnersError, restore_trial, trial_summary
from study.terminal import cell


def export_trial(
    storage_url: str,
    store_dir: str | Path | None,
    study_name: str,
    which: str,
    out: Path,
    merge: bool,
) -> tuple[str, FrozenTrial, Restored]:
    """Write `out` as a standalone Hugging Face folder (`objectives.weights.export_model`)."""
    out = Path(out)
    if out.exists():
        raise WinnersError(f"{out} already exists; choose another --out (nothing was written)")
    name, trial, restored = restore_trial(storage_url, store_dir, study_name, which)
    try:
        with atomic_folder(out) as tmp:
            export_model(restored, tmp, merge)
            summary = {
                **trial_summary(name, trial),
                "merged": merge or restored.info.mode == "full",
            }
            (tmp / "trial.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
            # replaces peft's empty model-card template with what this folder is and how to load it
            card = model_card(name, trial, restored, adapter=not summary["merged"], folder=out)
            (tmp / "README.md").write_text(card, encoding="utf-8")
    except FileExistsError:
        raise WinnersError(
            f"{out} already exists; choose another --out (nothing was written)"
        ) from None
    return name, trial, restored


def model_card(
    study_name: str, trial: FrozenTrial, restored: Restored, adapter: bool, folder: Path
) -> str:
    """A short Hugging Face model card: origin, scores, and the lines that load the folder."""
    info, r = restored.info, TrialRecord.from_trial(trial, study_name)
    how = f"LoRA (rank {trial.params['lora_r']})" if "lora_r" in trial.params else "LoRA"
    how = how if info.mode == "lora" else "full fine-tuning"
    merged = " merged into the base model" if info.mode == "lora" and not adapter else ""

    params = ", ".join(f"`{k}` = {v}" for k, v in trial.params.items())
    return f"""---
base_model: {info.base_model}
library_name: {"peft" if adapter else "transformers"}
pipeline_tag: text-classification
tags: [text-classification, {"lora" if info.mode == "lora" else "full-fine-tuning"}, optuna]
---

# {study_name}, trial {trial.number}

An intent classifier ({len(info.labels)} intents) trained from `{info.base_model}` with
{how}{merged}, best epoch {r.best_epoch}; parameters: {params}.
Texts are truncated to {info.max_length} tokens, as in training.

| split | macro-F1 | accuracy |
| --- | --- | --- |
| validation | {cell(r.val_f1, ".4f")} | {cell(r.val_accuracy, ".4f")} |
| test | {cell(r.test_f1, ".4f")} | {cell(r.test_accuracy, ".4f")} |

```python
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
config = AutoConfig.from_pretrained("{folder}/classification_config.json")  # with the labels
model = AutoModelForSequenceClassification.from_pretrained("{folder}", config=config)
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```
""" + (
        "\nThe adapter is put onto its base model by transformers' peft integration "
        "(`pip install peft`).\n"
        if adapter
        else ""
    )
