"""How many trials train on the same device of this machine at the same time (docs/methodology.md,
"Times under load"): each run registers a file in a folder per device under the temporary
directory and counts the other live ones; a dead process's file is recognised by its id and
removed.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

DIR_ENV = "STUDY_OCCUPANCY_DIR"  # where the registrations live (tests point it elsewhere)


def default_root() -> Path:
    given = os.environ.get(DIR_ENV)
    if given:
        return Path(given)
    uid = getattr(os, "getuid", lambda: 0)()
    return Path(tempfile.gettempdir()) / f"banking77-study-{uid}" / "occupancy"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Occupancy:
    """`with Occupancy("cuda:0") as occ: occ.others()` counts the other runs on cuda:0."""

    def __init__(self, device: str, root: Path | None = None) -> None:
        safe = "".join(c if c.isalnum() else "_" for c in device)
        self.dir = (root or default_root()) / safe
        self.path: Path | None = None

    def __enter__(self) -> Occupancy:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{os.getpid()}-{uuid.uuid4().hex}"
        self.path.touch()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def others(self) -> int:
        """Other live runs registered on this device now."""
        count = 0
        for entry in self.dir.iterdir():
            if entry == self.path:
                continue
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and _alive(int(pid_text)):
                count += 1
            else:
                entry.unlink(missing_ok=True)  # a dead run's leftover
        return count
