"""A database that goes away: calls wait it out, exactly once, and the study stays whole.

Storage-level tests run against the real PostgreSQL and MariaDB, through a TCP link the test
cuts (`servers.Link`), or with a commit whose reply is lost (the server applied it, the client
saw the connection drop). CLI tests restart the real servers during a study, and cut a worker's
link for longer than its grace. The servers are used when reachable; in CI (`CI` set) an
unreachable server is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import TrialState
from servers import Link, reachable_url, restart

from storage import StorageUnavailable
from storage import resilient as resilient_module
from storage.resilient import RECEIPTS, ResilientRDBStorage, classify
from study.quota import optimize_quota

# With pytest-xdist every test on the shared database servers runs in one worker, one at a
# time: test_outage restarts those servers.
pytestmark = pytest.mark.usefixtures("databases_one_at_a_time")


ROOT = Path(__file__).resolve().parents[1]
PORTS = {"postgresql": 5432, "mariadb": 3306}


def via(url: str, port: int, password: str = "") -> str:
    """`url` pointed at `port` (a Link), with `password` in it if given."""
    scheme, rest = url.split("://")
    user, host = rest.split("@")
    return f"{scheme}://{user}{':' + password if password else ''}@127.0.0.1:{port}/test"


def resilient(url: str, notes: list[str], grace: float = 30.0, **kwargs) -> ResilientRDBStorage:
    return ResilientRDBStorage(
        url,
        {"pool_pre_ping": True},
        outage_grace_s=grace,
        notify=notes.append,
        **kwargs,
    )


def lose_next_reply(storage: RDBStorage) -> list[bool]:
    """Arm: the next COMMIT is applied by the server, then the client sees the connection drop
    (the driver's own OperationalError). Returns the trigger list (empty again once fired)."""
    armed: list[bool] = [True]
    dialect = storage.engine.dialect
    commit = dialect.do_commit

    def do_commit(dbapi_connection) -> None:
        commit(dbapi_connection)
        if armed:
            armed.pop()
            raise dialect.loaded_dbapi.OperationalError("server closed the connection")

    dialect.do_commit = do_commit
    return armed


@contextlib.contextmanager
def optuna_records(name: str):
    """The log records of a logger (Optuna's do not reach pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(params=sorted(PORTS))
def server(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, reachable_url(request.param)


@pytest.fixture()
def names():
    """Unique study names, deleted afterwards (the servers are shared)."""
    made: list[tuple[str, str]] = []

    def new(url: str, prefix: str = "outage") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        made.append((url, name))
        return name

    yield new
    for url, name in made:
        for study in (name, name + "-full-ft"):
            try:
                optuna.delete_study(study_name=study, storage=url)
            except KeyError:
                pass


# ----------------------------------------------------------------------------- classification


def test_lost_connections_and_lock_conflicts_are_told_apart() -> None:
    import psycopg
    import pymysql

    def wrapped(orig: Exception) -> Exception:
        try:
            try:
                raise sqlalchemy.exc.OperationalError("SELECT 1", None, orig)
            except sqlalchemy.exc.OperationalError as e:
                raise optuna.exceptions.StorageInternalError("during the commit") from e
        except optuna.exceptions.StorageInternalError as e:
            return e

    assert classify(wrapped(psycopg.OperationalError("server closed the connection"))) == "lost"
    assert classify(wrapped(psycopg.errors.AdminShutdown("terminating connection"))) == "lost"
    assert classify(wrapped(psycopg.errors.DeadlockDetected("deadlock"))) == "contention"
    assert classify(wrapped(pymysql.err.OperationalError(2013, "Lost connection"))) == "lost"
    assert classify(wrapped(pymysql.err.OperationalError(1213, "Deadlock found"))) == "contention"
    integrity = sqlalchemy.exc.IntegrityError("INSERT", None, Exception("duplicate key"))
    assert classify(integrity) is None
    assert classify(KeyError("no study")) is None

    # Optuna's _get_trials queries again in the same session after an OperationalError (a
    # MariaDB restart): the session's refusal is classified by what failed first.
    def refused_after(first: Exception) -> Exception:
        try:
            try:
                raise first
            except Exception:  # the session's refusal has the first failure as its context
                raise sqlalchemy.exc.PendingRollbackError("invalid transaction")  # noqa: B904
        except sqlalchemy.exc.PendingRollbackError as refusal:
            try:
                raise optuna.exceptions.StorageInternalError("during the commit") from refusal
            except optuna.exceptions.StorageInternalError as e:
                return e

    lost = sqlalchemy.exc.OperationalError("SELECT", None, pymysql.err.OperationalError(2013, "x"))
    assert classify(refused_after(lost)) == "lost"
    assert classify(refused_after(integrity)) is None


# ----------------------------------------------------------------------------- storage calls


def test_calls_wait_out_a_cut_connection(server, names) -> None:
    kind, url = server
    notes: list[str] = []
    with Link(PORTS[kind]) as link:
        storage = resilient(via(url, link.port), notes)
        study = optuna.create_study(storage=storage, study_name=names(url), direction="maximize")
        trial = study.ask()
        link.cut()
        threading.Timer(1.5, link.restore).start()
        trial.set_user_attr("during", "outage")  # waits for the link to come back
        study.tell(trial, 0.5)
    [done] = optuna.load_study(study_name=study.study_name, storage=url).trials
    assert (done.state, done.value, done.user_attrs) == (
        TrialState.COMPLETE,
        0.5,
        {"during": "outage"},
    )
    assert len(notes) == 2, notes
    assert notes[0].startswith(f"warning: storage {via(url, link.port)} unreachable (")
    assert notes[1].startswith(f"storage {via(url, link.port)} reachable again after ")


def test_a_connection_lost_inside_a_read_shows_no_sql(names) -> None:
    """Optuna's trial read logs any OperationalError of its main query as a multi-line SQL dump
    ("Falling back to a slower alternative"); from this storage the operator sees none."""
    url = reachable_url("postgresql")
    storage = resilient(url, [])
    study = optuna.create_study(storage=storage, study_name=names(url))
    study.ask()
    armed = [True]
    dialect = storage.engine.dialect

    def drop_main_query(conn, cursor, statement, parameters, context, executemany) -> None:
        if armed and "ORDER BY trials.trial_id" in statement:
            armed.pop()
            lost = dialect.loaded_dbapi.OperationalError("server closed the connection")
            raise sqlalchemy.exc.OperationalError(statement, parameters, lost)

    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", drop_main_query)
    with optuna_records("optuna.storages._rdb.storage") as records:
        assert len(storage.get_all_trials(study._study_id)) == 1
    assert not armed and records == []


def test_no_traceback_for_a_connection_given_back_dead(names) -> None:
    """The server goes away right after a COMMIT: PyMySQL's rollback when SQLAlchemy takes the
    connection back fails, which SQLAlchemy logs with a traceback unless this storage drops it.
    (psycopg's rollback on a closed connection does not fail, so PostgreSQL is not run here.)"""
    url = reachable_url("mariadb")
    with Link(PORTS["mariadb"]) as link:
        storage = resilient(via(url, link.port), [])
        study_id = storage.create_new_study([StudyDirection.MAXIMIZE], names(url))
        dialect = storage.engine.dialect
        commit, armed = dialect.do_commit, [True]

        def commit_then_cut(dbapi_connection) -> None:
            commit(dbapi_connection)
            if armed:
                armed.pop()
                link.cut()
                threading.Timer(1.0, link.restore).start()

        dialect.do_commit = commit_then_cut
        with optuna_records(storage.engine.pool.logger.name) as records:
            storage.set_study_user_attr(study_id, "a", 1)
            assert storage.get_study_user_attrs(study_id) == {"a": 1}  # after the outage
    assert not armed and records == []


@pytest.fixture()
def receipts(monkeypatch: pytest.MonkeyPatch):
    """`rows(storage)`: the owners of the receipts still in the table, of those written since
    the test began (the table on the shared server also holds other storages' receipts)."""
    tokens: list[str] = []

    class Recorded(resilient_module._Receipt):
        def __init__(self) -> None:
            super().__init__()
            tokens.append(self.token)

    monkeypatch.setattr(resilient_module, "_Receipt", Recorded)

    def rows(storage: RDBStorage) -> list[int]:
        query = sqlalchemy.select(RECEIPTS.c.owner_id).where(RECEIPTS.c.token.in_(tokens))
        with storage.engine.connect() as con:
            return [owner for (owner,) in con.execute(query)]

    return rows


def test_a_lost_reply_creates_one_trial_and_ends_it_once(server, names, receipts) -> None:
    kind, url = server
    storage = resilient(url, [])
    armed = lose_next_reply(storage)
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], names(url))
    assert not armed  # the reply to creating the study was lost, and it exists once
    assert [s._study_id for s in storage.get_all_studies()].count(study_id) == 1

    armed = lose_next_reply(storage)
    trial_id = storage.create_new_trial(study_id)
    assert not armed
    assert [t._trial_id for t in storage.get_all_trials(study_id)] == [trial_id]

    armed = lose_next_reply(storage)
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5]) is True
    assert not armed
    trial = storage.get_trial(trial_id)
    assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.5)

    # The receipts that told the attempts apart are nowhere Optuna or a user looks, and the
    # spent ones are deleted: only the last call's receipt is left of this storage's.
    assert trial.system_attrs == {} and storage.get_study_system_attrs(study_id) == {}
    assert receipts(storage) == [trial_id]

    # What the receipts prevent: Optuna's own loop repeats the lost commit blindly (a ghost
    # RUNNING trial nobody owns), and a blind repeat of the state change is refused.
    plain = RDBStorage(url)
    armed = lose_next_reply(plain)
    plain.create_new_trial(study_id)
    assert not armed
    assert len(storage.get_all_trials(study_id)) == 3
    with pytest.raises(UpdateFinishedTrialError):
        plain.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_an_outage_past_the_grace_names_the_storage(server, names) -> None:
    kind, url = server
    notes: list[str] = []
    # trust authentication on the PostgreSQL test server accepts and ignores a password
    password = "hunter2" if kind == "postgresql" else ""
    with Link(PORTS[kind]) as link:
        storage = resilient(
            via(url, link.port, password), notes, grace=1.0, heartbeat_interval=1, grace_period=2
        )
        study = optuna.create_study(storage=storage, study_name=names(url))
        trial = study.ask()
        link.cut()
        storage.record_heartbeat(trial._trial_id)  # never raises: Optuna's thread would die
        with pytest.raises(StorageUnavailable) as e:
            storage.set_trial_user_attr(trial._trial_id, "x", 1)
    message = str(e.value)
    shown = via(url, link.port, "***" if password else "")
    assert re.match(rf"storage {re.escape(shown)} unreachable for \d+ s \(", message), message
    assert message.endswith("; rerun the same command to resume")
    assert all("hunter2" not in m for m in [message, *notes])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_after_an_outage_no_trial_is_failed_as_stale_at_once(names) -> None:
    url = reachable_url("postgresql")
    with Link(PORTS["postgresql"]) as link:
        storage = resilient(via(url, link.port), [], heartbeat_interval=1, grace_period=2)
        study = optuna.create_study(storage=storage, study_name=names(url))
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
        link.cut()
        threading.Timer(3.0, link.restore).start()
        storage.get_trial(trial._trial_id)  # waits out the 3 s outage
        # the heartbeat is older than the grace period, because of the outage: not stale yet
        assert storage._get_stale_trial_ids(study._study_id) == []
        time.sleep(2.5)  # one grace period after the database came back
        assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]


# ----------------------------------------------------------------------------- a trial taken over


@pytest.mark.parametrize("writes_after", [True, False])
def test_a_trial_failed_by_another_worker_is_replaced(tmp_path: Path, writes_after: bool) -> None:
    """Another worker fails our trial as stale and queues its copy while we still train it."""
    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    other = optuna.load_study(study_name="s", storage=url)  # the other worker's handle

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 0:
            other._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            RetryHeartbeatStaleTrialCallback(max_retry=3)(other, other.trials[0])
            if writes_after:
                trial.report(x, 1)  # UpdateFinishedTrialError inside the objective
        return x

    optimize_quota(study, objective, n_trials=3)
    trials = study.trials
    assert trials[0].state == TrialState.FAIL
    [copy] = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert copy.params == trials[0].params and copy.state == TrialState.COMPLETE
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3


def test_a_bug_still_stops_the_study(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/o.db")

    def objective(trial: optuna.Trial) -> float:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        optimize_quota(study, objective, n_trials=2)


# ----------------------------------------------------------------------------- whole runs


def optimize_cmd(model: Path, data: Path, url: str, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "study", "optimize", "--model", str(model), "--data-dir", str(data),
        "--storage", url, "--study-name", name, "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def states(url: str, name: str) -> list[tuple[str, int]]:
    """(state, intermediate values) of each trial, read without Optuna (cheap to poll)."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as con:
            rows = con.execute(
                sqlalchemy.text(
                    "SELECT t.state, COUNT(v.trial_intermediate_value_id) FROM trials t"
                    " JOIN studies s ON s.study_id = t.study_id"
                    " LEFT JOIN trial_intermediate_values v ON v.trial_id = t.trial_id"
                    " WHERE s.study_name = :name GROUP BY t.trial_id, t.state"
                ),
                {"name": name},
            ).fetchall()
    finally:
        engine.dispose()
    return [(str(state).rsplit(".", 1)[-1], n) for state, n in rows]


def wait_mid_trial(url: str, name: str, proc: subprocess.Popen) -> None:
    """Until a trial has finished and another is training (has reported an epoch)."""
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"optimize ended early: {proc.communicate()}")
        rows = states(url, name)
        if any(s != "RUNNING" for s, _ in rows) and any(s == "RUNNING" and n for s, n in rows):
            return
        time.sleep(0.05)
    raise AssertionError("no trial in flight")


def check_accounted(url: str, name: str, n_trials: int) -> dict[str, int]:
    """Every trial accounted for: `n_trials` finished, each FAIL retried once by a finished
    copy with its parameters, nothing left running, trial numbers distinct; one baseline."""
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for t in failed:
        [copy] = [c for c in trials if c.system_attrs.get("failed_trial") == t.number]
        assert copy.params == t.params and copy.state != TrialState.FAIL
    assert len(finished) + len(failed) == len(trials)
    [baseline] = optuna.load_study(study_name=name + "-full-ft", storage=url).trials
    assert baseline.state == TrialState.COMPLETE
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    return {k: v for k, v in counts.items() if v}


def operator_lines(stderr: str) -> list[str]:
    """What the run printed besides Optuna's per-trial info log."""
    return [line for line in stderr.splitlines() if not line.startswith("[I ")]


def in_flight(url: str, name: str) -> list[tuple[int, int]]:
    """(number, epochs reported) of each RUNNING trial that has reported an epoch, once another
    trial has finished."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as con:
            rows = con.execute(
                sqlalchemy.text(
                    "SELECT t.number, t.state, COUNT(v.trial_intermediate_value_id) FROM trials t"
                    " JOIN studies s ON s.study_id = t.study_id"
                    " LEFT JOIN trial_intermediate_values v ON v.trial_id = t.trial_id"
                    " WHERE s.study_name = :name GROUP BY t.trial_id, t.number, t.state"
                ),
                {"name": name},
            ).fetchall()
    finally:
        engine.dispose()
    rows = [(number, str(state).rsplit(".", 1)[-1], n) for number, state, n in rows]
    if all(state == "RUNNING" for _, state, _ in rows):
        return []
    return [(number, n) for number, state, n in rows if state == "RUNNING" and n]


def freeze_mid_trial(
    url: str,
    name: str,
    proc: subprocess.Popen,
    signal_all: Callable[[int], None],
    trials: int = 1,
) -> list[tuple[int, int]]:
    """Stop `proc` and its worker processes (`signal_all(SIGSTOP)`) while they train: one trial
    has finished and `trials` others have reported an epoch. Returns (number, epochs reported)
    of each trial in flight. Stopped, the processes can neither finish a trial nor write
    anything before they are continued."""
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"optimize ended early: {proc.communicate()}")
        if len(in_flight(url, name)) >= trials:
            signal_all(signal.SIGSTOP)
            time.sleep(0.2)  # a commit already sent lands before the state is read
            running = in_flight(url, name)
            if len(running) >= trials:
                return running
            signal_all(signal.SIGCONT)  # the trial had just finished: the next one
        time.sleep(0.05)
    raise AssertionError("no trial in flight")


def restart_mid_trial(
    kind: str, url: str, name: str, cmd: list[str], trials: int = 1
) -> tuple[subprocess.Popen, str, list[tuple[int, int]], datetime]:
    """Run `cmd` (an `optimize` of study `name`) and restart the server while it trains
    `trials` trials at once. Its processes are held still from before the server stops until
    it is down, so the restart provably hits the trials in flight (a tiny model's trial lasts
    less than a second and would otherwise often fall between two). Returns the process, its
    stderr, the trials in flight (number, epochs reported) and when the server was stopped."""
    # a session of its own: the signals reach the worker processes it starts, and only those
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        running = freeze_mid_trial(url, name, proc, lambda sig: os.killpg(proc.pid, sig), trials)
        stopped_at = datetime.now()
        restart(kind, while_down=lambda: os.killpg(proc.pid, signal.SIGCONT))
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return proc, err, running, stopped_at


def check_carried_on(
    url: str, name: str, running: list[tuple[int, int]], stopped_at: datetime
) -> None:
    """No trial FAILed, and each trial in flight at the restart began before the server went
    down and finished after (MariaDB keeps whole seconds; the restart takes longer than one)."""
    trials = optuna.load_study(study_name=name, storage=url).trials
    # the README: the trial in flight goes on; none fails (not even one retried by a copy)
    assert [t.number for t in trials if t.state == TrialState.FAIL] == []
    by_number = {t.number: t for t in trials}
    for number, epochs in running:
        carried = by_number[number]
        assert carried.state in (TrialState.COMPLETE, TrialState.PRUNED), carried.state
        assert carried.datetime_start < stopped_at < carried.datetime_complete
        assert len(carried.intermediate_values) >= epochs >= 1


@pytest.mark.parametrize("kind", sorted(PORTS))
def test_a_database_restart_during_a_study(
    kind: str, tiny_model_dir: Path, tiny_data_dir: Path, names
) -> None:
    """The server restarts while a trial trains: the worker waits, the trial carries on and
    finishes, nothing fails."""
    url = reachable_url(kind)
    name = names(url, "restart")
    cmd = optimize_cmd(tiny_model_dir, tiny_data_dir, url, name, "--epochs", "3", "--n-trials", "6")
    proc, err, running, stopped_at = restart_mid_trial(kind, url, name, cmd)
    assert proc.returncode == 0, err
    lines = operator_lines(err)
    print(f"{kind} restart; the worker printed:", *lines, sep="\n  ")
    check_carried_on(url, name, running, stopped_at)
    check_accounted(url, name, 6)
    assert any("unreachable (" in line for line in lines), err
    assert any("reachable again after" in line for line in lines), err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", sorted(PORTS))
def test_a_database_restart_under_several_workers(
    kind: str, tiny_model_dir: Path, tiny_data_dir: Path, names
) -> None:
    """`--workers 2`: the server restarts while both worker processes train; every worker waits
    it out and carries on, the call finishes exactly its trials and nothing fails."""
    url = reachable_url(kind)
    name = names(url, "workers-restart")
    # The second worker starts after the baseline and must meet the first in flight: each
    # worker's share of trials (10 epochs, none pruned) outlasts a worker's start-up, which
    # takes several seconds on a loaded machine.
    flags = ("--epochs", "10", "--pruner", "none", "--n-trials", "16", "--workers", "2")
    proc, err, running, stopped_at = restart_mid_trial(
        kind, url, name, optimize_cmd(tiny_model_dir, tiny_data_dir, url, name, *flags), trials=2
    )
    assert proc.returncode == 0, err
    lines = operator_lines(err)
    print(f"{kind} restart under 2 workers; they printed:", *lines, sep="\n  ")
    assert len(running) == 2  # a trial of each worker was in flight
    check_carried_on(url, name, running, stopped_at)
    check_accounted(url, name, 16)
    # each worker met the outage, said so, and said when it ended
    assert sum("unreachable (" in line for line in lines) >= 2, err
    assert sum("reachable again after" in line for line in lines) >= 2, err
    assert "Traceback" not in err


def test_a_longer_outage_ends_the_worker_and_a_rerun_resumes(
    tiny_model_dir: Path, tiny_data_dir: Path, names
) -> None:
    url = reachable_url("postgresql")
    name = names(url, "long-outage")
    # short heartbeat so the rerun need not wait the default 30 s grace period
    flags = ("--epochs", "4", "--heartbeat-interval", "1", "--grace-period", "3", "--seed", "5")
    with Link(PORTS["postgresql"]) as link:
        linked = via(url, link.port, password="hunter2")  # trust auth: accepted and ignored
        cmd = optimize_cmd(tiny_model_dir, tiny_data_dir, linked, name, *flags, "--n-trials", "4")
        proc = subprocess.Popen(
            [*cmd, "--db-outage-grace", "3"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_mid_trial(url, name, proc)
            link.cut()
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        lines = operator_lines(err)
        print("the worker printed:", *lines, sep="\n  ")
        assert proc.returncode == 75, err
        assert "Traceback" not in err and "hunter2" not in err + out
        errors = [line for line in lines if line.startswith("error:")]
        assert errors == [lines[-1]]
        assert errors[0].startswith(
            f"error: storage postgresql://postgres:***@127.0.0.1:{link.port}/test unreachable for"
        )
        link.restore()
        left = [s for s, _ in states(url, name)]
        assert left.count("RUNNING") == 1  # the trial in flight, its worker gone
        done = left.count("COMPLETE") + left.count("PRUNED")
        time.sleep(3.5)  # the dead run's trial: its heartbeat is older than the grace period
        rerun = subprocess.run(
            [*cmd[:-1], str(4 - done)], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
    assert rerun.returncode == 0, rerun.stderr
    counts = check_accounted(url, name, 4)
    print(f"after the rerun: trials {counts}")
    assert counts.get("FAIL") == 1  # the trial in flight during the outage, retried once
