"""Shared fixtures: real PostgreSQL databases, a real `mlflow server`, a temporary sweeper home.
The plain helpers (the real CLI as a subprocess, specs, the server itself) are in helpers.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from helpers import PG_ADMIN_URL, REQUIRE_POSTGRES, MlflowServer, PgBouncer, pg_admin, pgbouncer_binary


@pytest.fixture(scope="session")
def postgres_available() -> None:
    try:
        pg_admin().close()
    except Exception as e:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required (SWEEPER_REQUIRE_POSTGRES=1) but unreachable at {PG_ADMIN_URL}: {e}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL} ({e}); set SWEEPER_TEST_PG to run these tests")


@pytest.fixture
def pg_database(postgres_available):
    """A factory of fresh PostgreSQL databases, dropped when the test ends; returns their URLs."""
    created: list[str] = []

    def make() -> str:
        name = f"sweeper_test_{uuid.uuid4().hex[:10]}"
        conn = pg_admin()
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
        conn.close()
        created.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    conn = pg_admin()
    for name in created:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture
def pgbouncer(postgres_available, tmp_path):
    """pgbouncer(pool_size=3, **settings) -> a running PgBouncer in transaction pooling mode in
    front of the test PostgreSQL (see helpers.PgBouncer); every one started is stopped at the end.
    Skipped when pgbouncer is not installed, unless SWEEPER_REQUIRE_POSTGRES=1 (CI)."""
    if pgbouncer_binary() is None:
        message = "pgbouncer is not installed (apt-get install pgbouncer)"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{message}: SWEEPER_REQUIRE_POSTGRES=1 needs it for the connection pooler tests")
        pytest.skip(message)
    started: list[PgBouncer] = []

    def start(pool_size: int = 3, **settings) -> PgBouncer:
        root = tmp_path / f"pgbouncer-{len(started)}"
        root.mkdir()
        started.append(PgBouncer(root, pool_size, **settings))
        return started[-1].start()

    yield start
    for bouncer in started:
        bouncer.stop()


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory) -> Path:
    """precision=auto's measured choices go to a cache of the test session, not the user's."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["SWEEPER_CACHE_DIR"] = str(path)  # subprocesses inherit it
    return path


@pytest.fixture
def sweeper_env(tmp_path, monkeypatch) -> dict[str, str]:
    """An environment whose embedded stores live in this test's temp folder."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(SWEEPER_HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    monkeypatch.setenv("SWEEPER_HOME", str(home))
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return env


@pytest.fixture
def mlflow_server(tmp_path):
    """Start with `mlflow_server()`; every server started is stopped when the test ends."""
    servers: list[MlflowServer] = []

    def start(**kwargs) -> MlflowServer:
        root = tmp_path / f"mlflow-{len(servers)}"
        root.mkdir()
        server = MlflowServer(root, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
