"""Where a study keeps its trials' weights: the artifact store's folder, and opening it.

The store is a folder holding Optuna's `FileSystemArtifactStore`: by default `weights/` beside a
SQLite or journal file (so `artifacts/weights` for the default storage), else `artifacts/weights`
for database servers. A study records the folder it was made with (`study.recipe`), so later
commands find the store from the storage alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore

from storage.urls import parse_url

STORE_FOLDER = "weights"
DEFAULT_STORE = Path("artifacts") / STORE_FOLDER


def default_artifact_dir(storage_url: str) -> Path:
    """`weights/` beside a SQLite or journal file; `artifacts/weights` for database servers.

    Beside the file, so a study kept elsewhere (a test, another project folder) keeps its weights
    with it, and the default storage gives `artifacts/weights`.
    """
    path = parse_url(storage_url).path
    return path.parent / STORE_FOLDER if path is not None else DEFAULT_STORE


def artifact_dir(given: str | Path | None, storage_url: str, recorded: Iterable[str] = ()) -> Path:
    """The store's folder: `given` (--artifact-dir), else the one the studies recorded when they
    agree on one, else the default for the storage."""
    if given:
        return Path(given)
    known = {r for r in recorded if isinstance(r, str) and r}
    return Path(known.pop()) if len(known) == 1 else default_artifact_dir(storage_url)


def open_store(folder: Path) -> FileSystemArtifactStore:
    """The artifact store in `folder`, created on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(folder)
