"""Many workers on one study: `--workers N`, separate processes, PostgreSQL and MariaDB.

Each case checks that the study ends with exactly the trials asked for, distinct trial numbers,
one COMPLETE baseline, and no lock errors. The database servers are used when reachable; in CI
(`CI` set) an unreachable server is a failure, not a skip.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import require
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}


def optimize_cmd(model: Path, data: Path, url: str, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "study", "optimize", "--model", str(model), "--data-dir", str(data),
        "--storage", url, "--study-name", name, "--device", "cpu", "--no-progress",
        "--epochs", "1", *extra,
    ]  # fmt: skip


def check_study(url: str, name: str, n_trials: int, stderr: str) -> None:
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert len(trials) == n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    baseline = optuna.load_study(study_name=name + "-full-ft", storage=url).trials
    assert [t.state for t in baseline].count(TrialState.COMPLETE) == 1
    # a race for the baseline may leave FAIL duplicates, never a second run
    assert all(
        t.state == TrialState.COMPLETE or "already runs the baseline" in t.user_attrs["fail_reason"]
        for t in baseline
    )
    for needle in ("database is locked", "Deadlock", "OperationalError"):
        assert needle not in stderr


def run_concurrently(cmds: list[list[str]]) -> str:
    procs = [
        subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    return "\n".join(err for _, err in outs)


def test_workers_flag_shares_the_trials(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/o.db"
    out = subprocess.run(
        optimize_cmd(tiny_model_dir, tiny_data_dir, url, "w", "--workers", "2", "--n-trials", "5"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    check_study(url, "w", 5, out.stderr)
    # each worker proposed from its own seed, so the random start does not repeat itself
    trials = optuna.load_study(study_name="w", storage=url).trials
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)


def test_separate_processes_on_sqlite(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/o.db"
    cmds = [
        optimize_cmd(
            tiny_model_dir, tiny_data_dir, url, "s", "--n-trials", "2", "--sampler-seed", str(i)
        )  # fmt: skip
        for i in range(3)
    ]
    check_study(url, "s", 6, run_concurrently(cmds))


@pytest.fixture(params=sorted(SERVERS))
def server_url(request: pytest.FixtureRequest) -> str:
    import sqlalchemy

    url = SERVERS[request.param]
    try:
        with sqlalchemy.create_engine(url).connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: no server here
        require(f"{request.param} is not reachable at {url}: {str(e).splitlines()[0]}")
    return url


def test_three_workers_on_a_database_server(
    server_url: str, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    name = f"workers-{uuid.uuid4().hex[:8]}"
    cmds = [
        optimize_cmd(
            tiny_model_dir,
            tiny_data_dir,
            server_url,
            name,
            "--n-trials",
            "2",
            "--sampler-seed",
            str(i),
        )  # fmt: skip
        for i in range(3)
    ]
    try:
        start = time.perf_counter()
        stderr = run_concurrently(cmds)
        wall = time.perf_counter() - start
        print(f"{server_url.split(':')[0]}: 3 workers, 6 trials, {wall:.1f} s")
        check_study(server_url, name, 6, stderr)
    finally:
        for study in (name, name + "-full-ft"):
            try:
                optuna.delete_study(study_name=study, storage=server_url)
            except KeyError:
                pass
