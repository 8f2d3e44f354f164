"""What one trial costs the shared servers (PostgreSQL, MLflow), and how many workers they feed.

    python benchmarks/server_cost.py                 # a few lines for people
    python benchmarks/server_cost.py --json          # one JSON document on stdout, progress on stderr
    python benchmarks/server_cost.py --trials 2 --epochs 1 --cadences default --check-workers "" --upload-mb 1

1. The stack of docker-compose.yml, on this machine: a fresh PostgreSQL database for Optuna and a
   second one for MLflow's backend store (same server, as in compose), and a real
   ``mlflow server`` (uvicorn, ``--serve-artifacts``) on a free port, its uvicorn access log
   (one line per request, on the server's stdout) captured to a file.
2. Light workers: the real ``sweeper.worker.run`` with ``WorkerConfig.fit`` = a fit that sleeps
   per epoch (benchmarks/harness.py's ``sleep_fit``, tiny model, forked from one warmed-up
   process by the harness's ``run_workers``). Every storage and tracking call is real.
3. Cost runs: one worker at a time, studies with each of ``--epochs`` epochs per trial and each
   checkpoint cadence of ``--cadences`` ("epoch": a checkpoint every epoch; "default": the spec's
   default, every 60 s, i.e. none inside these short trials). Around each run:
   - SQL transactions and rows of both databases from ``pg_stat_database`` (pg_stat_statements is
     not loaded on the shared server, and restarting it is not ours to do);
   - SQL statements and commits counted by SQLAlchemy's ``before_cursor_execute`` and ``commit``
     events: in the workers for the Optuna storage, in every process of the mlflow server (a
     ``sitecustomize`` on its PYTHONPATH) for its store; the pool's pre-ping is not seen there;
   - HTTP requests from the access log, per endpoint;
   - CPU seconds of the mlflow server's process tree and of the PostgreSQL backends serving the
     two databases (psutil, sampled every 0.2 s so that backends that exit are counted too);
   - the worker's wall time outside training (claim, prepare, per-epoch calls, finish).
   Two epoch counts give per trial + per epoch: q(E) = q_trial + E * q_epoch.
4. Extras: one heartbeat's cost (a running trial beats every 10 s, so long trials pay per second)
   and the mlflow server's CPU per uploaded MB (checkpoints and models of real GoogLeNets are
   megabytes; the light workers' are kilobytes).
5. The model (see ``project``) and its projection for 1- and 10-minute trials.
6. The check: W light workers at once (``--check-workers``), measured efficiency and server CPU
   against what the model predicts for that W and trial length.

PostgreSQL: ``$SWEEPER_TEST_PG`` (default postgresql://postgres@127.0.0.1:5432/postgres) creates
and drops the throwaway databases. Everything else lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pool
from harness import PG_ADMIN_URL, REPO, Databases, dispose, grid_spec, log

from sweeper.contract import DEFAULT_HEARTBEAT_INTERVAL

SCRIPT = Path(__file__).resolve()

HEARTBEAT_INTERVAL = DEFAULT_HEARTBEAT_INTERVAL  # seconds between a running trial's heartbeats
STATS_FLUSH_WAIT = 11.0  # an idle PostgreSQL 15 backend reports its counters within 10 s
GUNICORN_THREADS = 16  # --mlflow-server gunicorn: request threads per worker (gthread)
ACCESS_LINE = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD) (\S+) HTTP/[\d.]+" (\d{3})')
ID_IN_PATH = re.compile(r"/(m-)?[0-9a-f]{32}(?=/|$)")  # run and logged-model ids in paths
# Put on the mlflow server's PYTHONPATH: every process of the server counts the statements and
# commits its SQLAlchemy engines send and writes them to $SERVER_COST_SQL_DIR/<pid>.json.
SITECUSTOMIZE = """
import os

if os.environ.get("SERVER_COST_SQL_DIR"):
    import json
    import threading
    from collections import Counter

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counts = Counter()
    event.listen(Engine, "before_cursor_execute", lambda *a: counts.update(["statements"]))
    event.listen(Engine, "commit", lambda *a: counts.update(["commits"]))

    def write_counts():
        path = os.path.join(os.environ["SERVER_COST_SQL_DIR"], f"{os.getpid()}.json")
        written = None
        while True:
            threading.Event().wait(0.5)
            try:  # a copy taken while a request thread adds the first key of its kind: next time
                if counts != written:
                    written = Counter(counts)
                    with open(path + ".tmp", "w") as f:
                        json.dump(written, f)
                    os.replace(path + ".tmp", path)
            except (RuntimeError, OSError):
                pass

    threading.Thread(target=write_counts, daemon=True).start()
"""


# --- the servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_mlflow_pool() -> dict[str, str]:
    """docker-compose.yml's pool for each uvicorn worker, read from it: more connections than its
    40 request threads (MLflow's default, 5 + 10, stalled under 200 workers: docs/DEPLOY.md,
    "Connections")."""
    import yaml

    environment = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-mlflow"]["environment"]
    return {k: str(v) for k, v in environment.items() if k.startswith("MLFLOW_SQLALCHEMYSTORE_")}


class MlflowServer:
    """``mlflow server`` as compose runs it (PostgreSQL backend store, proxied artifacts, its
    database pool), with uvicorn's access log (MLflow's default log config sends it to stdout)
    in a file."""

    def __init__(
        self, backend_uri: str, root: Path, workers: int, direct_artifacts: bool = False, sgi: str = "uvicorn"
    ):
        """``direct_artifacts``: no proxying (``--no-serve-artifacts``); new experiments store their
        artifacts under ``root/artifacts``, which clients write themselves, as they would an S3
        bucket or a shared volume (docs/DEPLOY.md, "Artifacts off the server's path"). ``sgi``:
        uvicorn (MLflow's default: its FastAPI app, the Flask handlers inside) or gunicorn (the
        Flask app alone, GUNICORN_THREADS request threads per worker, its access log on stdout)."""
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "mlflow-server.log"
        self.sql_dir = root / "mlflow-server-sql"
        self.sql_dir.mkdir()
        (root / "sitecustomize").mkdir()
        (root / "sitecustomize" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {
            **compose_mlflow_pool(),  # unless the environment sets them
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(root / "sitecustomize"), os.environ.get("PYTHONPATH")) if p),
            "SERVER_COST_SQL_DIR": str(self.sql_dir),
            "PYTHONUNBUFFERED": "1",  # access lines reach the file as they happen
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # as in docker-compose.yml
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                backend_uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                *(["--gunicorn-opts", f"--threads {GUNICORN_THREADS} --access-logfile -"] if sgi == "gunicorn" else []),
                *(
                    ["--no-serve-artifacts", "--default-artifact-root", str(root / "artifacts")]
                    if direct_artifacts
                    else ["--serve-artifacts", "--artifacts-destination", str(root / "mlflow-artifacts")]
                ),
            ],
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )

    def wait_ready(self, timeout: float = 300) -> float:
        import urllib.request

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def requests(self) -> Counter:
        """Requests answered so far, by 'METHOD /path' (ids in paths replaced by {id})."""
        counts: Counter = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = ACCESS_LINE.search(line)
            if m:
                path = ID_IN_PATH.sub("/{id}", m.group(2).split("?", 1)[0])
                if "/mlflow-artifacts/artifacts/" in path:  # one row for all artifact files
                    path = re.sub(r"(/mlflow-artifacts/artifacts/).*", r"\1...", path)
                counts[f"{m.group(1)} {path}"] += 1
        return counts

    def statements(self) -> Counter:
        """Statements and commits the server's processes sent to its backend store so far."""
        counts: Counter = Counter()
        for f in self.sql_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                counts.update(json.loads(f.read_text()))
        return counts

    def stop(self) -> None:
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            for p in reversed(tree):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            psutil.wait_procs(tree, timeout=15)
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()


class CpuMeter(threading.Thread):
    """CPU seconds (user + system) of the mlflow server's process tree and of the PostgreSQL
    backends of our databases, summed over every process seen since the meter started. Looked
    at every 0.2 s: a backend that exits between two looks loses at most its last 0.2 s."""

    def __init__(self, server_pid: int, databases: dict[str, str], interval: float = 0.2):
        super().__init__(daemon=True, name="cpu-meter")
        import psycopg2

        self.server_pid, self.databases, self.interval = server_pid, databases, interval
        self.conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=5)
        self.conn.autocommit = True
        self.started_at = time.time()
        self.seen: dict[int, dict[str, Any]] = {}  # pid -> label, first and last CPU seconds
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def _pids(self) -> dict[int, str]:
        import psutil

        pids = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.server_pid)
            for p in [root, *root.children(recursive=True)]:
                pids[p.pid] = "mlflow_server"
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT pid, datname FROM pg_stat_activity WHERE datname = ANY(%s)", (list(self.databases.values()),)
            )
            label = {db: role for role, db in self.databases.items()}
            for pid, db in cur.fetchall():
                pids[pid] = f"postgres_{label[db]}"
        return pids

    def look(self) -> None:
        import psutil

        for pid, label in self._pids().items():
            try:
                p = psutil.Process(pid)
                t = p.cpu_times()
                cpu = t.user + t.system
                new = pid not in self.seen
                born_after_start = p.create_time() >= self.started_at - 0.5
            except psutil.NoSuchProcess:
                continue
            with self.lock:
                if new:
                    self.seen[pid] = {"label": label, "first": 0.0 if born_after_start else cpu, "last": cpu}
                else:
                    self.seen[pid]["last"] = cpu

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            with contextlib.suppress(Exception):
                self.look()

    def totals(self) -> dict[str, float]:
        self.look()
        out: dict[str, float] = {"mlflow_server": 0.0, "postgres_optuna": 0.0, "postgres_mlflow": 0.0}
        with self.lock:
            for s in self.seen.values():
                out[s["label"]] += s["last"] - s["first"]
        return out

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)
        self.conn.close()


def pg_counters(databases: dict[str, str]) -> dict[str, dict[str, int]]:
    """pg_stat_database's transactions and row counts of our databases (a fresh snapshot)."""
    conn = Databases._admin()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute(
            "SELECT datname, xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, "
            "tup_updated, tup_deleted FROM pg_stat_database WHERE datname = ANY(%s)",
            (list(databases.values()),),
        )
        rows = {r[0]: r[1:] for r in cur.fetchall()}
    conn.close()
    names = (
        "xact_commit",
        "xact_rollback",
        "tup_returned",
        "tup_fetched",
        "tup_inserted",
        "tup_updated",
        "tup_deleted",
    )
    return {role: dict(zip(names, rows.get(db, (0,) * len(names)))) for role, db in databases.items()}


class Snapshot:
    """Every server-side counter at one moment."""

    def __init__(self, server: MlflowServer, meter: CpuMeter, databases: dict[str, str]):
        self.at = time.time()
        self.pg = pg_counters(databases)
        self.cpu = meter.totals()
        self.http = server.requests()
        self.mlflow_sql = server.statements()

    def minus(self, before: Snapshot, idle_server_cpu_per_s: float) -> dict[str, Any]:
        seconds = self.at - before.at
        http = self.http - before.http
        return {
            "seconds": seconds,
            "pg": {role: {k: self.pg[role][k] - before.pg[role][k] for k in self.pg[role]} for role in self.pg},
            "cpu_s": {k: self.cpu[k] - before.cpu[k] for k in self.cpu},
            # the server's own background work (idle workers' loops) over the window, subtracted
            "mlflow_server_busy_cpu_s": max(
                0.0, self.cpu["mlflow_server"] - before.cpu["mlflow_server"] - idle_server_cpu_per_s * seconds
            ),
            "mlflow_sql_client": dict(self.mlflow_sql - before.mlflow_sql),
            "http_requests": sum(http.values()),
            "http_by_endpoint": dict(http.most_common()),
        }


# --- the light workers (a pool process, forked workers) ------------------------------------------


SQL_COUNTS: Counter = Counter()


def count_sql() -> None:
    """Count, in this process and the workers forked from it, every statement and commit that
    goes through SQLAlchemy (the Optuna storage; MLflow's client talks HTTP to the server)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def statement(conn, cursor, sql, parameters, context, executemany):
        SQL_COUNTS["statements"] += 1
        SQL_COUNTS["statements_" + (sql.lstrip().split(None, 1) or ["?"])[0].upper()] += 1

    event.listen(Engine, "before_cursor_execute", statement)
    event.listen(Engine, "commit", lambda conn: SQL_COUNTS.update(["commits"]))
    event.listen(Engine, "rollback", lambda conn: SQL_COUNTS.update(["rollbacks"]))


def counting_worker_child(run: dict[str, Any], index: int, go_file: Path, rundir: Path) -> int:
    """The harness's light worker, which then writes the statements it sent."""
    SQL_COUNTS.clear()
    code = pool.worker_child(run, index, go_file, rundir)
    (rundir / f"sql-{index}.json").write_text(json.dumps(dict(SQL_COUNTS)))
    return code


def pool_main(cfg_path: str) -> None:
    """Import and warm up once (harness.warm_pool, as sweep_scale's pool does), then run each run's workers when the
    driver says so: the driver reads the counters between runs."""
    cfg = json.loads(Path(cfg_path).read_text())
    pool.warm_pool([cfg["warmup"]])
    count_sql()
    control = Path(cfg["control"])
    for k, run in enumerate(cfg["runs"]):
        (control / f"want-{k}").write_text("")
        while not (control / f"go-{k}").exists():
            time.sleep(0.05)
        result = pool.run_workers(run, child=counting_worker_child)
        Path(run["result"]).write_text(json.dumps(result))
        (control / f"ended-{k}").write_text("")


def wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the worker pool exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def collect_workers(rundir: Path, workers: int, epochs: int, epoch_sleep: float) -> dict[str, Any]:
    """What the workers saw: trials, wall time, training (sleep) time, statements sent."""
    done = [json.loads((rundir / f"done-{i}.json").read_text()) for i in range(workers)]
    sql: Counter = Counter()
    for i in range(workers):
        sql.update(json.loads((rundir / f"sql-{i}.json").read_text()))
    trials = sum(d["done"] for d in done)
    wall = sum(d["ended"] - d["started"] for d in done)
    trained = trials * epochs * epoch_sleep
    span = max(d["ended"] for d in done) - min(d["started"] for d in done)
    return {
        "trials": trials,
        "worker_wall_s": wall,
        "trained_s": trained,
        "span_s": span,
        "efficiency": trained / wall if wall else 0.0,  # trained-time share of the workers' time
        "outside_training_s_per_trial": (wall - trained) / trials if trials else None,
        "worker_cpu_s": sum(d["cpu_s"] for d in done),
        # seconds the workers were runnable but waited for a core (other processes had them)
        "worker_runqueue_wait_s": sum(d["runqueue_wait_s"] or 0.0 for d in done),
        "sql": dict(sql),
        "errors": sum(
            1
            for f in rundir.glob("worker-*.log")
            for line in f.read_text(errors="replace").splitlines()
            if "Traceback" in line or " ERROR " in line
        ),
    }


# --- the extras: one heartbeat, one uploaded MB ----------------------------------------------------


def heartbeat_cost(storage_url: str, server, meter, databases, idle_rate: float, beats: int = 40) -> dict[str, Any]:
    """What ``storage.record_heartbeat`` costs PostgreSQL, from a RUNNING trial of its own study."""
    import optuna
    from sqlalchemy import event

    from sweeper.storage import connect

    storage = connect.open_storage(storage_url)
    trial_id = optuna.create_study(study_name=f"heartbeat-{uuid.uuid4().hex[:6]}", storage=storage).ask()._trial_id
    counts: Counter = Counter()
    event.listen(storage.engine, "before_cursor_execute", lambda *a: counts.update(["statements"]))
    event.listen(storage.engine, "commit", lambda *a: counts.update(["commits"]))
    storage.record_heartbeat(trial_id)  # the first one inserts its row; the rest update it
    counts.clear()
    time.sleep(STATS_FLUSH_WAIT)
    before = Snapshot(server, meter, databases)
    for _ in range(beats):
        storage.record_heartbeat(trial_id)
    dispose(storage)  # the backend exits and reports its counters
    time.sleep(1.5)
    delta = Snapshot(server, meter, databases).minus(before, idle_rate)
    return {
        "beats": beats,
        "statements_per_beat": counts["statements"] / beats,
        "commits_per_beat": counts["commits"] / beats,
        "xacts_per_beat": delta["pg"]["optuna"]["xact_commit"] / beats,
        "postgres_cpu_s_per_beat": delta["cpu_s"]["postgres_optuna"] / beats,
    }


def upload_cost(tracking_uri: str, root: Path, server, meter, databases, idle_rate: float, mb: int) -> dict[str, Any]:
    """The mlflow server's CPU per MB of artifact proxied to its store (--serve-artifacts)."""
    from sweeper import tracking

    client = tracking.client(tracking_uri)
    experiment_id = client.create_experiment(f"upload-{uuid.uuid4().hex[:6]}")
    run_id = client.create_run(experiment_id).info.run_id
    path = root / "upload.bin"
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    rounds = []
    for r in range(2):
        before = Snapshot(server, meter, databases)
        t0 = time.perf_counter()
        client.log_artifact(run_id, str(path), f"upload-{r}")
        seconds = time.perf_counter() - t0
        time.sleep(0.5)
        delta = Snapshot(server, meter, databases).minus(before, idle_rate)
        rounds.append(
            {"seconds": seconds, "server_cpu_s": delta["mlflow_server_busy_cpu_s"], "requests": delta["http_requests"]}
        )
    path.unlink()
    best = min(rounds, key=lambda r: r["server_cpu_s"])  # the machine is shared: the quieter round
    return {
        "mb": mb,
        "rounds": rounds,
        "server_cpu_s_per_mb": best["server_cpu_s"] / mb,
        "mb_per_s": mb / best["seconds"],
    }


# --- the runs ------------------------------------------------------------------------------------


def per_trial(run: dict[str, Any]) -> dict[str, float]:
    """The figures of one run divided by its trials."""
    n = run["workers_saw"]["trials"] or 1
    d, sql = run["servers"], run["workers_saw"]["sql"]
    return {
        "optuna_statements": sql.get("statements", 0) / n,
        "optuna_commits_client": sql.get("commits", 0) / n,
        "optuna_xacts": (d["pg"]["optuna"]["xact_commit"] + d["pg"]["optuna"]["xact_rollback"]) / n,
        "mlflow_db_xacts": (d["pg"]["mlflow"]["xact_commit"] + d["pg"]["mlflow"]["xact_rollback"]) / n,
        "mlflow_db_statements": d["mlflow_sql_client"].get("statements", 0) / n,
        "http_requests": d["http_requests"] / n,
        "mlflow_server_cpu_s": d["mlflow_server_busy_cpu_s"] / n,
        "postgres_cpu_s": (d["cpu_s"]["postgres_optuna"] + d["cpu_s"]["postgres_mlflow"]) / n,
        "postgres_optuna_cpu_s": d["cpu_s"]["postgres_optuna"] / n,
        "postgres_mlflow_cpu_s": d["cpu_s"]["postgres_mlflow"] / n,
        "worker_outside_training_s": run["workers_saw"]["outside_training_s_per_trial"] or 0.0,
        "worker_cpu_s": run["workers_saw"]["worker_cpu_s"] / n,
        "worker_runqueue_wait_s": run["workers_saw"]["worker_runqueue_wait_s"] / n,
    }


def solve(points: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """q(E) = per_trial + E * per_epoch through the two epoch counts measured (least squares when
    more; a slope below zero, wall-time noise on a busy machine, counts as zero); one epoch count
    only: everything is reported per trial."""
    es = sorted(points)
    out: dict[str, dict[str, float]] = {}
    for key in points[es[0]]:
        if len(es) == 1:
            out[key] = {"per_trial": points[es[0]][key], "per_epoch": 0.0}
            continue
        mean_e = sum(es) / len(es)
        mean_q = sum(points[e][key] for e in es) / len(es)
        slope = sum((e - mean_e) * (points[e][key] - mean_q) for e in es) / sum((e - mean_e) ** 2 for e in es)
        slope = max(slope, 0.0)  # nothing costs less with more epochs: a negative slope is noise
        out[key] = {"per_trial": mean_q - slope * mean_e, "per_epoch": slope}
    return out


# --- the model -----------------------------------------------------------------------------------


def trial_cost(costs: dict[str, Any], seconds: float, epoch_s: float, inputs: dict[str, Any]) -> dict[str, float]:
    """One trial of ``seconds`` of training, an epoch every ``epoch_s`` s, checkpoints on the
    default cadence (every 60 s, never after the last epoch), real checkpoint and model sizes."""
    epochs = max(1, round(seconds / epoch_s))
    checkpoints = sum(1 for e in range(1, epochs) if (e * epoch_s) // 60 > ((e - 1) * epoch_s) // 60)
    plain, ckpt = costs["default"], costs.get("epoch", costs["default"])
    beats = seconds / HEARTBEAT_INTERVAL  # beyond the first, which the measured trials include

    def q(key: str) -> float:
        extra_per_checkpoint = ckpt[key]["per_epoch"] - plain[key]["per_epoch"]
        return plain[key]["per_trial"] + epochs * plain[key]["per_epoch"] + checkpoints * extra_per_checkpoint

    hb = inputs["heartbeat"]
    upload_mb = checkpoints * inputs["checkpoint_mb"] + inputs["model_mb"]
    return {
        "train_s": seconds,
        "epochs": epochs,
        "checkpoints": checkpoints,
        "upload_mb": upload_mb,
        "optuna_statements": q("optuna_statements") + beats * hb["statements_per_beat"],
        "optuna_xacts": q("optuna_xacts") + beats * hb["xacts_per_beat"],
        "mlflow_db_xacts": q("mlflow_db_xacts"),
        "http_requests": q("http_requests"),
        "postgres_cpu_s": q("postgres_cpu_s") + beats * hb["postgres_cpu_s_per_beat"],
        "mlflow_server_cpu_s": q("mlflow_server_cpu_s") + upload_mb * inputs["upload"]["server_cpu_s_per_mb"],
        "worker_outside_training_s": q("worker_outside_training_s"),
    }


def project(costs: dict[str, Any], inputs: dict[str, Any], seconds: float, cores: int) -> dict[str, Any]:
    """How many workers one PostgreSQL and one MLflow server of ``cores`` cores sustain at >= 80%.

    A worker starts a trial every cycle = T + o seconds (T training, o its time outside training
    at the worker, measured with idle servers). W workers load a server with
    W * c / cycle CPU-s per second (c: that server's CPU-s per trial), i.e. per core
    rho = W * c / (cycle * cores). The workers stay >= 80% efficient when
      (1) o <= 25% of T (alone), and
      (2) no server core is busier than rho_max = 0.7: beyond that queueing grows fast
          (M/M/1: the wait is rho / (1 - rho) service times, 2.3 at 0.7, 9 at 0.9), and
      (3) PostgreSQL's max_connections holds every worker's connections plus MLflow's pool.
    At rho_max the time outside training grows to o + s * rho / (1 - rho) (s: the servers' CPU
    per trial, all of it on the worker's critical path: an upper bound); it is reported."""
    t = trial_cost(costs, seconds, inputs["epoch_s"], inputs)
    o = t["worker_outside_training_s"]
    cycle = seconds + o
    rho = inputs["rho_max"]
    w_pg = rho * cores * cycle / t["postgres_cpu_s"]
    w_mlflow = rho * min(cores, inputs["mlflow_server_workers"]) * cycle / t["mlflow_server_cpu_s"]
    conn = inputs["connections"]
    w_conn = (conn["max_connections"] - conn["reserved"] - conn["mlflow_server"]) / conn["per_worker"]
    w = math.floor(min(w_pg, w_mlflow, w_conn))
    s = t["postgres_cpu_s"] + t["mlflow_server_cpu_s"]
    loaded_o = o + s * rho / (1 - rho)
    return {
        "trial": t,
        "cores": cores,
        "cycle_s": cycle,
        "efficiency_alone": seconds / cycle,
        "outside_training_share_of_T": o / seconds,
        "workers_by_postgres_cpu": w_pg,
        "workers_by_mlflow_cpu": w_mlflow,
        "workers_by_connections": w_conn,
        "workers": w,
        "bound_by": min(
            (("postgres_cpu", w_pg), ("mlflow_cpu", w_mlflow), ("postgres_connections", w_conn)), key=lambda x: x[1]
        )[0],
        "efficiency_at_rho_max": seconds / (seconds + loaded_o),
        "requests_per_s": w * t["http_requests"] / cycle,
        "optuna_statements_per_s": w * t["optuna_statements"] / cycle,
        "xacts_per_s": w * (t["optuna_xacts"] + t["mlflow_db_xacts"]) / cycle,
    }


def predict_check(costs: dict[str, Any], run: dict[str, Any], cores: int) -> dict[str, Any]:
    """What the model says for a check run: its W, epochs and sleep, on this machine's cores."""
    plain = costs["default"]
    epochs, seconds, w = run["epochs"], run["epochs"] * run["epoch_sleep"], run["workers"]

    def q(key: str) -> float:
        return plain[key]["per_trial"] + epochs * plain[key]["per_epoch"]

    o, s = q("worker_outside_training_s"), q("postgres_cpu_s") + q("mlflow_server_cpu_s")
    cycle = seconds + o
    rho = min(0.95, w * s / (cycle * cores))  # both servers on this machine's cores
    host = w * (s + q("worker_cpu_s")) / cycle / cores  # and the workers too
    queueing = s * rho / (1 - rho)
    return {
        "train_s_per_trial": seconds,
        "server_cpu_s_per_trial": s,
        "server_cpu_s_per_s": w * s / cycle,
        "server_rho": rho,
        "outside_training_s_per_trial": o + queueing,
        # the same without the time the one worker of the cost runs waited for a core: what the
        # servers and the worker's own work take, to set against the check's figure without its waits
        "outside_training_s_not_waiting_for_a_core": o - q("worker_runqueue_wait_s") + queueing,
        "efficiency": seconds / (seconds + o + queueing),
        "host_cpu_demand_share": host,  # > 1: the workers and servers need more than the cores
    }


# --- driver --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--trials", type=int, default=8, help="trials per cost run (one worker)")
    parser.add_argument("--epochs", default="2,6", help="epoch counts of the cost runs (two or more: per epoch)")
    parser.add_argument("--epoch-sleep", type=float, default=0.5, help="seconds of sleep per epoch in the cost runs")
    parser.add_argument("--cadences", default="default,epoch", help="checkpoint cadences: default (60 s), epoch")
    parser.add_argument("--check-workers", default="4,8", help="W of the check runs (empty: no check)")
    parser.add_argument("--check-epochs", type=int, default=2)
    parser.add_argument("--check-epoch-sleep", type=float, default=3.0)
    parser.add_argument("--check-trials-per-worker", type=int, default=3)
    parser.add_argument("--mlflow-workers", type=int, default=2, help="uvicorn workers of the mlflow server")
    parser.add_argument("--upload-mb", type=int, default=64, help="artifact size for the CPU-per-MB figure (0: skip)")
    parser.add_argument("--checkpoint-mb", type=float, default=75.0, help="projection: one checkpoint's size")
    parser.add_argument("--model-mb", type=float, default=25.0, help="projection: the logged model's size")
    parser.add_argument("--epoch-s", type=float, default=30.0, help="projection: seconds per epoch")
    parser.add_argument("--rho-max", type=float, default=0.7, help="projection: highest per-core server load")
    parser.add_argument("--max-connections", type=int, default=200, help="projection: PostgreSQL's (compose: 200)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, server log)")
    parser.add_argument("--_pool", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._pool:
        pool_main(args._pool)
        return 0

    def bad(message: str) -> None:
        parser.exit(2, f"server_cost: {message}\n")

    try:
        epoch_counts = sorted({int(e) for e in args.epochs.split(",") if e.strip()})
        check_workers = [int(w) for w in args.check_workers.split(",") if w.strip()]
    except ValueError:
        bad("--epochs and --check-workers take comma-separated whole numbers")
    cadences = [c.strip() for c in args.cadences.split(",") if c.strip()]
    if not epoch_counts or min(epoch_counts) < 1 or any(w < 1 for w in check_workers) or args.trials < 1:
        bad("--epochs, --trials and --check-workers must be at least 1")
    if not cadences or any(c not in ("default", "epoch") for c in cadences) or "default" not in cadences:
        bad("--cadences: 'default' and optionally 'epoch'")
    if why := Databases.postgres_reachable():
        bad(f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({why}); set SWEEPER_TEST_PG")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the servers, drops the databases
    tmp = Path(tempfile.mkdtemp(prefix="server-cost-"))
    os.environ["SWEEPER_HOME"] = str(tmp / "home")
    os.chdir(tmp)  # nothing lands in the checkout
    dbs = Databases(tmp)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "command": " ".join(["python benchmarks/server_cost.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    server = meter = pool = None
    started = time.perf_counter()
    try:
        from sweeper import tracking
        from sweeper.storage import connect
        from sweeper.trials import enqueue

        optuna_url = dbs.new("postgresql", "cost_optuna")
        mlflow_url = dbs.new("postgresql", "cost_mlflow")
        databases = {"optuna": optuna_url.rsplit("/", 1)[1], "mlflow": mlflow_url.rsplit("/", 1)[1]}
        log(f"mlflow server ({args.mlflow_workers} uvicorn workers) on PostgreSQL database {databases['mlflow']}")
        server = MlflowServer(mlflow_url.replace("postgresql://", "postgresql+psycopg2://"), tmp, args.mlflow_workers)
        result["mlflow_server_start_s"] = server.wait_ready()
        meter = CpuMeter(server.proc.pid, databases)
        meter.start()
        time.sleep(STATS_FLUSH_WAIT)  # the schema migration's counters settle
        idle = Snapshot(server, meter, databases)
        time.sleep(5)
        idle_rate = (meter.totals()["mlflow_server"] - idle.cpu["mlflow_server"]) / (time.time() - idle.at)
        result["mlflow_server_idle_cpu_s_per_s"] = idle_rate
        log(f"  ready in {result['mlflow_server_start_s']:.1f}s; idle CPU {idle_rate * 1000:.1f} ms/s")

        client = tracking.client(server.uri)
        storage = connect.open_storage(optuna_url)
        tag = uuid.uuid4().hex[:4]
        rundirs = tmp / "runs"

        def new_study(name: str, trials: int, epochs: int, cadence: str) -> str:
            train = {"limit_train": 256, "limit_test": 64}
            if cadence == "epoch":
                train["checkpoint_every"] = "epoch"
            spec = grid_spec(name, trials, epochs=epochs, **train)
            launched = enqueue.enqueue_study(storage, spec)
            # once per study, as its first trial does: not part of what a trial costs
            experiment_id = tracking.ensure_experiment(client, name)
            tracking.ensure_study_run(client, experiment_id, connect.stored_spec(launched.study))
            return name

        runs = []
        for cadence in cadences:
            for e in epoch_counts:
                runs.append({"kind": "cost", "cadence": cadence, "epochs": e, "workers": 1, "trials": args.trials})
                runs[-1]["epoch_sleep"] = args.epoch_sleep
        for w in check_workers:
            n = w * args.check_trials_per_worker
            runs.append({"kind": "check", "cadence": "default", "epochs": args.check_epochs, "workers": w, "trials": n})
            runs[-1]["epoch_sleep"] = args.check_epoch_sleep
        pool_runs = []
        for k, r in enumerate(runs):
            name = new_study(
                f"cost-{r['kind']}-{r['cadence']}-e{r['epochs']}-w{r['workers']}-{tag}",
                r["trials"],
                r["epochs"],
                r["cadence"],
            )
            rundir = rundirs / f"{k}-{name}"
            rundir.mkdir(parents=True)
            r["rundir"] = rundir
            pool_runs.append(
                {
                    "rundir": str(rundir),
                    "workers": r["workers"],
                    "storage_url": optuna_url,
                    "tracking_uri": server.uri,
                    "study": name,
                    "epoch_sleep": r["epoch_sleep"],
                    "pg_dbs": list(databases.values()),
                    "ready_timeout": 600,
                    "run_timeout": 900,
                    "result": str(rundir / "pool.json"),
                }
            )
        warm = new_study(f"cost-warmup-{tag}", 1, 1, "default")
        dispose(storage)
        control = tmp / "control"
        control.mkdir()
        cfg = {
            "warmup": {"storage_url": optuna_url, "tracking_uri": server.uri, "study": warm},
            "runs": pool_runs,
            "control": str(control),
        }
        (tmp / "pool.json").write_text(json.dumps(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        pool_log = open(tmp / "pool.log", "wb")
        log("light-worker pool: imports and a warm-up trial")
        pool = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--_pool", str(tmp / "pool.json")],
            env=env,
            stdout=pool_log,
            stderr=subprocess.STDOUT,
        )
        measured = []
        for k, r in enumerate(runs):
            wait_for(control / f"want-{k}", pool, f"run {k}", 900)
            time.sleep(STATS_FLUSH_WAIT if k == 0 else 0)  # the warm-up's counters settle
            before = Snapshot(server, meter, databases)
            (control / f"go-{k}").write_text("")
            wait_for(control / f"ended-{k}", pool, f"the end of run {k}", 1200)
            time.sleep(STATS_FLUSH_WAIT)
            servers = Snapshot(server, meter, databases).minus(before, idle_rate)
            pool_result = json.loads(Path(pool_runs[k]["result"]).read_text())
            saw = collect_workers(r["rundir"], r["workers"], r["epochs"], r["epoch_sleep"])
            entry = {
                **{key: v for key, v in r.items() if key != "rundir"},
                "servers": servers,
                "workers_saw": saw,
                "peak_pg_connections": {
                    role: pool_result["peak_pg_connections"].get(db, 0) for role, db in databases.items()
                },
                "worker_exits": [e["status"] for e in pool_result["exits"].values()],
                "loadavg_end": pool_result["loadavg_end"],
            }
            entry["per_trial"] = per_trial(entry)
            measured.append(entry)
            if saw["errors"] or saw["trials"] != r["trials"]:
                log(
                    f"  WARNING: {saw['errors']} error lines, {saw['trials']} trials run for {r['trials']} cells "
                    f"(failed trials are retried): see the workers' logs (--keep) in {r['rundir']}"
                )
            p = entry["per_trial"]
            log(
                f"  {r['kind']} cadence={r['cadence']} E={r['epochs']} W={r['workers']}: {saw['trials']} trials, "
                f"per trial {p['optuna_statements']:.0f} statements / {p['optuna_xacts']:.0f} xacts (Optuna), "
                f"{p['mlflow_db_xacts']:.0f} xacts (MLflow db), {p['http_requests']:.1f} requests, CPU "
                f"{p['mlflow_server_cpu_s'] * 1000:.0f} ms mlflow + {p['postgres_cpu_s'] * 1000:.0f} ms postgres; "
                f"outside training {p['worker_outside_training_s']:.2f}s, efficiency {saw['efficiency']:.0%}, "
                f"load {entry['loadavg_end'][0]:.1f}"
            )
        pool.wait(timeout=120)
        pool_log.close()
        result["runs"] = measured

        costs = {}
        for cadence in cadences:
            points = {m["epochs"]: m["per_trial"] for m in measured if m["kind"] == "cost" and m["cadence"] == cadence}
            costs[cadence] = solve(points)
        result["costs"] = costs
        result["http_by_endpoint_per_trial"] = {
            f"{m['cadence']}/E={m['epochs']}": {
                k: v / m["workers_saw"]["trials"] for k, v in m["servers"]["http_by_endpoint"].items()
            }
            for m in measured
            if m["kind"] == "cost"
        }

        log("one heartbeat's cost")
        heartbeat = heartbeat_cost(optuna_url, server, meter, databases, idle_rate)
        upload = {"mb": 0, "server_cpu_s_per_mb": 0.0}
        if args.upload_mb:
            log(f"the mlflow server's CPU per uploaded MB ({args.upload_mb} MB, twice)")
            upload = upload_cost(server.uri, tmp, server, meter, databases, idle_rate, args.upload_mb)
        # a worker's connections to the Optuna database (sampled every 0.5 s: rounded up)
        per_worker = math.ceil(max(m["peak_pg_connections"]["optuna"] / m["workers"] for m in measured))
        inputs = {
            "heartbeat": heartbeat,
            "upload": upload,
            "checkpoint_mb": args.checkpoint_mb,
            "model_mb": args.model_mb,
            "epoch_s": args.epoch_s,
            "rho_max": args.rho_max,
            "mlflow_server_workers": 4,  # docker-compose.yml's MLFLOW_SERVER_WORKERS default
            "connections": {
                "max_connections": args.max_connections,
                "reserved": 10,  # dashboard, launcher, report, psql
                # what MLflow's pools may open: compose's 4 uvicorn workers x SQLAlchemy's
                # pool_size 5 + max_overflow 10 (MLflow sets neither); the peak seen is beside it
                "mlflow_server": 4 * (5 + 10),
                "mlflow_server_peak_seen": max(m["peak_pg_connections"]["mlflow"] for m in measured),
                "per_worker": per_worker,
            },
        }
        result["inputs"] = inputs
        result["projection"] = [project(costs, inputs, seconds, cores) for seconds in (60.0, 600.0) for cores in (1, 4)]
        for p in result["projection"]:
            log(
                f"  {p['trial']['train_s']:.0f}s trials ({p['trial']['epochs']} epochs, {p['trial']['checkpoints']} "
                f"checkpoints), {p['cores']}-core servers: W <= {p['workers']} ({p['bound_by']}; postgres "
                f"{p['workers_by_postgres_cpu']:.0f}, mlflow {p['workers_by_mlflow_cpu']:.0f}, connections "
                f"{p['workers_by_connections']:.0f}), efficiency alone {p['efficiency_alone']:.1%}, at rho_max "
                f"{p['efficiency_at_rho_max']:.1%}"
            )
        result["check"] = []
        for m in measured:
            if m["kind"] != "check":
                continue
            predicted = predict_check(costs, m, os.cpu_count() or 1)
            measured_cpu = (
                m["servers"]["mlflow_server_busy_cpu_s"]
                + m["servers"]["cpu_s"]["postgres_optuna"]
                + m["servers"]["cpu_s"]["postgres_mlflow"]
            )
            check = {
                "workers": m["workers"],
                "trials": m["workers_saw"]["trials"],
                "predicted": predicted,
                "measured": {
                    "efficiency": m["workers_saw"]["efficiency"],
                    "server_cpu_s_per_trial": measured_cpu / max(m["workers_saw"]["trials"], 1),
                    "server_cpu_s_per_s": measured_cpu / m["workers_saw"]["span_s"],
                    "outside_training_s_per_trial": m["workers_saw"]["outside_training_s_per_trial"],
                    "worker_cpu_s_per_trial": m["per_trial"]["worker_cpu_s"],
                    "worker_runqueue_wait_s_per_trial": m["per_trial"]["worker_runqueue_wait_s"],
                    "outside_training_s_not_waiting_for_a_core": m["per_trial"]["worker_outside_training_s"]
                    - m["per_trial"]["worker_runqueue_wait_s"],
                    "loadavg_end": m["loadavg_end"],
                    "errors": m["workers_saw"]["errors"],
                },
            }
            result["check"].append(check)
            log(
                f"  check W={m['workers']}: efficiency {check['measured']['efficiency']:.0%} (model "
                f"{predicted['efficiency']:.0%}), server CPU {check['measured']['server_cpu_s_per_trial'] * 1000:.0f} "
                f"ms/trial (model {predicted['server_cpu_s_per_trial'] * 1000:.0f}), host CPU demand "
                f"{predicted['host_cpu_demand_share']:.0%} of {os.cpu_count()} cores, load {m['loadavg_end'][0]:.1f}; "
                f"outside training {check['measured']['outside_training_s_per_trial']:.1f}s per trial, of which "
                f"{check['measured']['worker_runqueue_wait_s_per_trial']:.1f}s waiting for a core; without those waits "
                f"{check['measured']['outside_training_s_not_waiting_for_a_core']:.1f}s (model "
                f"{predicted['outside_training_s_not_waiting_for_a_core']:.1f}s)"
            )
    finally:
        if pool is not None and pool.poll() is None:
            pool.kill()
        if meter is not None:
            meter.stop()
        if server is not None:
            server.stop()
        dbs.close()
        result["seconds"] = time.perf_counter() - started
        result["loadavg_end"] = os.getloadavg()
        if args.keep:
            result["tmp"] = str(tmp)
            log(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_summary(result)
    return 0


def print_summary(result: dict[str, Any]) -> None:
    print(
        f"server_cost {result['date']}, {result['cpus']} CPUs, load {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}"
    )
    for cadence, costs in result["costs"].items():
        print(f"checkpoint cadence {cadence}: per trial + per epoch")
        for key, v in costs.items():
            print(f"  {key:28s} {v['per_trial']:10.3f} + {v['per_epoch']:8.3f} x E")
    for p in result["projection"]:
        print(
            f"{p['trial']['train_s']:.0f}s trials, {p['cores']}-core servers: W <= {p['workers']} ({p['bound_by']}; "
            f"postgres CPU {p['workers_by_postgres_cpu']:.0f}, mlflow CPU {p['workers_by_mlflow_cpu']:.0f}, "
            f"connections {p['workers_by_connections']:.0f}), efficiency alone {p['efficiency_alone']:.1%}"
        )
    for c in result["check"]:
        print(
            f"check W={c['workers']}: efficiency {c['measured']['efficiency']:.0%} (model {c['predicted']['efficiency']:.0%}), "
            f"server CPU {c['measured']['server_cpu_s_per_trial'] * 1000:.0f} ms/trial (model {c['predicted']['server_cpu_s_per_trial'] * 1000:.0f})"
        )


if __name__ == "__main__":
    sys.exit(main())
