"""Keep the winners' weights in Optuna's artifact store as trials finish: archived by
`objectives.weights`, uploaded with `optuna.artifacts.upload_artifact` and named by the trial's
`artifact_id`; `--keep` and `--keep-top` choose which (docs/usage.md, "Keeping and using the
winners"). Where the store lives: `storage.artifacts`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from objectives.config import TrainConfig
from objectives.data import IntentData
from objectives.record import Attr, rank_key
from objectives.train import TrainResult
from objectives.weights import WeightsInfo, archive_folder, save_weights
from storage.artifacts import artifact_dir, open_store
from study.config import StudyConfig

if TYPE_CHECKING:
    from objectives.objective import RunContext
    from study.prepare import Prepared


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
    return [number for number, _ in sorted(scores, key=lambda s: rank_key(*s))]


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
                if Attr.ARTIFACT_ID in t.user_attrs and t.number != trial.number
            ]
            scores = [(t.number, t.value) for t in kept] + [(trial.number, result.val_f1)]
            top = set(ranked_for_keeping(scores)[: self.keep_top])
            if trial.number not in top:
                return
            dropped = [t for t in kept if t.number not in top]
        store = open_store(self.store_dir)
        # Upload first, remove second: an interruption in between keeps one archive too many,
        # never one too few.
        trial.set_user_attr(Attr.ARTIFACT_ID, self._upload(store, trial, model, cfg))
        for t in dropped:
            try:
                store.remove(t.user_attrs[Attr.ARTIFACT_ID])
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
