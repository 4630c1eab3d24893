"""Passwords stay off the command line: where the storage URL comes from, and runs whose
password never appears in their arguments (`ps` shows every user the command line).

The URL comes from --storage, else the --config file's `storage`, else STUDY_STORAGE; a URL
without a password leaves it to the driver: PGPASSWORD or ~/.pgpass for PostgreSQL (libpq), a
MySQL option file (``?read_default_file=...``) for PyMySQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
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


def test_postgresql_url_from_the_environment(tiny_model_dir: Path, tiny_data_dir: Path) -> None:
    """STUDY_STORAGE carries the URL, PGPASSWORD the password; the arguments hold neither.

    The test server trusts loopback connections, so it never asks for the password and libpq
    never sends it: this shows the run works with nothing secret in its arguments, not that the
    server checked PGPASSWORD (the MariaDB test below has real password authentication).
    """
    url = reachable_url("postgresql")
    name = f"env-{uuid.uuid4().hex[:8]}"
    secret = f"pg-{uuid.uuid4().hex}"
    env = {**os.environ, "STUDY_STORAGE": url, "PGPASSWORD": secret}
    try:
        proc, output, argv = run_and_read_argv(
            optimize_args(tiny_model_dir, tiny_data_dir, name), env
        )
        assert proc.returncode == 0, output
        assert "postgresql" not in argv and secret not in argv and "--storage" not in argv
        assert secret not in output
        assert f"study {name!r} in {url}" in output
        [trial] = optuna.load_study(study_name=name, storage=url).trials
        assert trial.state == TrialState.COMPLETE
    finally:
        delete_studies(url, name)


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
