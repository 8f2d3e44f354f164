"""`sweeper ui`: the MLflow UI and optuna-dashboard for one study, on 127.0.0.1, until Ctrl-C.

Each server runs in its own process group (its own session), so Ctrl-C in the terminal reaches
`sweeper ui` alone, which then stops the groups as a whole (the MLflow server's uvicorn worker
included): SIGTERM to all at once, then SIGKILL for whatever is left after a few seconds. No
process outlives the command. When the tracking URI is already a server (http...), only its URL
is printed and only optuna-dashboard is started.

    >>> serve("quickstart", None, None, port=5000, dashboard_port=8080)   # doctest: +SKIP
    MLflow UI         http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=sweeper
    optuna-dashboard  http://127.0.0.1:8080/dashboard/studies/1

The MLflow link opens on the study's cells, best first, with the seed's columns (sweeper.views);
with ``compare="A,B"`` a third link opens on exactly those variants' or cells' runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sweeper import settings, tracking, views
from sweeper.errors import SweeperError
from sweeper.names import RECIPE_DIGEST_ATTR, SPEC_ATTR
from sweeper.redact import redact_url, strip_credentials
from sweeper.signals import StopSignal
from sweeper.storage import connect, internals

HOST = "127.0.0.1"
READY_TIMEOUT = 120.0  # seconds for both servers to answer (MLflow alone takes 10-60 s to start on 2 busy CPUs)
STOP_TIMEOUT = 8.0  # seconds between SIGTERM and SIGKILL for the servers' process groups


@dataclass
class Server:
    """One server subprocess, leader of its own process group."""

    name: str
    cmd: list[str]
    url: str  # what to poll for readiness
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # secrets go here, never into cmd (`ps` shows it)
    proc: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), **self.env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_all(servers: list[Server], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every server's process group at once, wait, SIGKILL whatever is left, reap."""
    started = [s for s in servers if s.proc is not None]
    for server in started:
        _signal_group(server.pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_group_alive(s.pgid, s.proc) for s in started):
        time.sleep(0.1)
    for server in started:
        if _group_alive(server.pgid, server.proc):
            _signal_group(server.pgid, signal.SIGKILL)
    end = time.monotonic() + 5
    while time.monotonic() < end and any(_group_alive(s.pgid, s.proc) for s in started):
        time.sleep(0.05)
    for server in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=1)
        server.close_log()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM if `sweeper ui` itself is killed without a chance to clean up."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the leader so a zombie does not count as alive
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _group_members(pgid) != []


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue  # gone while we looked
    return members


# --- helpers ---------------------------------------------------------------------------------


def check_port_free(port: int, what: str, option: str) -> None:
    """A clear error before starting anything when the port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise SweeperError(
                    f"port {port} on {HOST} is already in use, so the {what} cannot start there; "
                    f"stop what uses it or pass {option} N"
                ) from None
            raise SweeperError(f"cannot use port {port} on {HOST} for the {what}: {e}") from None


def answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(servers: list[Server], timeout: float = READY_TIMEOUT, stop: threading.Event | None = None) -> None:
    """Until every server answers HTTP; a server that exits or stays silent is a SweeperError."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for server in list(pending):
            if not server.alive():
                raise SweeperError(
                    f"the {server.name} exited before it answered (exit code "
                    f"{server.proc.returncode}); its log {server.log_path} ends with:\n"
                    f"{server.log_tail()}"
                )
            if answers(server.url):
                pending.remove(server)
        if not pending:
            return
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise SweeperError(
                f"{names} did not answer within {timeout:.0f}s; see " + ", ".join(str(s.log_path) for s in pending)
            )
        time.sleep(0.3)


def _executable(name: str) -> list[str]:
    """The console script beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    raise SweeperError(f"`{name}` is not installed; pip install {name}")


def mlflow_command(port: int, artifact_root: str | None) -> list[str]:
    """The backend store URI goes in MLFLOW_BACKEND_STORE_URI (see serve), not on the command line."""
    cmd = [
        *_executable("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifact_root:
        # Runs keep their own artifact location (file:// beside the database); the server reads
        # those directly. New experiments made through this UI get the same root.
        cmd += ["--default-artifact-root", artifact_root, "--no-serve-artifacts"]
    return cmd


def dashboard_command(config_path: Path, port: int) -> list[str]:
    """optuna-dashboard reads the storage URL from ``config_path`` (see dashboard_config)."""
    return [*_executable("optuna-dashboard"), "--from-config", str(config_path), "--host", HOST, "--port", str(port)]


def dashboard_config(storage_url: str) -> Path:
    """A TOML file readable by this user alone that gives optuna-dashboard the storage URL (it
    takes no environment variable, and an argument is public in `ps`). The caller deletes it."""
    import json
    import tempfile

    fd, path = tempfile.mkstemp(prefix="sweeper-dashboard-", suffix=".toml")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(f"[optuna_dashboard]\nstorage = {json.dumps(storage_url)}\n")
    return Path(path)


def _artifact_root(experiment, uri: str) -> str | None:
    if experiment is not None and experiment.artifact_location.startswith("file:"):
        return experiment.artifact_location
    if uri.startswith("sqlite:"):
        return (settings.home() / "mlartifacts").as_uri()
    return None


# --- the command ------------------------------------------------------------------------------


@dataclass
class Urls:
    mlflow: str
    dashboard: str
    compare: str | None = None


def serve(
    study_name: str,
    storage: str | None,
    tracking_uri: str | None,
    port: int = 5000,
    dashboard_port: int = 8080,
    *,
    ready_timeout: float = READY_TIMEOUT,
    on_ready: Callable[[Urls], None] | None = None,
    stop: threading.Event | None = None,
    compare: str | None = None,
) -> None:
    """Serve the study's MLflow experiment and Optuna study until Ctrl-C / SIGTERM (or ``stop``)."""
    url = connect.resolve_storage_url(storage)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.configure_http()
    study = connect.open_study(study_name, url)
    optuna_storage = internals.storage_of(study)
    study_id = optuna_storage.get_study_id_from_name(study.study_name)
    client = tracking.client(uri, create=False)
    tracking.check_reachable(client)
    experiment = client.get_experiment_by_name(study_name)
    remote = tracking.is_server(uri)

    if not remote:
        check_port_free(port, "MLflow UI", "--port")
    check_port_free(dashboard_port, "optuna-dashboard", "--dashboard-port")
    if not remote and port == dashboard_port:
        raise SweeperError("--port and --dashboard-port must differ")

    base = strip_credentials(uri).rstrip("/") if remote else f"http://{HOST}:{port}"
    mlflow_url, compare_url = _mlflow_links(client, base, experiment, study, storage, tracking_uri, compare)
    dashboard_url = f"http://{HOST}:{dashboard_port}/dashboard/studies/{study_id}"
    log_dir = settings.home() / "logs"
    servers = []
    if not remote:
        servers.append(
            Server(
                "MLflow UI",
                mlflow_command(port, _artifact_root(experiment, uri)),
                f"http://{HOST}:{port}/health",
                log_dir / "ui-mlflow.log",
                env={"MLFLOW_BACKEND_STORE_URI": uri},
            )
        )
    config = dashboard_config(url)
    servers.append(
        Server(
            "optuna-dashboard",
            dashboard_command(config, dashboard_port),
            f"http://{HOST}:{dashboard_port}/api/meta",
            log_dir / "ui-optuna-dashboard.log",
        )
    )

    signals = StopSignal(stop).install()
    stop = signals.event
    try:
        # The MLflow server's GenAI job runner (a pool of huey consumers) is of no use here.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "PYTHONUNBUFFERED": "1"}
        for server in servers:
            server.start(env)
        _note(f"starting {', '.join(s.name for s in servers)} (logs in {log_dir}) ...")
        wait_ready(servers, ready_timeout, stop)
        config.unlink(missing_ok=True)  # read at start-up; a password waits on no disk
        if experiment is None:
            _note(f"no MLflow experiment named {study_name!r} yet in {redact_url(uri)}; the UI opens on the list")
        print(f"MLflow UI         {mlflow_url}", flush=True)
        print(f"optuna-dashboard  {dashboard_url}", flush=True)
        if compare_url:
            print(f"MLflow compare    {compare_url}", flush=True)
        _note("press Ctrl-C to stop both")
        if on_ready is not None:
            on_ready(Urls(mlflow_url, dashboard_url, compare_url))
        while not stop.wait(0.5):
            for server in servers:
                if not server.alive():
                    raise SweeperError(
                        f"the {server.name} stopped (exit code {server.proc.returncode}); "
                        f"its log {server.log_path} ends with:\n{server.log_tail()}"
                    )
    except KeyboardInterrupt:
        pass
    finally:
        stop_all(servers)
        config.unlink(missing_ok=True)
        signals.restore()
    _note("stopped")


def _mlflow_links(client, base, experiment, study, storage, tracking_uri, compare) -> tuple[str, str | None]:
    """The study's comparison in the MLflow UI and, with ``compare`` ("A,B"), that of exactly
    those variants or cells (see sweeper.views)."""
    if experiment is None:
        if compare:
            raise SweeperError(f"study {study.study_name!r} has no MLflow run yet, so nothing to compare")
        return f"{base}/", None
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    digest = study.user_attrs.get(RECIPE_DIGEST_ATTR)
    compare_url = None
    if compare:
        from sweeper.report.read import collect

        run_ids = views.pick_runs(collect(study.study_name, storage, tracking_uri).frame, compare)
        compare_url = views.compare_link(client, base, experiment, spec, run_ids)
    return views.study_link(client, base, experiment, spec, digest), compare_url


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
