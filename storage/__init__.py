"""The single entry to Optuna storages: `get_storage(url)`.

- SQLite (default ``sqlite:///artifacts/optuna.db``): the folder is created; the database is put
  in WAL mode so a dashboard reading it does not block a worker writing it.
- PostgreSQL (``postgresql://user@host/db``) and MySQL/MariaDB (``mysql+pymysql://user@host/db``)
  pass through to Optuna's RDB storage: the way to share one study between machines.
- A journal file (``journal:path/to/study.log``) for several local workers without a database.
- Optuna's gRPC storage proxy (``grpc://host:port``, served by `python -m study storage-proxy`):
  one process holds the database connections for tens to hundreds of workers.

RDB storages get a heartbeat, so a trial whose worker was killed is marked FAIL and retried
with the same parameters by the next worker that starts or finishes a trial. PostgreSQL and
MySQL storages wait out a database outage (`storage.resilient`).

Where the URL comes from (`resolve_url`): the `--storage` flag, else the `storage` key of the
`--config` file, else the environment variable STUDY_STORAGE, else the default. A URL without a
password leaves the password to the driver: libpq's PGPASSWORD or ~/.pgpass for PostgreSQL, a
MySQL option file named by ``?read_default_file=~/.my.cnf`` for PyMySQL.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from objectives.errors import first_line
from storage.outage import EXIT_UNAVAILABLE, OUTAGE_GRACE_S, StorageUnavailable, unavailable_in
from storage.urls import (
    DEFAULT_URL,
    STORAGE_ENV,
    StorageError,
    grpc_address,
    parse_url,
    redact,
    resolve_url,
    scrub,
)

# The single entry: everything a caller needs is importable from `storage`.
__all__ = [
    "DEFAULT_URL",
    "EXIT_UNAVAILABLE",
    "OUTAGE_GRACE_S",
    "STORAGE_ENV",
    "Heartbeat",
    "StorageError",
    "StorageUnavailable",
    "describe_failure",
    "get_storage",
    "grpc_address",
    "parse_url",
    "redact",
    "resolve_url",
    "scrub",
    "unavailable_in",
]

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30  # a resume started a minute after a kill -9 finds the trial stale already
SQLITE_TIMEOUT_S = 60  # wait this long for another worker's write lock instead of failing
SCHEMA_RACE_RETRIES = 5
PG_CONNECT_TIMEOUT_S = 10  # libpq waits forever for an unreachable host; PyMySQL has 10 s
GRPC_CONNECT_TIMEOUT_S = 10.0
# Below this much free space SQLite cannot count on writing its WAL and shared-memory files
MIN_FREE_BYTES = 1 << 20


@dataclass(frozen=True)
class Heartbeat:
    """How a worker stays known to be alive, and how long it waits for a lost database."""

    interval_s: int = HEARTBEAT_INTERVAL_S
    grace_period_s: int = GRACE_PERIOD_S
    outage_grace_s: float = OUTAGE_GRACE_S


def _rdb(
    url: str,
    heartbeat: Heartbeat | None,
    engine_kwargs: dict | None = None,
    outage_grace_s: float | None = None,
    wait: bool = False,
) -> optuna.storages.RDBStorage:
    kwargs = {}
    if heartbeat is not None:
        kwargs = dict(
            heartbeat_interval=heartbeat.interval_s,
            grace_period=heartbeat.grace_period_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=3
            ),
        )
    make = optuna.storages.RDBStorage
    if outage_grace_s is not None:  # a database server: wait out its outages
        from storage.resilient import ResilientRDBStorage, open_waiting

        make = ResilientRDBStorage
        kwargs["outage_grace_s"] = outage_grace_s
        if wait:
            return open_waiting(
                lambda: _rdb(url, heartbeat, engine_kwargs, outage_grace_s), url, outage_grace_s
            )
    for attempt in range(SCHEMA_RACE_RETRIES):
        try:
            return make(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the schema race
            # Workers starting together on an empty database all try to create Optuna's
            # tables and version row; the losers see "already exists" or a duplicate key.
            race = any(m in str(e).lower() for m in ("already exists", "duplicate", "unique"))
            if not race or attempt == SCHEMA_RACE_RETRIES - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def get_storage(
    url: str = DEFAULT_URL,
    heartbeat: Heartbeat | None = Heartbeat(),
    create: bool = True,
    outage_grace_s: float | None = None,
    wait: bool = False,
) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`; raises StorageError with a one-line reason.

    `heartbeat=None` turns the heartbeat off (readers need none). With `create=False` (readers:
    report, dashboard) a missing SQLite or journal file is an error instead of a new empty storage.
    A PostgreSQL or MySQL storage waits out an outage of `outage_grace_s` seconds (default: the
    heartbeat's, else OUTAGE_GRACE_S). Opening it waits only with `wait=True`, for processes
    re-opening a storage that worked (workers); a command that starts while its database is not
    there (a mistyped host, a stopped server) stops at once.
    """
    parsed = parse_url(url)
    if not create and parsed.path is not None and not parsed.path.is_file():
        raise StorageError(f"no storage at {parsed.path}: run `python -m study optimize` first")
    if parsed.kind == "grpc":
        return _grpc(url)
    if outage_grace_s is None:
        outage_grace_s = heartbeat.outage_grace_s if heartbeat is not None else OUTAGE_GRACE_S
    try:
        if parsed.kind == "journal":
            parsed.path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(parsed.path)))
        if parsed.kind == "sqlite":
            parsed.path.parent.mkdir(parents=True, exist_ok=True)
            if not parsed.path.exists():
                # WAL is a property of the file: readers (the dashboard) no longer block writers.
                # Only new files: an existing storage is never changed before input is checked.
                with sqlite3.connect(parsed.path, timeout=SQLITE_TIMEOUT_S) as con:
                    con.execute("PRAGMA journal_mode=WAL")
            # No implicit transactions from the driver: each one begins IMMEDIATE (below).
            args = {"timeout": SQLITE_TIMEOUT_S, "isolation_level": None}
            return _locked_transactions(_rdb(url, heartbeat, {"connect_args": args}))
        # pool_pre_ping: a pooled connection that died with the server is replaced before use
        engine_kwargs: dict = {"pool_pre_ping": True}
        if url.startswith("postgresql") and "connect_timeout" not in url:
            engine_kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return _rdb(url, heartbeat, engine_kwargs, outage_grace_s, wait)
    except (StorageError, StorageUnavailable):
        raise
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors carry the reason in the text
        reason = scrub(first_line(e), url)
        if parsed.kind == "sqlite":
            # SQLite says only "unable to open database file" or "disk I/O error"
            refusal = file_system_refusal(parsed.path.parent)
            reason = f"{reason}: {refusal}" if refusal else reason
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from None


def file_system_refusal(folder: Path) -> str | None:
    """The operating system's reason files in `folder` cannot be written, where its file system
    tells: read-only, or no space left. None where it tells neither."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no such folder; no statvfs on this system
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return f"{os.strerror(errno.EROFS)} ({folder})"
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        return f"{os.strerror(errno.ENOSPC)} ({folder}: {free} bytes free)"
    return None


def _locked_transactions(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Every SQLite transaction of `storage` takes the write lock when it begins.

    Optuna reads a row "for update" before changing it (a queued trial is taken by setting it
    from WAITING to RUNNING only if it is still WAITING). SQLite has no row locks, and the
    driver would run that read outside any transaction, so two processes could both take the
    same queued trial and train it twice. BEGIN IMMEDIATE makes the read and the write one
    locked transaction (SQLAlchemy's recipe for pysqlite); WAL readers outside it still read.
    """
    import sqlalchemy

    sqlalchemy.event.listen(
        storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE")
    )
    return storage


def _grpc(url: str) -> optuna.storages.BaseStorage:
    host, port = grpc_address(url)
    try:
        from optuna.storages import GrpcStorageProxy

        # IPv6 literals need their brackets back in gRPC's "host:port" target
        proxy = GrpcStorageProxy(host=f"[{host}]" if ":" in host else host, port=port)
        proxy.wait_server_ready(timeout=GRPC_CONNECT_TIMEOUT_S)
    except ImportError as e:
        raise StorageError(
            f"grpc:// storages need grpcio and protobuf ({e}); pip install -r requirements.txt"
        ) from None
    except ConnectionError:
        proxy.close()
        raise StorageError(
            f"cannot open storage {url}: no storage proxy answers there; start one with "
            f"`python -m study storage-proxy --storage URL --port {port}`"
        ) from None
    return proxy


def describe_failure(exc: BaseException, url: str) -> str | None:
    """A one-line message when `exc` is the storage refusing to work (disk full, read-only,
    unreachable); None for anything else, which is then a bug and keeps its traceback."""
    from sqlalchemy.exc import OperationalError

    grpc = sys.modules.get("grpc")  # loaded only where a grpc:// storage was opened
    if grpc is not None and isinstance(exc, grpc.RpcError):
        # the storage proxy went away, or its database call failed (details say which)
        code, details = exc.code(), (exc.details() or "").strip().splitlines()
        reason = f"{code.name if code else 'error'}: {details[0] if details else ''}"
        return f"storage {redact(url)} failed: {scrub(reason, url)}"
    if isinstance(exc, OperationalError | sqlite3.OperationalError):
        reason = first_line(getattr(exc, "orig", None) or exc)
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        reason = exc.strerror or str(exc)
    else:
        return None
    path = parse_url(url).path if url.startswith("sqlite:") else None  # checked when opened
    refusal = file_system_refusal(path.parent) if path is not None else None
    hint = f": {refusal}" if refusal else " (disk full or read-only?)"
    return f"storage {redact(url)} failed: {scrub(reason, url)}{hint}"
