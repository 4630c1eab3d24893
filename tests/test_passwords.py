"""Passwords stay off the command line: where the storage URL comes from, and runs whose
password never appears in their arguments (`ps` shows every user the command line).

The URL comes from --storage, else the --config file's `storage`, else STUDY_STORAGE; a URL
without a password leaves it to the driver: PGPASSWORD or ~/.pgpass for PostgreSQL (libpq), a
MySQL option file (``?read_default_file=...``) for PyMySQL. The PostgreSQL tests run on a
cluster of their own that requires passwords, so the password the driver sends is checked.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import require
from optuna.trial import TrialState
from servers import delete_studies, reachable_url

from study.cli import main

# With pytest-xdist every test on the shared database servers runs in one worker, one at a
# time: test_outage restarts those servers.
pytestmark = pytest.mark.usefixtures("databases_one_at_a_time")


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "flag, in_file, in_env, chosen",
    [
        ("flag.db", "file.db", "env.db", "flag.db"),
        (None, "file.db", "env.db", "file.db"),
        (None, None, "env.db", "env.db"),
    ],
)
def test_storage_precedence_flag_file_environment(
    tmp_path: Path, monkeypatch, capsys, flag, in_file, in_env, chosen
) -> None:
    """Seen through the error of a storage that does not exist: it names the one chosen."""
    monkeypatch.setenv("STUDY_STORAGE", f"sqlite:///{tmp_path}/{in_env}")
    config = tmp_path / "run.toml"
    config.write_text(f'storage = "sqlite:///{tmp_path}/{in_file}"\n' if in_file else "")
    args = ["report", "--config", str(config)]
    if flag:
        args += ["--storage", f"sqlite:///{tmp_path}/{flag}"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no storage at {tmp_path}/{chosen}: run `python -m study optimize` first"
    )


def run_and_read_argv(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    """Run `cmd`; returns the process, its stderr and its argv as other users see it
    (/proc/PID/cmdline, which `ps` reads), read while it runs."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    out, err = proc.communicate(timeout=600)
    return proc, out + err, argv


def optimize_args(model: Path, data: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "study", "optimize", "--model", str(model), "--data-dir", str(data),
        "--study-name", name, "--device", "cpu", "--no-progress", "--epochs", "1",
        "--n-trials", "1",
    ]  # fmt: skip


def _postgres_tool(name: str) -> str | None:
    """A PostgreSQL server program: on the PATH, else where Debian installs them."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(versions[0]) if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_with_passwords() -> Iterator[tuple[str, str]]:
    """A throw-away PostgreSQL cluster that asks every connection for its password
    (scram-sha-256; the shared test server trusts loopback and never asks), with a role `study`
    owning a database `test`: (the URL without a password, the role's password). PostgreSQL
    refuses to run as root, so as root the cluster belongs to the `postgres` user."""
    initdb, pg_ctl = _postgres_tool("initdb"), _postgres_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        require("PostgreSQL's initdb and pg_ctl are not installed")
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="study-pg-"))  # not under pytest's root-only folders
    superuser = f"su-{uuid.uuid4().hex}"
    (home / "superuser").write_text(superuser + "\n")
    if as_owner:
        shutil.chown(home, "postgres")
        shutil.chown(home / "superuser", "postgres")
    port, data = _free_port(), home / "data"

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_owner, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    try:
        run(initdb, "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
            f"--pwfile={home / 'superuser'}", "--no-sync")  # fmt: skip
        options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(pg_ctl, "-D", str(data), "-l", str(home / "log"), "-o", options, "-w", "start")
        password = f"pg-{uuid.uuid4().hex}"
        admin = sqlalchemy.create_engine(
            f"postgresql://postgres:{superuser}@127.0.0.1:{port}/postgres",
            isolation_level="AUTOCOMMIT",
        )
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f"CREATE ROLE study LOGIN PASSWORD '{password}'"))
            con.execute(sqlalchemy.text("CREATE DATABASE test OWNER study"))
        admin.dispose()
        yield f"postgresql://study@127.0.0.1:{port}/test", password
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(home, ignore_errors=True)


def _without_passwords(home: Path) -> dict[str, str]:
    """The environment with no PostgreSQL password in it, and `home` as the home folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE")}
    return {**env, "HOME": str(home)}


def list_studies(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "study", "studies"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_postgresql_password_from_the_environment(
    postgres_with_passwords, tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """STUDY_STORAGE carries the URL, PGPASSWORD the password; the arguments hold neither. The
    server asks for the password: the same command with a wrong one is refused."""
    url, password = postgres_with_passwords
    name = f"env-{uuid.uuid4().hex[:8]}"
    env = {**_without_passwords(tmp_path), "STUDY_STORAGE": url, "PGPASSWORD": password}
    proc, output, argv = run_and_read_argv(optimize_args(tiny_model_dir, tiny_data_dir, name), env)
    assert proc.returncode == 0, output
    assert "postgresql" not in argv and password not in argv and "--storage" not in argv
    assert password not in output
    assert f"study {name!r} in {url}" in output
    [trial] = optuna.load_study(study_name=name, storage=url.replace("@", f":{password}@")).trials
    assert trial.state == TrialState.COMPLETE

    wrong = list_studies({**env, "PGPASSWORD": "not-" + password})
    assert wrong.returncode == 2, wrong.stderr
    assert 'password authentication failed for user "study"' in wrong.stderr
    assert len(wrong.stderr.splitlines()) == 1 and password not in wrong.stderr


def test_postgresql_password_from_pgpass(postgres_with_passwords, tmp_path: Path) -> None:
    """No password anywhere but ~/.pgpass: the storage opens; without the file it is refused."""
    url, password = postgres_with_passwords
    port = url.rsplit(":", 1)[1].split("/")[0]
    env = {**_without_passwords(tmp_path), "STUDY_STORAGE": url}
    optuna.create_study(study_name="pgpass", storage=url.replace("@", f":{password}@"))

    refused = list_studies(env)
    assert refused.returncode == 2, refused.stderr
    assert "no password supplied" in refused.stderr, refused.stderr

    pgpass = tmp_path / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:test:study:{password}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file others can read
    listed = list_studies(env)
    assert listed.returncode == 0, listed.stderr
    assert "pgpass" in listed.stdout and password not in listed.stdout + listed.stderr


@pytest.fixture()
def mariadb_user():
    """A MariaDB user with a real password, dropped afterwards: (user, password)."""
    root = sqlalchemy.create_engine(reachable_url("mariadb"))
    user, password = f"study_{uuid.uuid4().hex[:8]}", f"my-{uuid.uuid4().hex}"
    with root.begin() as con:
        con.execute(sqlalchemy.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
        con.execute(sqlalchemy.text(f"GRANT ALL ON test.* TO '{user}'@'%'"))
    yield user, password
    with root.begin() as con:
        con.execute(sqlalchemy.text(f"DROP USER '{user}'@'%'"))
    root.dispose()


def test_mariadb_password_from_an_option_file(
    mariadb_user, tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The URL in the --config file, the password in a MySQL option file: a run succeeds with
    neither in its arguments, and the same URL without the option file is refused (so the
    password really came from the file)."""
    user, password = mariadb_user
    option_file = tmp_path / "my.cnf"
    option_file.write_text(f"[client]\npassword = {password}\n")
    option_file.chmod(0o600)
    url = f"mysql+pymysql://{user}@127.0.0.1:3306/test"
    config = tmp_path / "run.toml"
    config.write_text(f'storage = "{url}?read_default_file={option_file}"\n')
    name = f"optfile-{uuid.uuid4().hex[:8]}"
    try:
        proc, output, argv = run_and_read_argv(
            [*optimize_args(tiny_model_dir, tiny_data_dir, name), "--config", str(config)],
            dict(os.environ),
        )
        assert proc.returncode == 0, output
        assert password not in argv and "mysql" not in argv and password not in output
        [trial] = optuna.load_study(study_name=name, storage=reachable_url("mariadb")).trials
        assert trial.state == TrialState.COMPLETE

        config.write_text(f'storage = "{url}"\n')  # no option file: no password
        refused = subprocess.run(
            [sys.executable, "-m", "study", "report", "--config", str(config), "--study-name",
             name, "--out", str(tmp_path / "r")],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2
        assert "Access denied" in refused.stderr and len(refused.stderr.splitlines()) == 1
    finally:
        delete_studies(reachable_url("mariadb"), name)
