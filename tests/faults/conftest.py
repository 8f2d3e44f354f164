"""Fixtures of the fault suite: real worker processes whose log lines we wait on, one shared
`mlflow server` per session (stopped and restarted by the outage test), PostgreSQL outages,
and the reference result of an uninterrupted run. The plain helpers are in fault_helpers.py.

Everything here drives real processes; nothing is mocked except the one in-process OOM test.
"""

from __future__ import annotations

import os
import signal

import pytest
from fault_helpers import CELL, EPOCHS, AuthMlflowServer, PgOutage, Proc
from helpers import MlflowServer


@pytest.fixture
def spawn(tmp_path):
    """spawn(*args, env=...) -> Proc; every process still running when the test ends is killed."""
    procs: list[Proc] = []

    def start(*args: str, env: dict[str, str], name: str | None = None, host=None) -> Proc:
        """``host``: a tests/hosts.py Host the process runs on (its network namespace)."""
        log = tmp_path / f"{name or args[0]}-{len(procs) + 1}.log"
        proc = Proc(list(args), env, log, prefix=("ip", "netns", "exec", host.name) if host else ())
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """One real `mlflow server` (SQLite backend, proxied artifacts) for the whole suite. The outage
    test stops and restarts it on the same port; every test gets it running."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root).start()
    yield server
    if server.proc.poll() is None:  # no need for a clean shutdown at the end
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


@pytest.fixture
def tracking(tracking_server):
    if tracking_server.proc is None or tracking_server.proc.poll() is not None:
        tracking_server.start()
    return tracking_server


@pytest.fixture(scope="session")
def reference():
    """reference(seed, epochs) -> per-epoch history of an uninterrupted run of the cell: the same
    code path as a worker (seed, build, fit) on CPU in fp32 with one thread, like the workers."""
    cache: dict[tuple[int, int], list[dict]] = {}

    def get(seed: int = 1, epochs: int = EPOCHS) -> list[dict]:
        if (seed, epochs) not in cache:
            from dataclasses import asdict

            import torch

            from sweeper.data import load
            from sweeper.models import build_model
            from sweeper.train import Recipe, fit, seed_everything

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                recipe = Recipe(epochs=epochs, seed=seed, limit_train=256, limit_test=128)
                splits = load(CELL["dataset"]).limit(recipe.limit_train, recipe.limit_test)
                seed_everything(seed)
                model = build_model(CELL["variant"], splits.num_classes, splits.in_channels)
                result = fit(model, splits, recipe, device="cpu", precision="fp32")
            finally:
                torch.set_num_threads(threads)
            cache[(seed, epochs)] = [asdict(m) for m in result.history]
        return cache[(seed, epochs)]

    return get


@pytest.fixture
def pg_outage(pg_database):
    outages: list[PgOutage] = []

    def make(url: str) -> PgOutage:
        outages.append(PgOutage(url))
        return outages[-1]

    yield make
    for outage in outages:
        outage.close()  # before pg_database drops the database


@pytest.fixture
def auth_server(tmp_path):
    try:
        import flask_wtf  # noqa: F401  (the basic-auth app refuses to start without it)
    except ImportError:
        pytest.skip("`mlflow server --app-name basic-auth` needs Flask-WTF: pip install 'mlflow[auth]'")
    root = tmp_path / "mlflow-auth"
    root.mkdir()
    server = AuthMlflowServer(root).start()
    yield server
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
