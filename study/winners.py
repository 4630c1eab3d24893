"""Keep the winners' weights in Optuna's artifact store, find them again, export them.

Every COMPLETE trial of `optimize` and `baseline` may hand its best epoch's weights to a
`WeightKeeper` before it ends. The keeper archives them (`objectives.weights`) and uploads the
archive with `optuna.artifacts.upload_artifact`, so the trial's artifact list (and
optuna-dashboard, given the same `--artifact-dir`) shows it; the trial's `artifact_id` user
attribute names it, and its `labels` attribute is the label map (id = position). `--keep`
decides which LoRA trials keep weights: `all`, `best` (the current top `--keep-top` by validation
F1; a trial that drops out has its archive removed from the store) or `none`. The baseline always
keeps its weights.

The store is a folder: by default `weights/` beside a SQLite or journal file (so
`artifacts/weights` for the default storage), else `artifacts/weights`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from objectives.config import TrainConfig
from objectives.data import IntentData
from objectives.errors import UserError
from objectives.train import TrainResult
from objectives.weights import (
    Restored,
    WeightsInfo,
    archive_folder,
    atomic_folder,
    export_model,
    load_weights,
    save_weights,
    unarchive,
)
from storage import get_storage, parse_url
from study import recipe
from study.config import BASELINE_SUFFIX, StudyConfig
from study.table import best_trials

if TYPE_CHECKING:
    from objectives.objective import RunContext
    from study.prepare import Prepared

ARTIFACT_ATTR = "artifact_id"
STORE_FOLDER = "weights"
DEFAULT_STORE = Path("artifacts") / STORE_FOLDER


class WinnersError(UserError):
    """A trial's weights cannot be found or used as asked: the message is meant for the user."""


# ----------------------------------------------------------------------------- the store


def default_artifact_dir(storage_url: str) -> Path:
    """`weights/` beside a SQLite or journal file; `artifacts/weights` for database servers.

    Beside the file, so a study kept elsewhere (a test, another project folder) keeps its weights
    with it, and the default storage gives `artifacts/weights`.
    """
    path = parse_url(storage_url).path
    return path.parent / STORE_FOLDER if path is not None else DEFAULT_STORE


def artifact_dir(given: str | Path | None, storage_url: str) -> Path:
    return Path(given) if given else default_artifact_dir(storage_url)


def open_store(folder: Path) -> FileSystemArtifactStore:
    """The artifact store in `folder`, created on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(folder)


# ----------------------------------------------------------------------------- keeping


def heldout_fingerprint(data: IntentData) -> str:
    """A hash of what evaluation reads: label names, validation and test split.

    Unlike `IntentData.fingerprint` it leaves out the training split, which `--max-train-samples`
    changes; evaluation needs only the data the trial's metrics were measured on.
    """
    heldout = replace(data, train=replace(data.train, texts=[], labels=data.train.labels[:0]))
    return heldout.fingerprint


def ranked_for_keeping(scores: Sequence[tuple[int, float]]) -> list[int]:
    """Trial numbers best first by validation F1; on a tie the earlier trial ranks higher, so a
    newcomer never pushes out an equally good trial already kept."""
    return [number for number, _ in sorted(scores, key=lambda s: (-s[1], s[0]))]


@dataclass(frozen=True)
class WeightKeeper:
    """The `RunContext.keep_weights` hook: keeps a finishing trial's weights per the policy."""

    store_dir: Path
    base_model: str  # Hub id or folder the trials start from (LoRA weights reload onto it)
    keep: str  # "all", "best" or "none"
    keep_top: int  # K of "best"
    max_length: int
    heldout_fingerprint: str

    def __call__(
        self, trial: optuna.Trial, model: nn.Module, cfg: TrainConfig, result: TrainResult
    ) -> None:
        if self.keep == "none":
            return
        dropped: list[FrozenTrial] = []
        if self.keep == "best":
            # Finished trials cannot be changed, so a trial whose archive was removed still names
            # it; it ranks below the top K for good (the K-th best F1 only rises), and removing
            # it again is a no-op.
            kept = [
                t
                for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if ARTIFACT_ATTR in t.user_attrs and t.number != trial.number
            ]
            scores = [(t.number, t.value) for t in kept] + [(trial.number, result.val_f1)]
            top = set(ranked_for_keeping(scores)[: self.keep_top])
            if trial.number not in top:
                return
            dropped = [t for t in kept if t.number not in top]
        store = open_store(self.store_dir)
        # Upload first, remove second: an interruption in between keeps one archive too many,
        # never one too few.
        trial.set_user_attr(ARTIFACT_ATTR, self._upload(store, trial, model, cfg))
        for t in dropped:
            try:
                store.remove(t.user_attrs[ARTIFACT_ATTR])
            except ArtifactNotFound:
                pass  # removed already, by another worker or by hand

    def _upload(
        self,
        store: FileSystemArtifactStore,
        trial: optuna.Trial,
        model: nn.Module,
        cfg: TrainConfig,
    ) -> str:
        study_name = trial.study.study_name
        labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
        info = WeightsInfo(
            mode=cfg.mode,
            base_model=self.base_model,
            labels=labels,
            max_length=self.max_length,
            mixed_precision=cfg.mixed_precision,
            heldout_fingerprint=self.heldout_fingerprint,
            study=study_name,
            trial=trial.number,
        )
        # Staged inside the store's folder: a full model is hundreds of MB, and the system's
        # temp folder may be small; the store lists artifacts from the storage, not the folder.
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=self.store_dir) as tmp:
            folder = Path(tmp) / "weights"
            folder.mkdir()
            save_weights(model, folder, info)
            file = Path(tmp) / f"{study_name}-trial-{trial.number}-weights.tar"
            archive_folder(folder, file)
            return upload_artifact(
                artifact_store=store,
                file_path=str(file),
                study_or_trial=trial,
                mimetype="application/x-tar",
            )


def keeping_weights(prep: Prepared, cfg: StudyConfig, always: bool = False) -> RunContext:
    """`prep.ctx` with a `WeightKeeper` for `cfg`; `always` (the baseline) keeps every trial."""
    keeper = WeightKeeper(
        store_dir=artifact_dir(cfg.artifact_dir, cfg.storage),
        base_model=prep.ctx.model_name,
        keep="all" if always else cfg.keep,
        keep_top=cfg.keep_top,
        max_length=cfg.max_length,
        heldout_fingerprint=heldout_fingerprint(prep.data),
    )
    return replace(prep.ctx, keep_weights=keeper)


# ----------------------------------------------------------------------------- finding


def parse_trial_ref(which: str) -> str | int:
    if which in ("best", "baseline"):
        return which
    try:
        number = int(which)
    except ValueError:
        number = -1
    if number < 0:
        raise WinnersError(f"--trial must be a trial number, best or baseline, not {which!r}")
    return number


def find_trial(
    storage: optuna.storages.BaseStorage, study_name: str, which: str
) -> tuple[str, FrozenTrial]:
    """(study name, COMPLETE trial) for `--trial N|best|baseline`, or a WinnersError."""
    ref = parse_trial_ref(which)
    name = study_name + BASELINE_SUFFIX if ref == "baseline" else study_name
    names = optuna.get_all_study_names(storage)
    if name not in names:
        what = "no baseline study" if ref == "baseline" else "no study"
        raise WinnersError(
            f"{what} named {name!r} in this storage; it has: {', '.join(names) or 'no studies'}"
        )
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    if isinstance(ref, int):
        match = [t for t in trials if t.number == ref]
        if not match:
            raise WinnersError(f"study {name!r} has no trial {ref} (it has 0..{len(trials) - 1})")
        trial = match[0]
        if trial.state != TrialState.COMPLETE:
            reason = trial.user_attrs.get("fail_reason")
            raise WinnersError(
                f"trial {ref} of study {name!r} is {trial.state.name}"
                + (f" ({reason})" if reason else "")
                + ": only COMPLETE trials keep weights"
            )
        return name, trial
    best = best_trials(trials, 1)  # of a baseline study: the fixed run, never a neighbour
    if not best:
        raise WinnersError(f"study {name!r} has no COMPLETE trial yet")
    return name, best[0]


def fetch_weights(store_dir: Path, study_name: str, trial: FrozenTrial, folder: Path) -> None:
    """Unpack `trial`'s archive from the store into the existing `folder`."""
    artifact_id = trial.user_attrs.get(ARTIFACT_ATTR)
    label = f"trial {trial.number} of study {study_name!r}"
    if not artifact_id:
        raise WinnersError(
            f"{label} kept no weights (run with --keep none, not in the --keep-top best when it "
            "ended, or run before weights were kept)"
        )
    try:
        reader = FileSystemArtifactStore(store_dir).open_reader(artifact_id)
    except ArtifactNotFound:
        raise WinnersError(
            f"the weights of {label} (artifact {artifact_id}) are not in the artifact store "
            f"{store_dir}: deleted, or removed when the trial dropped out of the --keep-top "
            "best; pass --artifact-dir if the store is elsewhere"
        ) from None
    with reader:
        unarchive(reader, folder)


def restore_trial(
    storage_url: str, store_dir: str | Path | None, study_name: str, which: str
) -> tuple[str, FrozenTrial, Restored]:
    """(study name, trial, its model at the best epoch) for `--trial N|best|baseline`."""
    storage = get_storage(storage_url, heartbeat=None, create=False)
    name, trial = find_trial(storage, study_name, which)
    if store_dir is None:  # the store the study was made with (its recipe), else the default
        made_with = recipe.load(storage_url, study_name) or recipe.load(storage_url, name)
        store_dir = made_with.get("artifact_dir")
    with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
        fetch_weights(artifact_dir(store_dir, storage_url), name, trial, Path(tmp))
        restored = load_weights(Path(tmp))
    return name, trial, restored


def trial_summary(study_name: str, trial: FrozenTrial) -> dict[str, Any]:
    """Where an evaluation or export came from, for the files written beside it."""
    attrs = trial.user_attrs
    return {
        "study": study_name,
        "trial": trial.number,
        "params": trial.params,
        **{k: attrs.get(k) for k in ("mode", "model", "best_epoch", "val_f1", "test_f1")},
        ARTIFACT_ATTR: attrs.get(ARTIFACT_ATTR),
    }


# ----------------------------------------------------------------------------- export


def export_trial(
    storage_url: str,
    store_dir: str | Path | None,
    study_name: str,
    which: str,
    out: Path,
    merge: bool,
) -> tuple[str, FrozenTrial, Restored]:
    """Write `out` as a standalone Hugging Face folder (`objectives.weights.export_model`)."""
    import json

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
    info, attrs = restored.info, trial.user_attrs
    how = f"LoRA (rank {trial.params['lora_r']})" if "lora_r" in trial.params else "LoRA"
    how = how if info.mode == "lora" else "full fine-tuning"
    merged = " merged into the base model" if info.mode == "lora" and not adapter else ""

    def score(key: str) -> str:
        value = attrs.get(key)
        return "-" if value is None else f"{value:.4f}"

    params = ", ".join(f"`{k}` = {v}" for k, v in trial.params.items())
    return f"""---
base_model: {info.base_model}
library_name: {"peft" if adapter else "transformers"}
pipeline_tag: text-classification
tags: [text-classification, {"lora" if info.mode == "lora" else "full-fine-tuning"}, optuna]
---

# {study_name}, trial {trial.number}

An intent classifier ({len(info.labels)} intents) trained from `{info.base_model}` with
{how}{merged}, best epoch {attrs.get("best_epoch")}; parameters: {params}.
Texts are truncated to {info.max_length} tokens, as in training.

| split | macro-F1 | accuracy |
| --- | --- | --- |
| validation | {score("val_f1")} | {score("val_accuracy")} |
| test | {score("test_f1")} | {score("test_accuracy")} |

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
