"""Storage calls that wait out a database outage: `ResilientRDBStorage`.

A PostgreSQL or MySQL server restarts (maintenance, failover, a crash) and every connection a
worker holds dies. Plain Optuna raises `StorageInternalError` from the first call that meets a
dead connection and the worker ends. Here each storage call that fails because the connection
was lost is tried again, with growing pauses, until it succeeds or the outage has lasted
`outage_grace_s` seconds; then `StorageUnavailable` names the storage (password redacted) and
the worker ends. Stale pooled connections are checked before use (`pool_pre_ping`), so the
first call after the outage gets a fresh connection instead of failing once more.

Why the retry lives here, below Optuna's `_CachedStorage` and above SQLAlchemy:
- Above Optuna (around `study.optimize`) a failed call has already ended the trial, and most
  calls happen inside the objective (`trial.report`, `set_user_attr`), where only Optuna
  catches them.
- Below SQLAlchemy (the driver) a retry cannot know which transaction it repeats.
- Here each call is one transaction with a known effect, so each can be classified:
  - reads, and writes that set a value by key (attributes, intermediate values, parameters,
    heartbeats): a repeat leaves the same state, so they are simply repeated;
  - creating a trial and changing a trial's state are not: a commit can succeed on the server
    and its reply be lost with the connection, and a blind repeat would then add a second
    trial (a RUNNING ghost without heartbeat that nothing ever fails) or fail a finished one.
    Each attempt therefore writes a receipt (a random token and the id of the trial it made or
    changed) in the same transaction, and after a failure the receipt is looked up first:
    found, the earlier attempt committed and its result is returned; absent, nothing was written
    and the attempt is repeated. Optuna's own repeat loop in `_create_new_trial` (for deadlocks)
    repeats commits blindly, so that method is rewritten here without it.
    Creating a study writes a receipt the same way, so a lost reply neither creates a second
    unnamed study nor reports a study it created as someone else's.
  - the receipts live in a table of their own, `commit_receipts`, not in Optuna's system
    attributes: Optuna, optuna-dashboard, copies of a study and every tool that reads the
    storage see exactly what Optuna's own RDBStorage would have written (Optuna's conformance
    suite checks that system attributes hold only what was set). A receipt is needed only until
    its call returns; each receipt-writing transaction deletes this storage's earlier ones, so
    the table holds about one row per storage object, not one per trial.
  - deleting a study: a repeat that finds the study gone counts as done.
- Deadlocks and lock timeouts are not outages: they are repeated a few times at once, quietly,
  as Optuna does for new trials.
The three rewritten transactions follow Optuna 5.0.0's own (pinned in requirements.txt); the
tests in tests/test_outage.py lose replies on purpose and fail if Optuna's internals drift.

The heartbeat: Optuna's heartbeat thread dies on the first exception, so `record_heartbeat`
makes one attempt per beat and never raises for a lost connection (a missed beat is harmless;
the main thread reports a long outage). After an outage every worker's heartbeat is old, so
this storage does not fail other workers' trials as stale until one grace period after it saw
the database come back: the live workers have beaten again by then (the heartbeat interval is
shorter than the grace period), and only dead ones are failed and retried.
"""

from __future__ import annotations

import copy
import functools
import logging
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.storages._base import DEFAULT_STUDY_NAME_PREFIX
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import RDBStorage, _create_scoped_session
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from objectives.errors import first_line
from storage.outage import OUTAGE_GRACE_S, StorageUnavailable
from storage.urls import redact, scrub

FIRST_PAUSE_S = 0.5  # then doubling up to MAX_PAUSE_S: a 3 s restart costs about 4 s
MAX_PAUSE_S = 5.0  # the longest a worker lags behind a database that is back
CONTENTION_RETRIES = 5  # deadlocks and lock timeouts, as Optuna's `_create_new_trial`

# Which attempt of a call committed: a table of the outage machinery's own, beside Optuna's
# (whose schema and migrations it leaves alone), created with them if absent.
RECEIPTS = sqlalchemy.Table(
    "commit_receipts",
    sqlalchemy.MetaData(),
    sqlalchemy.Column("token", sqlalchemy.String(32), primary_key=True),
    sqlalchemy.Column("owner_id", sqlalchemy.Integer, nullable=False),  # the study's or trial's
)

# SQLSTATE classes and MySQL error numbers of a transaction that lost a race, not a connection
_PG_CONTENTION = ("40001", "40P01", "55P03")  # serialization failure, deadlock, lock not available
_MYSQL_CONTENTION = (1205, 1213)  # lock wait timeout, deadlock

T = TypeVar("T")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from: Optuna wraps SQLAlchemy, which wraps the driver.

    A session whose query failed refuses the next one with PendingRollbackError, raised while
    the first failure was being handled (Optuna's `_get_trials` queries again after an
    OperationalError): that first failure, its context, is what went wrong.
    """
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 8:
        chain.append(exc)
        if isinstance(exc, sqlalchemy.exc.PendingRollbackError) and exc.__cause__ is None:
            exc = exc.__context__
        else:
            exc = exc.__cause__
    return chain


def classify(exc: BaseException) -> str | None:
    """ "lost" (the connection or server went away), "contention" (a deadlock or lock timeout:
    the transaction was rolled back) or None (anything else: not repeated)."""
    for e in _causes(exc):
        if isinstance(e, sqlalchemy.exc.DBAPIError):
            orig = e.orig
            if getattr(orig, "sqlstate", None) in _PG_CONTENTION:
                return "contention"
            args = getattr(orig, "args", ())
            if args and args[0] in _MYSQL_CONTENTION:
                return "contention"
            if e.connection_invalidated or isinstance(
                e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError
            ):
                return "lost"
        if isinstance(e, sqlalchemy.exc.DisconnectionError | sqlalchemy.exc.TimeoutError):
            return "lost"
    return None


def _reason(exc: BaseException) -> str:
    """The driver's own words (first line) of the deepest cause."""
    deepest = _causes(exc)[-1]
    if isinstance(deepest, sqlalchemy.exc.DBAPIError) and deepest.orig is not None:
        deepest = deepest.orig
    args = deepest.args
    if len(args) == 2 and isinstance(args[0], int):  # PyMySQL: (error number, message)
        return f"{args[1]} [{args[0]}]"
    return first_line(deepest)


class _QuietFallback(logging.Filter):
    """Optuna's `_get_trials` logs any OperationalError as "Falling back to a slower
    alternative" (meant for too many IN variables) and queries again; during an outage that is
    a multi-line SQL dump on the operator's terminal for a call that is retried anyway. Records
    from inside this module's calls are dropped; the slower query still runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.inside, "on", False)


def _filter_once(logger: logging.Logger, cls: type[T]) -> T:
    """The `cls` filter on `logger`, added if it has none yet: once per process."""
    quiet = next((f for f in logger.filters if isinstance(f, cls)), None)
    if quiet is None:
        quiet = cls()
        logger.addFilter(quiet)
    return quiet


class _QuietReset(logging.Filter):
    """SQLAlchemy logs a traceback ("Exception during reset or similar") when a connection is
    given back to the pool after its server went away (PyMySQL's rollback-on-return fails).
    SQLAlchemy discards that connection and the next call here gets a fresh one, so for a lost
    connection the traceback would only alarm the operator; other reset failures still show."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: tuple[type[BaseException], ...] = ()  # the drivers' connection errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        lost = isinstance(exc, self.lost)
        return not (lost and record.msg == "Exception during reset or similar")


def _quiet_reset(engine: sqlalchemy.engine.Engine) -> None:
    """Add (once per process and driver) the filter to the logger of `engine`'s pool."""
    logger = engine.pool.logger
    logger = getattr(logger, "logger", logger)  # an echoing pool wraps its logger
    quiet = _filter_once(logger, _QuietReset)
    dbapi = engine.dialect.loaded_dbapi
    quiet.lost = tuple({*quiet.lost, dbapi.OperationalError, dbapi.InterfaceError})


class _Outage:
    """What all threads of one storage (or one `open_waiting`) know about the current outage,
    and what the operator is told: a line when it begins, one when it ends, StorageUnavailable
    after the grace."""

    def __init__(self, url: str, grace_s: float, notify: Callable[[str], None]) -> None:
        self.url = url
        self.grace_s = grace_s
        self.notify = notify
        self.lock = threading.Lock()
        self.since: float | None = None  # monotonic time of the first failed call, None if up
        self.ended: float | None = None  # monotonic time the last outage ended
        self.reason = ""

    def down(self, exc: BaseException) -> float:
        """Note a lost connection; the seconds left before giving up, or StorageUnavailable."""
        now = time.monotonic()
        with self.lock:
            first = self.since is None
            if first:
                self.since = now
                self.reason = scrub(_reason(exc), self.url)
            since, reason = self.since, self.reason
        where = redact(self.url)
        if first:
            self.notify(
                f"warning: storage {where} unreachable ({reason}); "
                f"retrying for up to {self.grace_s:.0f} s"
            )
        waited = now - since
        if waited >= self.grace_s:
            raise StorageUnavailable(
                f"storage {where} unreachable for {waited:.0f} s ({reason}); "
                "rerun the same command to resume"
            ) from exc
        return self.grace_s - waited

    def up(self) -> None:
        if self.since is None:  # the usual case: no lock taken
            return
        now = time.monotonic()
        with self.lock:
            if self.since is None:
                return
            took = now - self.since
            self.since = None
            self.ended = now
        self.notify(f"storage {redact(self.url)} reachable again after {took:.1f} s; continuing")


class _Spent:
    """Tokens of this storage's calls that have returned: their receipts can go."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: set[str] = set()


class _Receipt:
    """One exactly-once call's token, and the earlier receipts its last attempt deleted."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.written = False  # an attempt wrote it (a trial taken by another worker: none did)
        self.dropped: frozenset[str] = frozenset()


class ResilientRDBStorage(RDBStorage):
    """An `RDBStorage` whose calls wait out a lost database connection (see the module doc).

    `notify` receives the lines an operator sees: one when an outage begins, one when it ends.
    """

    def __init__(
        self,
        url: str,
        engine_kwargs: dict[str, Any] | None = None,
        *,
        outage_grace_s: float = OUTAGE_GRACE_S,
        notify: Callable[[str], None] = _to_stderr,
        **kwargs: Any,
    ) -> None:
        self._spent = _Spent()
        super().__init__(url, engine_kwargs, **kwargs)
        self._outage = _Outage(self.url, outage_grace_s, notify)
        RECEIPTS.metadata.create_all(self.engine)  # beside Optuna's tables, made the same way
        _quiet_reset(self.engine)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        # locks do not pickle; a copy starts without an outage and with no receipts to delete
        outage = state.pop("_outage")
        state["_outage"] = (outage.grace_s, outage.notify)
        del state["_spent"]
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        state["_outage"] = _Outage(state["url"], *state["_outage"])
        state["_spent"] = _Spent()
        super().__setstate__(state)
        _quiet_reset(self.engine)

    # ------------------------------------------------------------------ the retry loop

    def _call(self, attempt: Callable[[], T], recover: Callable[[], tuple[bool, T]] | None = None):
        """`attempt()` until it succeeds; after a lost connection, `recover()` first says
        whether the failed attempt had in fact committed (and what it returned)."""
        pause = FIRST_PAUSE_S
        contention = 0
        unsure = False  # an earlier attempt failed: it may or may not have committed
        while True:
            try:
                if unsure and recover is not None:
                    done, value = recover()
                    if done:
                        self._outage.up()
                        return value
                value = attempt()
            except Exception as e:
                kind = classify(e)
                if kind is None:
                    self._outage.up()  # the database answered, with an error of its own
                    raise
                unsure = True
                if kind == "contention":
                    contention += 1
                    if contention >= CONTENTION_RETRIES:
                        raise
                    time.sleep(random.random() * 2.0)
                    continue
                left = self._outage.down(e)
                time.sleep(min(left, pause * random.uniform(0.75, 1.25)))
                pause = min(2 * pause, MAX_PAUSE_S)
                continue
            self._outage.up()
            return value

    # ------------------------------------------------------------------ repeated as they are

    def _retried(name: str) -> Callable[..., Any]:  # builds the methods below, then deleted
        plain = getattr(RDBStorage, name)

        @functools.wraps(plain)
        def method(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
            return self._call(lambda: plain(self, *args, **kwargs))

        return method

    # reads
    get_study_id_from_name = _retried("get_study_id_from_name")
    get_study_name_from_id = _retried("get_study_name_from_id")
    get_study_directions = _retried("get_study_directions")
    get_study_user_attrs = _retried("get_study_user_attrs")
    get_study_system_attrs = _retried("get_study_system_attrs")
    get_trial_user_attrs = _retried("get_trial_user_attrs")
    get_trial_system_attrs = _retried("get_trial_system_attrs")
    get_all_studies = _retried("get_all_studies")
    get_trial_param = _retried("get_trial_param")
    get_trial_id_from_study_id_trial_number = _retried("get_trial_id_from_study_id_trial_number")
    get_trial = _retried("get_trial")
    _get_best_trial_id = _retried("_get_best_trial_id")
    # writes of a value under a key (upserts; a repeated parameter insert is ignored)
    set_study_user_attr = _retried("set_study_user_attr")
    set_study_system_attr = _retried("set_study_system_attr")
    set_trial_user_attr = _retried("set_trial_user_attr")
    set_trial_system_attr = _retried("set_trial_system_attr")
    set_trial_intermediate_value = _retried("set_trial_intermediate_value")
    _set_trial_param = _retried("_set_trial_param")  # behind set_trial_param
    del _retried

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        """Behind get_all_trials and Optuna's trial cache; see _QuietFallback."""
        quiet = _filter_once(logging.getLogger("optuna.storages._rdb.storage"), _QuietFallback)

        def attempt() -> list[FrozenTrial]:
            quiet.inside.on = True
            try:
                return RDBStorage._get_trials(self, *args, **kwargs)
            finally:
                quiet.inside.on = False

        return self._call(attempt)

    # ------------------------------------------------------------------ heartbeat

    def record_heartbeat(self, trial_id: int) -> None:
        # One attempt per beat, and no exception for a lost connection: Optuna's heartbeat
        # thread dies on one (with a traceback), and it is joined when the trial ends, so a retry
        # loop here would hold up even Ctrl-C. A missed beat is harmless: the next one follows
        # after the heartbeat interval, shorter than the grace period.
        try:
            RDBStorage.record_heartbeat(self, trial_id)
        except Exception as e:
            if classify(e) is None:
                raise
            try:
                self._outage.down(e)  # the outage is noted (and announced) all the same
            except StorageUnavailable:
                pass  # the main thread ends the worker at its next storage call
            return
        self._outage.up()

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = self._call(lambda: RDBStorage._get_stale_trial_ids(self, study_id))
        ended = self._outage.ended
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        if stale and ended is not None and time.monotonic() - ended < grace:
            return []  # heartbeats are old because of the outage, not because workers died
        return stale

    # ------------------------------------------------------------------ exactly once

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        # Optuna names only a study created without a name; "" is a name like any other
        name = DEFAULT_STUDY_NAME_PREFIX + str(uuid.uuid4()) if study_name is None else study_name
        receipt = _Receipt()

        def recover() -> tuple[bool, int | None]:
            study_id = self._owner(receipt)
            return study_id is not None, study_id

        return self._once(receipt, lambda: self._insert_study(directions, name, receipt), recover)

    def _insert_study(
        self, directions: Sequence[StudyDirection], name: str, receipt: _Receipt
    ) -> int:
        """Optuna's `create_new_study` transaction, plus the receipt."""
        try:
            with _create_scoped_session(self.scoped_session) as session:
                study = models.StudyModel(
                    study_name=name,
                    directions=[
                        models.StudyDirectionModel(objective=objective, direction=d)
                        for objective, d in enumerate(directions)
                    ],
                )
                session.add(study)
                session.flush()  # the name's uniqueness is checked here, and the id assigned
                study_id = study.study_id
                self._write_receipt(session, receipt, study_id)
        except sqlalchemy.exc.IntegrityError:
            raise optuna.exceptions.DuplicatedStudyError(
                f"Another study with name '{name}' already exists."
            ) from None
        optuna.logging.get_logger("optuna.storages._rdb.storage").info(
            f"A new study created in RDB with name: {name}"
        )
        return study_id

    def delete_study(self, study_id: int) -> None:
        def recover() -> tuple[bool, None]:
            try:
                RDBStorage.get_study_name_from_id(self, study_id)
            except KeyError:
                return True, None  # gone: the failed attempt had deleted it
            return False, None

        self._call(lambda: RDBStorage.delete_study(self, study_id), recover)

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        receipt = _Receipt()

        def recover() -> tuple[bool, FrozenTrial | None]:
            trial_id = self._owner(receipt)
            if trial_id is None:
                return False, None
            return True, RDBStorage.get_trial(self, trial_id)

        return self._once(
            receipt, lambda: self._insert_trial(study_id, template_trial, receipt), recover
        )

    def _insert_trial(
        self, study_id: int, template: FrozenTrial | None, receipt: _Receipt
    ) -> FrozenTrial:
        """Optuna's `_create_new_trial` transaction, without its blind repeat loop, plus the
        receipt."""
        with _create_scoped_session(self.scoped_session) as session:
            # the study row lock serialises trial numbers between workers, as in Optuna
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            trial = self._get_prepared_new_trial(study_id, template, session)
            self._write_receipt(session, receipt, trial.trial_id)
            if template is not None:
                frozen = copy.deepcopy(template)
                frozen.number = trial.number
                frozen.datetime_start = trial.datetime_start
                frozen._trial_id = trial.trial_id
            else:
                frozen = FrozenTrial(
                    number=trial.number,
                    state=trial.state,
                    value=None,
                    values=None,
                    datetime_start=trial.datetime_start,
                    datetime_complete=None,
                    params={},
                    distributions={},
                    user_attrs={},
                    system_attrs={},
                    intermediate_values={},
                    trial_id=trial.trial_id,
                )
        return frozen

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        receipt = _Receipt()

        def recover() -> tuple[bool, bool]:
            return self._owner(receipt) == trial_id, True

        return self._once(
            receipt, lambda: self._set_state(trial_id, state, values, receipt), recover
        )

    def _set_state(
        self,
        trial_id: int,
        state: TrialState,
        values: Sequence[float] | None,
        receipt: _Receipt,
    ) -> bool:
        """Optuna's `set_trial_state_values` transaction, plus the receipt."""
        try:
            with _create_scoped_session(self.scoped_session) as session:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                self.check_trial_is_updatable(trial_id, trial.state)
                if state == TrialState.RUNNING and trial.state != TrialState.WAITING:
                    return False  # another worker took this queued trial
                self._write_receipt(session, receipt, trial_id)
                for objective, value in enumerate(values or ()):
                    self._set_trial_value_without_commit(session, trial, objective, value)
                trial.state = state
                if state == TrialState.RUNNING:
                    trial.datetime_start = datetime.now()
                if state.is_finished():
                    trial.datetime_complete = datetime.now()
        except sqlalchemy.exc.IntegrityError:
            return False
        return True

    # ------------------------------------------------------------------ receipts

    def _once(
        self,
        receipt: _Receipt,
        attempt: Callable[[], T],
        recover: Callable[[], tuple[bool, T]],
    ) -> T:
        """`_call` for a transaction that writes `receipt`; afterwards the receipt is spent."""
        try:
            value = self._call(attempt, recover)
        except BaseException:
            # an attempt may have committed all the same: its receipt goes with the next one
            if receipt.written:
                with self._spent.lock:
                    self._spent.tokens.add(receipt.token)
            raise
        with self._spent.lock:
            self._spent.tokens -= receipt.dropped
            if receipt.written:
                self._spent.tokens.add(receipt.token)
        return value

    def _write_receipt(self, session: Any, receipt: _Receipt, owner_id: int) -> None:
        """In the attempt's transaction: its receipt, and the deletion of the receipts of this
        storage's calls that have returned (nothing will look them up again)."""
        with self._spent.lock:
            receipt.dropped = frozenset(self._spent.tokens)
        if receipt.dropped:
            session.execute(RECEIPTS.delete().where(RECEIPTS.c.token.in_(sorted(receipt.dropped))))
        session.execute(RECEIPTS.insert().values(token=receipt.token, owner_id=owner_id))
        receipt.written = True

    def _owner(self, receipt: _Receipt) -> int | None:
        """The study or trial of `receipt`, if an earlier attempt committed it (after a failed
        attempt); that attempt's deletions are unknown, so they are repeated with the next."""
        receipt.dropped = frozenset()
        with _create_scoped_session(self.scoped_session) as session:
            row = session.execute(
                sqlalchemy.select(RECEIPTS.c.owner_id).where(RECEIPTS.c.token == receipt.token)
            ).one_or_none()
        return None if row is None else row[0]


def open_waiting(
    make: Callable[[], T],
    url: str,
    outage_grace_s: float,
    notify: Callable[[str], None] = _to_stderr,
) -> T:
    """`make()` (which opens a storage), tried again while the connection is lost, for up to
    `outage_grace_s`: for a process that re-opens a storage that already worked (a worker)."""
    outage = _Outage(url, outage_grace_s, notify)
    pause = FIRST_PAUSE_S
    while True:
        try:
            storage = make()
        except Exception as e:
            if classify(e) != "lost":
                raise
            left = outage.down(e)
            time.sleep(min(left, pause * random.uniform(0.75, 1.25)))
            pause = min(2 * pause, MAX_PAUSE_S)
            continue
        outage.up()
        return storage
