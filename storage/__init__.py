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

import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import optuna

from objectives.errors import UserError

DEFAULT_URL = "sqlite:///artifacts/optuna.db"
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30  # a resume started a minute after a kill -9 finds the trial stale already
SQLITE_TIMEOUT_S = 60  # wait this long for another worker's write lock instead of failing
SCHEMA_RACE_RETRIES = 5
OUTAGE_GRACE_S = 120.0  # a database outage a worker waits out (storage.resilient)
PG_CONNECT_TIMEOUT_S = 10  # libpq waits forever for an unreachable host; PyMySQL has 10 s
GRPC_CONNECT_TIMEOUT_S = 10.0
STORAGE_ENV = "STUDY_STORAGE"
EXIT_UNAVAILABLE = 75  # sysexits' EX_TEMPFAIL: try again later (here: rerun to resume)

_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "postgresql://user[:password]@host[:port]/database, "
    "mysql+pymysql://user[:password]@host[:port]/database, journal:path/to/file.log, "
    "grpc://host:port"
)


class StorageError(UserError):
    """A storage URL that cannot work: the message is meant for the user."""


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


def resolve_url(flag: str | None, config_file: str | None = None) -> str:
    """The storage URL: flag, else config file, else $STUDY_STORAGE, else the default.

    The environment comes last but one because it is ambient (a shell profile, a job's
    environment) while a flag or a config file is named for this one command.
    """
    return flag or config_file or os.environ.get(STORAGE_ENV) or DEFAULT_URL


@dataclass(frozen=True)
class ParsedUrl:
    kind: str  # "sqlite", "rdb", "journal" or "grpc"
    url: str  # what Optuna gets
    path: Path | None  # the file, for sqlite and journal


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs, errors, reports and notes."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, _, host = rest.rpartition("@")
    if ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def parse_url(url: str) -> ParsedUrl:
    """Check a storage URL without touching anything; say what to type when it is wrong."""
    bad = f"storage URL {redact(url)!r} is not valid"
    if url.startswith("journal:"):
        path = url[len("journal:") :]
        path = path[2:] if path.startswith("//") else path
        if not path:
            raise StorageError(f"{bad}: give a file, e.g. journal:artifacts/study.log")
        return ParsedUrl("journal", url, Path(path))
    if url.startswith("grpc:"):
        grpc_address(url)
        return ParsedUrl("grpc", url, None)
    if url.startswith("sqlite:") and not url.startswith("sqlite:///"):
        raise StorageError(f"{bad}: SQLite URLs look like sqlite:///path/to/file.db")
    if "://" not in url:
        raise StorageError(f"{bad}; use one of: {_FORMS}")
    scheme, rest = url.split("://", 1)
    dialect, _, driver = scheme.partition("+")
    if dialect == "sqlite":
        if driver or not rest.startswith("/") or rest == "/":
            raise StorageError(f"{bad}: SQLite URLs look like sqlite:///path/to/file.db")
        return ParsedUrl("sqlite", url, Path(rest[1:]))
    if dialect in ("postgres", "pgsql"):
        raise StorageError(f"{bad}: write postgresql://{rest.split('@')[-1]} (with 'postgresql')")
    if dialect == "postgresql":
        if driver not in ("", "psycopg"):
            raise StorageError(f"{bad}: use postgresql:// (the psycopg driver is installed)")
    elif dialect in ("mysql", "mariadb"):
        if driver != "pymysql":
            raise StorageError(
                f"{bad}: use mysql+pymysql://{rest.split('@')[-1]} (PyMySQL is installed)"
            )
    else:
        raise StorageError(f"{bad}: unknown scheme {scheme!r}; use one of: {_FORMS}")
    if not rest.split("@")[-1].split("/")[0]:
        raise StorageError(f"{bad}: no host given")
    return ParsedUrl("rdb", url, None)


def grpc_address(url: str) -> tuple[str, int]:
    """(host, port) of a ``grpc://host:port`` URL; StorageError when it is not one."""
    bad = (
        f"storage URL {url!r} is not valid: a storage proxy is grpc://HOST:PORT, e.g. "
        "grpc://127.0.0.1:13000 (served by `python -m study storage-proxy`)"
    )
    if not url.startswith("grpc://"):
        raise StorageError(bad)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise StorageError(bad) from None
    if not host or port is None or parts.path not in ("", "/") or parts.query or "@" in url:
        raise StorageError(bad)
    return host, port


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
    except (OSError, sqlite3.Error) as e:
        raise StorageError(f"cannot open storage {redact(url)}: {e}") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors carry the reason in the text
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open storage {redact(url)}: {scrub(reason, url)}") from None


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


def scrub(text: str, url: str) -> str:
    """`text` with the password of `url` (if any) replaced by ***."""
    creds = url.split("://", 1)[-1].rpartition("@")[0]
    password = creds.split(":", 1)[1] if ":" in creds else ""
    return text.replace(password, "***") if password else text


def describe_failure(exc: BaseException, url: str) -> str | None:
    """A one-line message when `exc` is the storage refusing to work (disk full, read-only,
    unreachable); None for anything else, which is then a bug and keeps its traceback."""
    import errno

    from sqlalchemy.exc import OperationalError

    grpc = sys.modules.get("grpc")  # loaded only where a grpc:// storage was opened
    if grpc is not None and isinstance(exc, grpc.RpcError):
        # the storage proxy went away, or its database call failed (details say which)
        code, details = exc.code(), (exc.details() or "").strip().splitlines()
        reason = f"{code.name if code else 'error'}: {details[0] if details else ''}"
        return f"storage {redact(url)} failed: {scrub(reason, url)}"
    if isinstance(exc, OperationalError | sqlite3.OperationalError):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        reason = exc.strerror or str(exc)
    else:
        return None
    return f"storage {redact(url)} failed: {scrub(reason, url)} (disk full or read-only?)"
