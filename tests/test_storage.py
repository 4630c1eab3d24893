"""Storage URLs: dispatch, clear errors for mistyped URLs, passwords never shown, the proxy."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from storage import StorageError, get_storage, grpc_address, parse_url, redact, scrub


@pytest.mark.parametrize(
    "url, kind",
    [
        ("sqlite:///artifacts/optuna.db", "sqlite"),
        ("sqlite:////tmp/x.db", "sqlite"),
        ("postgresql://user@localhost/test", "rdb"),
        ("postgresql+psycopg://user:pw@localhost:5432/test", "rdb"),
        ("mysql+pymysql://root@127.0.0.1/test", "rdb"),
        ("journal:artifacts/study.log", "journal"),
        ("grpc://127.0.0.1:13000", "grpc"),
        ("grpc://proxyhost:13000/", "grpc"),
        ("grpc://[::1]:13000", "grpc"),
        ("mysql+pymysql://study@db/optuna?read_default_file=~/.my.cnf", "rdb"),
    ],
)
def test_valid_urls(url: str, kind: str) -> None:
    assert parse_url(url).kind == kind


@pytest.mark.parametrize(
    "url, hint",
    [
        ("postgres://user@localhost/test", "postgresql://"),
        ("mysql://root@localhost/test", "mysql\\+pymysql://"),
        ("sqlite:/tmp/x.db", "sqlite:///"),
        ("sqlite://", "sqlite:///"),
        ("artifacts/optuna.db", "sqlite:///relative/path.db"),
        ("mongodb://host/db", "unknown scheme"),
        ("postgresql:///test", "no host"),
        ("journal:", "journal:artifacts/study.log"),
        ("grpc://127.0.0.1", "grpc://HOST:PORT"),
        ("grpc://127.0.0.1:port", "grpc://HOST:PORT"),
        ("grpc://:13000", "grpc://HOST:PORT"),
        ("grpc://127.0.0.1:13000/study", "grpc://HOST:PORT"),
        ("grpc:127.0.0.1:13000", "grpc://HOST:PORT"),
    ],
)
def test_mistyped_urls_say_what_to_type(url: str, hint: str) -> None:
    with pytest.raises(StorageError, match=hint):
        parse_url(url)


def test_passwords_are_redacted() -> None:
    url = "postgresql://alice:s3cret@db.example/optuna"
    assert redact(url) == "postgresql://alice:***@db.example/optuna"
    assert "s3cret" not in redact(url)
    assert redact("sqlite:///a.db") == "sqlite:///a.db"
    assert scrub(f"could not connect to {url}", url) == (
        "could not connect to postgresql://alice:***@db.example/optuna"
    )
    with pytest.raises(StorageError) as e:
        parse_url("postgres://alice:s3cret@db.example/optuna")
    assert "s3cret" not in str(e.value)


def test_sqlite_default_folder_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/sub/dir/o.db"
    storage = get_storage(url)
    optuna.create_study(storage=storage, study_name="s")
    assert (tmp_path / "sub/dir/o.db").exists()
    assert optuna.load_study(study_name="s", storage=url).study_name == "s"


def test_journal_storage(tmp_path: Path) -> None:
    storage = get_storage(f"journal:{tmp_path}/j/study.log")
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: 1.0, n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 2


def test_unreachable_database_is_one_clear_error() -> None:
    with pytest.raises(StorageError, match="cannot open storage postgresql://u:\\*\\*\\*@"):
        get_storage("postgresql://u:pw@127.0.0.1:1/none")


def test_grpc_address() -> None:
    assert grpc_address("grpc://proxyhost:13000") == ("proxyhost", 13000)
    assert grpc_address("grpc://[::1]:13001") == ("::1", 13001)


def test_no_proxy_at_a_grpc_url_is_one_clear_error(monkeypatch) -> None:
    import socket

    import storage

    monkeypatch.setattr(storage, "GRPC_CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StorageError) as e:
        get_storage(f"grpc://127.0.0.1:{port}")
    assert str(e.value) == (
        f"cannot open storage grpc://127.0.0.1:{port}: no storage proxy answers there; start one "
        f"with `python -m study storage-proxy --storage URL --port {port}`"
    )


@pytest.mark.parametrize(
    "url, message",
    [
        ("journal:x.log", "cannot serve a journal file"),
        ("grpc://127.0.0.1:13000", "must be a database, not another proxy"),
        ("postgres://u@h/db", "write postgresql://"),
    ],
)
def test_storage_proxy_refuses_what_it_cannot_serve(url: str, message: str, capsys) -> None:
    from study.cli import main

    assert main(["storage-proxy", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_storage_proxy_warns_off_loopback() -> None:
    from study.dashboard import exposure_warning
    from study.proxy import LACKS

    assert exposure_warning("127.0.0.1", LACKS) is None and exposure_warning("::1", LACKS) is None
    assert "no authentication or encryption" in exposure_warning("0.0.0.0", LACKS)
