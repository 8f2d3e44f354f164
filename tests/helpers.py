"""Plain helpers shared by the test modules and both conftests (the fixtures live in the
conftests): the real CLI in a subprocess, small study specs, a real `mlflow server`, the
PostgreSQL admin connection, and the variants' expected parameter counts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

PG_ADMIN_URL = os.environ.get("SWEEPER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("SWEEPER_REQUIRE_POSTGRES") == "1"

# The seed post's table (CIFAR-100 and CIFAR-10 columns) except for Short3/Short4, which the
# post does not specify (see docs/MODELS.md).
# variant -> (CIFAR-100 params, CIFAR-10 params)
PARAMS = {
    "naive": (65_736_148, 65_291_098),
    "standard": (6_258_500, 6_166_250),
    "long": (9_641_924, 9_549_674),
    "short": (5_271_652, 5_179_402),
    "short2": (3_523_556, 3_431_306),
    "short3": (1_965_164, 1_872_914),
    "short4": (1_643_796, 1_551_546),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_admin():
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=3)
    conn.autocommit = True
    return conn


def sweeper(
    *args: str, env: dict[str, str], timeout: float = 300, cwd: str | Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess and return the finished process (text stdout/stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sweeper", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"sweeper {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def write_spec(
    path: Path,
    variants=("short4",),
    datasets=("digits",),
    seeds=(1,),
    epochs: int = 2,
    limit_train: int | None = 256,
    limit_test: int | None = 128,
    extra: str = "",
    checkpoint_every: str | float = "epoch",
) -> Path:
    """A small study spec for tests; the study's name is the file's stem. Tests checkpoint every
    epoch (the default is every 60 s, which a test's trial never reaches)."""
    limits = "".join(f"{k} = {v}\n" for k, v in (("limit_train", limit_train), ("limit_test", limit_test)) if v)
    limits += f"checkpoint_every = {json.dumps(checkpoint_every)}\n"
    path.write_text(
        textwrap.dedent(f"""\
        description = "test study"
        [grid]
        variant = {list(variants)!r}
        dataset = {list(datasets)!r}
        seed = {list(seeds)!r}
        [train]
        epochs = {epochs}
        """).replace("'", '"')
        + limits
        + extra
    )
    return path


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.3)


class MlflowServer:
    """A real `mlflow server` subprocess that can be stopped and started again on the same port."""

    def __init__(self, root: Path, backend_uri: str | None = None, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        log = open(self.root / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            ["mlflow", "server", *self.app_args(), "--backend-store-uri", self.backend_uri]
            + ["--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]
            + ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **os.environ,
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                # MLflow's job runner (GenAI jobs: up to 10 more processes) serves nothing of sweeper's
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                **self.app_env(),
            },
        )
        wait_http(f"{self.url}/health", timeout=180)
        return self

    def app_args(self) -> list[str]:
        """Arguments that choose the server's app (a subclass serves basic auth)."""
        return []

    def app_env(self) -> dict[str, str]:
        return {}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def pgbouncer_binary() -> str | None:
    """The `pgbouncer` executable (Debian installs it in /usr/sbin, often not on PATH)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


class PgBouncer:
    """A real `pgbouncer` process in front of the test PostgreSQL, in transaction pooling mode:
    config and userlist in ``root``, listening on a free 127.0.0.1 port, trust auth for the
    admin URL's user (the local test server trusts it too). ``url(db_url)`` is that database's
    URL through the pooler; ``admin()`` is its console (SHOW POOLS, SHOW SERVERS)."""

    def __init__(self, root: Path, pool_size: int = 3, **settings: str | int):
        from urllib.parse import urlsplit

        server = urlsplit(PG_ADMIN_URL)
        self.root, self.port, self.user = root, free_port(), server.username or "postgres"
        self.pool_size = pool_size
        options = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": root / "userlist.txt",
            "admin_users": self.user,
            "pool_mode": "transaction",
            "default_pool_size": pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": 500,
            **settings,
        }
        (root / "userlist.txt").write_text(f'"{self.user}" ""\n')
        # Any database name goes to the test server: the `*` fallback entry.
        host, port = server.hostname or "127.0.0.1", server.port or 5432
        (root / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={host} port={port}\n[pgbouncer]\n"
            + "".join(f"{k} = {v}\n" for k, v in options.items())
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> PgBouncer:
        import psycopg2

        # pgbouncer refuses to run as root: then it drops to the `postgres` user (-u), which must
        # read the config: the folder is made readable for it.
        as_user = ["-u", "postgres"] if os.geteuid() == 0 else []
        if as_user:
            for path in (self.root, *self.root.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
        log = open(self.root / "pgbouncer.log", "ab")
        self.proc = subprocess.Popen(
            [pgbouncer_binary(), *as_user, str(self.root / "pgbouncer.ini")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg2.connect(self.admin_url, connect_timeout=2).close()
                return self
            except psycopg2.Error:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log()}") from None
                time.sleep(0.1)

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/pgbouncer"

    def url(self, db_url: str, driver: str = "") -> str:
        """``db_url``'s database, reached through this pooler (``driver``: e.g. ``+psycopg2``)."""
        return f"postgresql{driver}://{self.user}@127.0.0.1:{self.port}/{db_url.rsplit('/', 1)[1]}"

    def show(self, what: str) -> list[dict]:
        """A SHOW command of the admin console (POOLS, SERVERS, CLIENTS...) as dicts."""
        import psycopg2

        conn = psycopg2.connect(self.admin_url, connect_timeout=3)
        conn.autocommit = True  # the console knows no transactions
        try:
            cur = conn.cursor()
            cur.execute(f"SHOW {what}")
            names = [c.name for c in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            conn.close()

    def server_connections(self, database: str) -> int:
        """Server connections this pooler holds to ``database`` now (any state)."""
        return sum(1 for s in self.show("SERVERS") if s["database"] == database)

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary folder, the machine's
    binaries, a free 127.0.0.1 port, trust auth), which the test may restart for real: the
    machine's server is never restarted or reconfigured. Runs as the `postgres` user, as
    PostgreSQL refuses root."""

    def __init__(self):
        import glob
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="sweeper-pg-"))
        self.data, self.port = self.root / "data", free_port()
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, cmd)], check=True, capture_output=True, timeout=120
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} -c fsync=off"
        self._as_postgres(
            self.bin / "pg_ctl", action, "-D", self.data, "-l", self.root / "server.log", "-w", "-o", options, *extra
        )

    def start(self) -> PrivatePostgres:
        self._ctl("start")
        return self

    def restart(self) -> None:
        """A real restart: every session is ended (fast shutdown), the server starts again."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        try:
            self._ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
