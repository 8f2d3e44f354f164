"""Sweeper's one lock helper: exclusive file locks (``flock``, one machine) and PostgreSQL advisory
locks (every host of a cluster). A lock dies with its holder: the kernel drops a dead process's
``flock``, the server a dead connection's advisory lock.

The waited-for advisory locks are transaction-scoped, so they hold behind a transaction-pooling
PgBouncer too (docs/DEPLOY.md, "Connections"); a session-level one, held for a worker's life, is
taken only where no pooler stands between (``behind_pooler``).

Standard library only at import: the dataset and precision caches use it without Optuna.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import random
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

SCHEMA_LOCK = "sweeper.optuna-schema"


def hold_file_lock(path: Path, wait: bool = True, create: bool = True) -> IO | None:
    """An exclusive ``flock`` on ``path``, held by the returned open file until it is closed.

    ``wait=False``: None at once when another process holds it. ``create=False``: the file must
    exist (FileNotFoundError otherwise), so probing another holder's lock never recreates it."""
    f = open(path, "a" if create else "r")
    try:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return f


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing), held across processes of one machine."""
    f = hold_file_lock(path)
    assert f is not None  # a waiting lock always comes
    with f:
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_key(name: str) -> int:
    """The advisory-lock key of a lock name (the same on every host)."""
    return zlib.crc32(name.encode())


@contextlib.contextmanager
def advisory_lock(engine: Any, name: str) -> Iterator[None]:
    """A PostgreSQL advisory lock, waited for, held by one open transaction of ``engine`` for the
    block.

    Safe behind a transaction-pooling PgBouncer: the lock lives exactly as long as the
    transaction (which keeps its server connection), and a waiter retries the try outside any
    transaction, holding no server connection; a waiter blocked in pg_advisory_lock would, and a
    few of them take the pool's connections that the holder needs to finish."""
    from sqlalchemy import text

    key, delay = lock_key(name), 0.02
    with engine.connect() as conn:
        while not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar():
            conn.rollback()
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            conn.rollback()  # releases the lock


def try_advisory_lock(url: str, name: str) -> Any | None:
    """A PostgreSQL advisory lock held by the returned connection (its own, until it closes), or
    None at once when another session holds it."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    conn = engine.connect()
    if conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(name)}).scalar():
        conn.commit()
        return conn
    conn.close()
    return None


@functools.cache
def behind_pooler(url: str) -> bool:
    """Whether connections to ``url`` go through a pooler such as PgBouncer: the server process
    that runs a query is not the one the connection announced at login (a pooler makes that one
    up), and a session-level lock would outlive the client's transaction on a shared connection."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            announced = conn.connection.dbapi_connection.info.backend_pid
            return conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar() != announced
    finally:
        engine.dispose()


@contextlib.contextmanager
def study_lock(storage: Any, name: str) -> Iterator[None]:
    """One launcher (or one worker creating the study's MLflow runs) at a time per study: a
    PostgreSQL advisory lock, or a file lock on SQLite."""
    from sweeper.storage import internals

    engine = internals.backend(storage).engine
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with advisory_lock(engine, f"sweeper.launch:{name}"):
            yield
    elif url.get_backend_name() == "sqlite" and url.database:
        with file_lock(Path(f"{url.database}.lock")):
            yield
    else:
        yield


@contextlib.contextmanager
def schema_lock(url: str, engine_kwargs: dict[str, Any], sqlite_file: Path | None) -> Iterator[bool]:
    """One process at a time creates or checks the schema: RDBStorage's create_all and alembic
    stamp are not safe when two processes start on a fresh database (two `sweeper launch` at
    once would both stamp alembic_version). PostgreSQL: an advisory lock, only while the schema
    is not made yet; SQLite: a file lock next to the database file (None: no lock, e.g. a reader
    that must write no lock file). Yields whether the PostgreSQL schema was made and stamped
    already (the storage then has nothing to create)."""
    if not url.startswith("postgresql"):
        with file_lock(Path(f"{sqlite_file}.lock")) if sqlite_file else contextlib.nullcontext():
            yield False
        return
    import sqlalchemy

    kwargs = {k: v for k, v in engine_kwargs.items() if k != "pool_pre_ping"}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **kwargs)
    try:
        ready = _schema_ready(engine)
        with contextlib.nullcontext() if ready else advisory_lock(engine, SCHEMA_LOCK):
            yield ready
    finally:
        engine.dispose()


def _schema_ready(engine: Any) -> bool:
    """Whether Optuna's schema is created and stamped: opening the storage then only reads it, and
    takes no lock (a lock's transaction holds a server connection that a small pool of a
    transaction pooler may need for the holders of other locks)."""
    import sqlalchemy

    with engine.connect() as conn:
        inspector = sqlalchemy.inspect(conn)
        if not all(inspector.has_table(t) for t in ("studies", "version_info", "alembic_version")):
            return False
        rows = "SELECT (SELECT count(*) FROM version_info) > 0 AND (SELECT count(*) FROM alembic_version) > 0"
        return bool(conn.execute(sqlalchemy.text(rows)).scalar())
