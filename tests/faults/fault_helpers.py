"""Plain helpers of the fault suite (its fixtures are in conftest.py): real worker processes
whose log lines tests wait on, processes that start at the same instant for races, quick
look-ups of the queue, the check that a cell's MLflow run is whole, PostgreSQL outages, and an
`mlflow server` with basic auth."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MlflowServer, pg_admin

# One cell used by most tests: tiny model, tiny data, 3 epochs (a few seconds per epoch on CPU).
EPOCHS = 3
CELL = dict(variant="short4", dataset="digits", seed=1)
FAST = ["--heartbeat-interval", "1", "--device", "cpu", "--precision", "fp32", "--no-system-metrics"]


class Proc:
    """A real `sweeper ...` subprocess; stdout and stderr go to a log file that tests wait on."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, prefix: tuple[str, ...] = ()):
        """``prefix``: what runs it (``ip netns exec HOST`` for a worker on another host)."""
        self.args, self.log = args, log
        self._fh = open(log, "ab")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "sweeper", *args],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 180, after: int = 0) -> re.Match:
        """Wait until the log matches ``pattern`` (a regex, searched from offset ``after``)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text(), after)
            if m:
                return m
            if self.popen.poll() is not None:
                m = rx.search(self.text(), after)
                if m:
                    return m
                raise AssertionError(
                    f"{self} exited {self.popen.returncode} before logging {pattern!r}:\n{self.text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self} did not log {pattern!r} within {timeout}s:\n{self.text()}")
            time.sleep(0.05)

    def send(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self} still running after {timeout}s:\n{self.text()}") from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self._fh.close()

    def __repr__(self) -> str:
        return f"`sweeper {' '.join(self.args[:3])}` (pid {self.popen.pid})"


READY_THEN_RUN = """
import os, sys, time
import mlflow.tracking, optuna, psycopg2, sqlalchemy, torch  # the slow imports, before the start line
from sweeper import cli, launcher, spec, tracking
from sweeper.storage import connect
from sweeper.trials import claims, enqueue
ready, go = sys.argv[1:3]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
sys.argv = ["sweeper", *sys.argv[3:]]
cli.main()
"""


def run_together(tmp_path: Path, env: dict[str, str], *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Real `sweeper ...` processes that import everything first, then start at the same instant
    (all wait on one start file), for races; returns each finished process with its output."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = []
    for i, args in enumerate(commands):
        ready = go.with_name(f"{go.name}-ready-{i}")
        popen = subprocess.Popen(
            [sys.executable, "-c", READY_THEN_RUN, str(ready), str(go), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((ready, popen))
    deadline = time.monotonic() + 600  # the imports take minutes on a busy 2-core machine
    while not all(ready.exists() for ready, _ in procs):
        if time.monotonic() > deadline or any(p.poll() is not None for _, p in procs):
            for _, p in procs:
                p.kill()
            raise AssertionError([p.communicate() for _, p in procs])
        time.sleep(0.01)
    go.touch()
    done = []
    for (_, p), args in zip(procs, commands):
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return done


def enqueue(spec_path: Path, storage_url: str | None = None) -> None:
    """What `sweeper launch` does to the queue (the launch race test runs the real command)."""
    from sweeper import spec
    from sweeper.storage import connect
    from sweeper.trials import enqueue

    enqueue.enqueue_study(connect.open_storage(storage_url), spec.load(str(spec_path)))


def cli(*args: str, env: dict[str, str] | None = None, code: int | None = 0):
    """The real CLI in this process (click's runner): for quick status/retry look-ups."""
    from click.testing import CliRunner

    from sweeper.cli import cli as command

    result = CliRunner().invoke(command, list(args), env=env, catch_exceptions=False)
    if code is not None:
        assert result.exit_code == code, f"sweeper {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    return result


def storage_of(url: str, grace_period: int = 60):
    from sweeper.storage import connect

    return connect.open_storage(url, heartbeat_interval=1, grace_period=grace_period)


def trials_of(url: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=storage_of(url)).get_trials(deepcopy=False)


def assert_cell_run(client, run_id: str, reference: list[dict], resumed_from: int | None = None) -> None:
    """The cell's MLflow run is FINISHED, has each epoch logged exactly once (in order), a
    checkpoint artifact, and the same per-epoch numbers as the uninterrupted reference run."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.info
    for metric in ("train_loss", "test_loss", "top1_error", "top5_error"):
        history = client.get_metric_history(run_id, metric)
        steps = [m.step for m in history]
        assert sorted(steps) == list(range(1, len(reference) + 1)), f"{metric}: steps logged {steps}"
        by_time = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
        assert by_time == sorted(by_time), f"{metric}: logged out of order {by_time}"
        for m in history:
            expected = reference[m.step - 1][metric]
            assert m.value == pytest.approx(expected, abs=1e-6), f"{metric} at epoch {m.step}: {m.value} != {expected}"
    names = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
    assert names == ["checkpoint/last.pt"], names
    if resumed_from is not None:
        assert run.data.tags.get("sweeper.resumed_from_epoch") == str(resumed_from), run.data.tags


class PgOutage:
    """Make one PostgreSQL database unusable for a while: new connections refused
    (ALLOW_CONNECTIONS false) and every open one terminated with pg_terminate_backend."""

    def __init__(self, url: str):
        self.db = url.rsplit("/", 1)[1]
        self.admin = pg_admin()

    def terminate(self) -> int:
        cur = self.admin.cursor()
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.db,),
        )
        return cur.fetchone()[0]

    def block(self) -> int:
        self.admin.cursor().execute(f'ALTER DATABASE "{self.db}" ALLOW_CONNECTIONS false')
        return self.terminate()

    def unblock(self) -> None:
        self.admin.cursor().execute(f'ALTER DATABASE "{self.db}" ALLOW_CONNECTIONS true')

    def close(self) -> None:
        self.unblock()
        self.admin.close()


class AuthMlflowServer(MlflowServer):
    """`mlflow server --app-name basic-auth` (users in a SQLite database), admin account set."""

    ADMIN, PASSWORD = "admin", "Sweeper-admin-Passw0rd!"

    def app_args(self) -> list[str]:
        return ["--app-name", "basic-auth"]

    def app_env(self) -> dict[str, str]:
        config = self.root / "basic_auth.ini"
        config.write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.root / 'auth.db'}\n"
            f"admin_username = {self.ADMIN}\nauthorization_function = "
            "mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "sweeper-tests",
        }
