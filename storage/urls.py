"""Storage URLs: where the URL comes from, checking it without touching anything, redaction.

`parse_url` says what to type when a URL is wrong; `redact` and `scrub` keep passwords out of
logs, errors, reports and notes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from objectives.errors import UserError

DEFAULT_URL = "sqlite:///artifacts/optuna.db"
STORAGE_ENV = "STUDY_STORAGE"

_FORMS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "postgresql://user[:password]@host[:port]/database, "
    "mysql+pymysql://user[:password]@host[:port]/database, journal:path/to/file.log, "
    "grpc://host:port"
)


class StorageError(UserError):
    """A storage URL that cannot work: the message is meant for the user."""


def resolve_url(flag: str | None, config_file: str | None = None) -> str:
    """The storage URL: flag, else config file, else $STUDY_STORAGE, else the default.

    The environment comes last but one because it is ambient (a shell profile, a job's
    environment) while a flag or a config file is named for this one command.
    """
    return flag or config_file or os.environ.get(STORAGE_ENV) or DEFAULT_URL


@dataclass(frozen=True)
class ParsedUrl:
    kind: str  # "sqlite", "rdb", "journal" or "grpc"
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
        return ParsedUrl("journal", Path(path))
    if url.startswith("grpc:"):
        grpc_address(url)
        return ParsedUrl("grpc", None)
    if url.startswith("sqlite:") and not url.startswith("sqlite:///"):
        raise StorageError(f"{bad}: SQLite URLs look like sqlite:///path/to/file.db")
    if "://" not in url:
        raise StorageError(f"{bad}; use one of: {_FORMS}")
    scheme, rest = url.split("://", 1)
    dialect, _, driver = scheme.partition("+")
    if dialect == "sqlite":
        if driver or not rest.startswith("/") or rest == "/":
            raise StorageError(f"{bad}: SQLite URLs look like sqlite:///path/to/file.db")
        return ParsedUrl("sqlite", Path(rest[1:]))
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
    return ParsedUrl("rdb", None)


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


def scrub(text: str, url: str) -> str:
    """`text` with the password of `url` (if any) replaced by ***."""
    creds = url.split("://", 1)[-1].rpartition("@")[0]
    password = creds.split(":", 1)[1] if ":" in creds else ""
    return text.replace(password, "***") if password else text
