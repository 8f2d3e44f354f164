"""Sweeper's one lock helper: exclusive file locks (``flock``, one machine) and PostgreSQL advisory
locks (every host of a cluster). A lock dies with its holder: the kernel drops a dead process's
``flock``, the server a dead connection's advisory lock.

Standard library only at import: the dataset and precision caches use it without Optuna.
"""

from __future__ import annotations

import contextlib
import fcntl
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
    """A PostgreSQL advisory lock on one connection of ``engine``, waited for."""
    from sqlalchemy import text

    key = lock_key(name)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


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
def schema_lock(url: str, engine_kwargs: dict[str, Any], sqlite_file: Path | None) -> Iterator[None]:
    """One process at a time creates or checks the schema: RDBStorage's create_all and alembic
    stamp are not safe when two processes start on a fresh database (two `sweeper launch` at
    once would both stamp alembic_version). PostgreSQL: an advisory lock; SQLite: a file lock
    next to the database file (None: no lock, e.g. a reader that must write no lock file)."""
    if not url.startswith("postgresql"):
        with file_lock(Path(f"{sqlite_file}.lock")) if sqlite_file else contextlib.nullcontext():
            yield
        return
    import sqlalchemy

    kwargs = {k: v for k, v in engine_kwargs.items() if k != "pool_pre_ping"}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **kwargs)
    try:
        with advisory_lock(engine, SCHEMA_LOCK):
            yield
    finally:
        engine.dispose()
