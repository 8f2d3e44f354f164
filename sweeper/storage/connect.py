"""Opening the Optuna storage: its URL, the schema checks, SQLite made safe for several
processes, and the studies it holds."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

from sweeper import settings
from sweeper.contract import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL
from sweeper.errors import SweeperError, root_cause
from sweeper.names import SPEC_ATTR
from sweeper.redact import quote_password, redact, redact_url, remember
from sweeper.storage.locks import schema_lock
from sweeper.storage.stale import MAX_RETRY, RetryCallback


def default_storage_url() -> str:
    return f"sqlite:///{settings.home() / 'optuna.db'}"


def resolve_storage_url(url: str | None) -> str:
    return quote_password(remember(url or settings.storage_url() or default_storage_url()))


def open_storage(
    url: str | None = None,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int = DEFAULT_GRACE_PERIOD,
    max_retry: int = MAX_RETRY,
    stall_timeout: float | None = None,
    create: bool = True,
) -> RDBStorage:
    """An RDBStorage with heartbeats, retries of dead workers' trials, and SQLite made safe for
    several processes (write transactions take the lock up front and wait for it).

    ``create=False`` (commands that only read): a SQLite file that does not exist is an error
    naming where it was looked for, instead of a new empty store.

    ``stall_timeout`` (workers pass their grace period): on PostgreSQL, the server ends a session
    of this process that sits idle inside a transaction that long, so a frozen worker (a paused
    VM, SIGSTOP) cannot hold row locks that the workers retrying its trial wait on; and this
    process notices a dead connection within a quarter of it whatever the network does (TCP
    keepalives and user timeout: a partition that drops packets costs seconds, not the kernel's
    ~15 minutes of retransmissions), the bound a worker's lease on its trial relies on. Its
    connections are not pinged before each use (a transaction of its own for PostgreSQL, as many
    as the worker's real ones): a worker retries every storage call through a database error
    (``dberrors.retry_db``), and the error itself makes SQLAlchemy drop the pool's dead connections.

    PostgreSQL URLs may go through a transaction-pooling PgBouncer (docs/DEPLOY.md,
    "Connections"): no startup parameters, no session state, no server-side prepared statements."""
    url = resolve_storage_url(url)
    sqlite = url.startswith("sqlite")
    if sqlite:
        check_sqlite_file(sqlite_path(url), "Optuna storage", "--storage / SWEEPER_STORAGE", create)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": not stall_timeout, "connect_args": {"connect_timeout": 10}}
        if stall_timeout:
            engine_kwargs["connect_args"].update(dead_connection_args(stall_timeout / 4))
            engine_kwargs["connect_args"]["connect_timeout"] = min(10, max(2, int(stall_timeout / 4)))
        if _driver(url) == "psycopg":  # psycopg 3 prepares a query server-side after 5 runs
            engine_kwargs["connect_args"]["prepare_threshold"] = None
    try:
        # Experimental in Optuna (heartbeats, the retry callback), relied on knowingly: its
        # ExperimentalWarning would only reach a user (every command, every sweeper.api call).
        # A reader writes no lock file.
        lock_file = sqlite_path(url) if sqlite and create else None
        with schema_lock(url, engine_kwargs, lock_file) as ready, warnings.catch_warnings():
            # A made schema has the tables: looked for only when it is not (a connection fewer per open).
            if not create and not sqlite and not ready and not _has_schema(url, engine_kwargs):
                raise NoStore(
                    f"the Optuna storage {redact_url(url)} holds no study yet (it has no Optuna tables); check the "
                    "URL (--storage / SWEEPER_STORAGE), or start a study with `sweeper launch --study SPEC`"
                )
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryCallback(max_retry=max_retry),
                # Optuna's own check holds a connection in a transaction while it takes a second one:
                # openers at one instant on a small pooler pool then wait on each other for ever
                # (benchmarks/fleet.py, 200 workers). A made schema is checked here, one at a time.
                skip_table_creation=ready,
                skip_compatibility_check=ready,
            )
            if ready:
                _check_schema_version(storage)
    except SweeperError:
        raise
    except RuntimeError as e:  # Optuna's message for an old schema names the upgrade command
        raise SweeperError(
            f"the Optuna storage {redact_url(url)} cannot be used: {redact(e)} Stop every worker, back up the "
            f"database, then run `optuna storage upgrade --storage URL` with this storage's URL."
        ) from None
    except Exception as e:
        raise SweeperError(
            f"cannot open the Optuna storage {redact_url(url)}: {redact(root_cause(e))}. "
            "Check that the database server is running and the URL (--storage / SWEEPER_STORAGE) is right."
        ) from None
    if sqlite:
        _serialize_sqlite_writes(storage)
    elif stall_timeout and url.startswith("postgresql"):
        _end_stalled_transactions(storage, stall_timeout)
    return storage


def _check_schema_version(storage: RDBStorage) -> None:
    """Optuna's compatibility check, through its public version calls (one connection at a time)."""
    current, head = storage.get_current_version(), storage.get_head_version()
    if current != head:
        raise RuntimeError(
            f"The runtime optuna version {optuna.__version__} is no longer compatible with the table "
            f"schema (revision {current}, this Optuna needs {head})."
        )


def dead_connection_args(within: float) -> dict[str, int]:
    """libpq's settings (psycopg 2 and 3 pass them on) that end a connection the network stopped
    answering within about ``within`` seconds: data left unacknowledged that long (a query sent
    into a partition), or an idle connection whose keepalive probes go unanswered."""
    within = max(int(within), 2)
    return {
        "keepalives": 1,
        "keepalives_idle": max(within // 2, 1),
        "keepalives_interval": 1,
        "keepalives_count": max(within - within // 2, 1),
        "tcp_user_timeout": within * 1000,
    }


def _driver(url: str) -> str:
    """The DBAPI driver a URL gets (plain postgresql:// is psycopg 3 on SQLAlchemy 2.1)."""
    from sqlalchemy.engine import make_url

    return make_url(url).get_dialect().driver


def _end_stalled_transactions(storage: RDBStorage, stall_timeout: float) -> None:
    """Every transaction starts with SET LOCAL idle_in_transaction_session_timeout: scoped to the
    transaction, so it works through a transaction pooler, which refuses the ``options`` startup
    parameter and hands the session to other clients between transactions."""
    from sqlalchemy import event

    statement = f"SET LOCAL idle_in_transaction_session_timeout = {int(stall_timeout * 1000)}"

    @event.listens_for(storage.engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql(statement)


class NoStore(SweeperError):
    """A command that only reads or steers found no Optuna storage there, and created none."""


def _has_schema(url: str, engine_kwargs: dict[str, Any]) -> bool:
    """Whether a database server's storage holds Optuna's tables (RDBStorage would create them)."""
    import sqlalchemy

    kwargs = {k: v for k, v in engine_kwargs.items() if k != "pool_pre_ping"}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **kwargs)
    try:
        return sqlalchemy.inspect(engine).has_table("studies")
    finally:
        engine.dispose()


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for an in-memory database)."""
    path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def check_sqlite_file(path: Path | None, what: str, option: str, create: bool) -> None:
    """A missing file is created only by commands that write; a read-only one is refused up front
    (SQLite would fail at the first write, inside Optuna or MLflow, with a traceback)."""
    if path is None:
        return
    if not path.exists():
        if not create:
            raise NoStore(
                f"no {what} at {path}; run from the folder you launched in, set SWEEPER_HOME to that "
                f"launch's home (now {settings.home()}), or pass {option}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, path.parent):  # SQLite writes its journal beside the file
        if target.exists() and not os.access(target, os.W_OK):
            raise SweeperError(
                f"the {what} {path} is read-only ({'file' if target == path else 'its folder'} {target} cannot be "
                f"written); make it writable (chmod u+w {target}, or remount it read-write), or set SWEEPER_HOME "
                f"to a writable copy of {path.parent}"
            )


def _serialize_sqlite_writes(storage: RDBStorage) -> None:
    """BEGIN IMMEDIATE + WAL: concurrent writers queue on the busy timeout instead of failing
    with "database is locked" when two deferred transactions both try to upgrade their lock."""
    from sqlalchemy import event

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed


def load_study(storage: RDBStorage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SweeperError(unknown_study(name, study_names(storage))) from None


def unknown_study(name: str, known: list[str]) -> str:
    """No such study: the message names the studies there are, the closest to ``name`` first."""
    import difflib

    if not known:
        return f"no study named {name!r}: this storage holds no study yet; start one with `sweeper launch --study SPEC`"
    ranked = difflib.get_close_matches(name, known, n=len(known), cutoff=0.0)
    return f"no study named {name!r} in this storage; known studies: {', '.join(ranked)}"


def open_study(name: str, url: str | None = None) -> optuna.Study:
    """An existing study, for the commands that read or steer one: where there is no store, or
    no such study in it, they create nothing (no home, database, lock file or tables)."""
    try:
        storage = open_storage(url, create=False)
    except NoStore as e:
        raise SweeperError(f"no study named {name!r}: {e}") from None
    return load_study(storage, name)


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def stored_spec(study: optuna.Study) -> dict[str, Any]:
    spec = study.user_attrs.get(SPEC_ATTR)
    if spec is None:
        raise SweeperError(f"study {study.study_name!r} was not created by `sweeper launch`")
    return spec
