"""A database that stays away: how long a worker waits, what it raises, how the CLI exits.

The waiting itself is `storage.resilient`; these names are what the rest of the code needs
without importing SQLAlchemy.
"""

from __future__ import annotations

OUTAGE_GRACE_S = 120.0  # a database outage a worker waits out (storage.resilient)
EXIT_UNAVAILABLE = 75  # sysexits' EX_TEMPFAIL: try again later (here: rerun to resume)


class StorageUnavailable(RuntimeError):
    """The database stayed unreachable longer than the outage grace: the message names it."""


def unavailable_in(exc: BaseException) -> StorageUnavailable | None:
    """The StorageUnavailable behind `exc`, if any: Optuna may raise another error while it
    handles one (it reads the trial to log it), so the whole chain is searched."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StorageUnavailable):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
