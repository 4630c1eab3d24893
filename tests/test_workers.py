"""Many workers on one study: `--workers N`, separate processes, PostgreSQL and MariaDB, and
workers behind one gRPC storage proxy.

Each case checks that the study ends with exactly the trials asked for, distinct trial numbers,
one COMPLETE baseline, and no lock errors or tracebacks. The database servers are used when
reachable; in CI (`CI` set) an unreachable server is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from servers import SERVERS, delete_studies, reachable_url

from objectives.occupancy import DIR_ENV
from storage import get_storage

# With pytest-xdist every test on the shared database servers runs in one worker, one at a
# time: test_outage restarts those servers.
pytestmark = pytest.mark.usefixtures("databases_one_at_a_time")


ROOT = Path(__file__).resolve().parents[1]


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
    for needle in ("database is locked", "Deadlock", "OperationalError", "Traceback"):
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
    # Another live run registered on the CPU (this test process) must be seen by every trial,
    # in every worker process: `concurrent_trials` crosses processes without timing luck.
    occupancy = tmp_path / "occupancy"
    (occupancy / "cpu").mkdir(parents=True)
    (occupancy / "cpu" / f"{os.getpid()}-test").touch()
    out = subprocess.run(
        optimize_cmd(tiny_model_dir, tiny_data_dir, url, "w", "--workers", "2", "--n-trials", "5"),
        cwd=ROOT,
        env={**os.environ, DIR_ENV: str(occupancy)},
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
    for t in trials + optuna.load_study(study_name="w-full-ft", storage=url).trials:
        assert t.user_attrs["concurrent_trials"] >= 1 and t.user_attrs["torch_threads"] >= 1
    assert [p.name for p in (occupancy / "cpu").iterdir()] == [f"{os.getpid()}-test"]


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


def test_two_processes_racing_for_the_baseline_run_it_once(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Two `optimize` calls that start at the same moment both find no baseline and each queue
    one; that state is set up here, then both start together. Exactly one trains the baseline:
    the other copy ends FAIL at once, untrained ("trial N already runs the baseline")."""
    url = f"sqlite:///{tmp_path}/o.db"
    queued = optuna.create_study(study_name="race-full-ft", storage=url, direction="maximize")
    for _ in range(2):  # what each racer queues (the study's stored attributes, by name)
        queued.enqueue_trial({}, user_attrs={"baseline_role": "fixed", "lr_factor": 1.0})
    cmds = [
        optimize_cmd(
            tiny_model_dir, tiny_data_dir, url, "race", "--n-trials", "1", "--sampler-seed", str(i)
        )  # fmt: skip
        for i in range(2)
    ]
    stderr = run_concurrently(cmds)
    baseline = optuna.load_study(study_name="race-full-ft", storage=url).trials
    trained = [t for t in baseline if t.intermediate_values]
    assert len(trained) == 1, [(t.number, t.state.name) for t in trained]
    [run] = trained
    assert run.state == TrialState.COMPLETE
    rivals = [t for t in baseline if t is not run]
    assert rivals, "both queued copies were used"
    for t in rivals:
        assert t.state == TrialState.FAIL and "train_time_s" not in t.user_attrs
        assert t.user_attrs["fail_reason"] == f"trial {run.number} already runs the baseline"
    # one epoch of one baseline run in the output of both processes together
    assert len(re.findall(r"race-full-ft trial \d+ epoch", stderr)) == 1, stderr
    check_study(url, "race", 2, stderr)


TAKE_QUEUED = r"""
import json, pathlib, sys, time
import optuna, sqlalchemy
from storage import get_storage

url, out = sys.argv[1:]
storage = get_storage(url, heartbeat=None)


# a wider gap between reading a queued trial's state and marking it RUNNING, so two processes
# that could both take it would (Optuna reads the row "for update", which SQLite ignores)
@sqlalchemy.event.listens_for(storage.engine, "before_cursor_execute")
def slower(conn, cursor, statement, parameters, context, executemany):
    if statement.startswith("UPDATE trials SET state"):
        time.sleep(0.01)


study = optuna.load_study(study_name="queue", storage=storage)
# a start line: neither process takes a trial before both are ready, so a slow interpreter
# start cannot leave one of them an empty queue
ready = pathlib.Path(out).with_suffix(".ready")
ready.touch()
deadline = time.monotonic() + 120
while len(list(ready.parent.glob("*.ready"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
taken = []
while True:
    trial = study.ask()
    if "fixed_params" not in storage.get_trial_system_attrs(trial._trial_id):  # a new one
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        break
    taken.append(trial.number)
    study.tell(trial, 0.0)
    # a pause outside any transaction: SQLite's busy handler polls at growing intervals (up to
    # 100 ms), so a process taking trials back to back can hold the write lock at every poll of
    # the other and take the whole queue alone, which would test no race at all
    time.sleep(0.02)
open(out, "w").write(json.dumps(taken))
"""


def test_sqlite_in_wal_mode_never_gives_one_queued_trial_to_two_processes(
    tmp_path: Path,
) -> None:
    """The SQLite file `get_storage` makes is in WAL mode: a reader holding a read transaction
    open (a dashboard polling) blocks no writer. Two processes taking queued trials at the same
    time each take a different one: every queued trial is taken exactly once."""
    db = tmp_path / "queue.db"
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name="queue", storage=get_storage(url, heartbeat=None))
    for i in range(60):
        study.enqueue_trial({"i": i})
    queued = sorted(t.number for t in study.trials)
    reader = sqlite3.connect(db)
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        reader.execute("BEGIN")  # a read snapshot held open during the whole run
        assert reader.execute("SELECT COUNT(*) FROM trials").fetchone() == (60,)
        outs = [tmp_path / f"taken-{i}.json" for i in range(2)]
        run_concurrently([[sys.executable, "-c", TAKE_QUEUED, url, str(out)] for out in outs])
    finally:
        reader.close()
    taken = [json.loads(out.read_text()) for out in outs]
    assert all(taken), taken  # both took part
    assert sorted(taken[0] + taken[1]) == queued  # each queued trial once, none twice
    states = [t.state for t in optuna.load_study(study_name="queue", storage=url).trials]
    assert states.count(TrialState.COMPLETE) == 60 and TrialState.RUNNING not in states


@pytest.fixture(params=sorted(SERVERS))
def server_url(request: pytest.FixtureRequest) -> str:
    return reachable_url(request.param)


def test_eight_workers_on_a_database_server(
    server_url: str, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    """As Optuna's own storage tests: 8 processes at once, here each a whole `optimize`."""
    name = f"workers-{uuid.uuid4().hex[:8]}"
    cmds = [
        optimize_cmd(
            tiny_model_dir,
            tiny_data_dir,
            server_url,
            name,
            "--n-trials",
            "3",
            "--sampler-seed",
            str(i),
        )  # fmt: skip
        for i in range(8)
    ]
    try:
        start = time.perf_counter()
        stderr = run_concurrently(cmds)
        wall = time.perf_counter() - start
        check_study(server_url, name, 24, stderr)
        trials = optuna.load_study(study_name=name, storage=server_url).trials
        states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
        print(f"{server_url.split(':')[0]}: 8 workers x 3 trials: {len(trials)} trials "
              f"{ {k: v for k, v in states.items() if v} }, {wall:.1f} s")  # fmt: skip
    finally:
        delete_studies(server_url, name)


def test_four_workers_through_a_storage_proxy(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """`storage-proxy` in front of PostgreSQL; the workers and `report` reach only the proxy."""
    url = reachable_url("postgresql")
    name = f"proxy-{uuid.uuid4().hex[:8]}"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "study", "storage-proxy", "--storage", url, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proxy.stdout.readline()  # printed once the port is bound
        assert first.startswith(f"storage proxy for {url} at grpc://127.0.0.1:"), (
            first + proxy.stderr.read() if proxy.poll() is not None else first
        )
        grpc_url = first.split(" at ")[1].split()[0]
        cmds = [
            optimize_cmd(
                tiny_model_dir,
                tiny_data_dir,
                grpc_url,
                name,
                "--n-trials",
                "2",
                "--sampler-seed",
                str(i),
            )  # fmt: skip
            for i in range(4)
        ]
        stderr = run_concurrently(cmds)
        check_study(url, name, 8, stderr)  # read back directly from PostgreSQL
        print(f"4 workers through {grpc_url} on {url}: 8 trials")
        report = subprocess.run(
            [sys.executable, "-m", "study", "report", "--storage", grpc_url, "--study-name", name,
             "--out", str(tmp_path / "report")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert report.returncode == 0, report.stderr
        # header, 8 LoRA trials, the baseline (and any FAIL rivals of the baseline race)
        assert (tmp_path / "report" / "summary.csv").read_text().count("\n") >= 1 + 8 + 1
        proxy.terminate()
        out, err = proxy.communicate(timeout=30)
        assert proxy.returncode == 0, err
        assert "storage proxy stopped" in out and "Traceback" not in err
    finally:
        proxy.kill()
        delete_studies(url, name)
