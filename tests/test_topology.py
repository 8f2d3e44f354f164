"""The docker-compose.yml topology exercised for real, without containers.

Every command and environment comes from docker-compose.yml itself (PyYAML resolves its
anchors), so this test breaks when the compose file and the CLI drift apart:

  postgres   two fresh databases from `pg_database()`: the Optuna storage and the MLflow
             backend store that docker/postgres/init-databases.sh creates.
  pgbouncer  a real PgBouncer (transaction pooling) in front of the Optuna storage, as in compose.
  mlflow     a real `mlflow server` with the service's own `command` and environment.
  worker     three `sweeper worker --forever` replicas (`--scale worker=3`) with the service's
             command and environment, each with a home of its own (a container's filesystem).
  launcher   `launch --study SPEC` through the service's entrypoint; `status` the same way.
  report     the service's entrypoint + `--study NAME --format json`.

Only what names the compose network or a container path is rewritten, explicitly: the
`postgres:5432` and `pgbouncer:6432` hosts, `http://mlflow:5000`, /data, /home/sweeper/.sweeper, /mlflow/artifacts,
--host/--port. Every other variable reaches the processes as compose would pass it (defaults
of .env.example applied, empty strings kept). The test asserts that every value it rewrites
still has the shape it expects, so a renamed host or path fails here with a message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from compose_rules import env_example, interpolate  # compose's own .env and ${VAR} rules, defined once
from helpers import free_port, sweeper, write_spec

yaml = pytest.importorskip("yaml")  # PyYAML comes with mlflow

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"

N_WORKERS = 3
VARIANTS = ("short4", "short3", "short2")
# Lean on a small shared CPU box, not part of what is tested: one uvicorn worker instead of
# compose's default 4 (MLFLOW_SERVER_WORKERS), and no MLflow job runner (8 more processes;
# sweeper runs no jobs).
LEAN_SERVER_ARGS = ["--workers=1"]
LEAN_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
EPOCH_METRICS = ("train_loss", "test_loss", "top1_error", "top5_error", "lr", "epoch_seconds", "images_per_s")

# Compose-network names and container paths, and what stands in for them here.
PG_HOST_IN_COMPOSE = "@postgres:5432/"
POOLER_IN_COMPOSE = "@pgbouncer:6432/"  # the Optuna storage goes through PgBouncer
TRACKING_IN_COMPOSE = "http://mlflow:5000"
DATA_DIR_IN_COMPOSE = "/data"
HOME_IN_COMPOSE = "/home/sweeper/.sweeper"


def service_environment(service: dict, variables: dict[str, str]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else interpolate(str(v), variables) for k, v in env.items()}


def image_entrypoint() -> list[str]:
    """The worker image's ENTRYPOINT (exec form), used when a service sets none."""
    (line,) = [ln for ln in WORKER_DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT ")]
    return json.loads(line.split(" ", 1)[1])


def sweeper_argv(service: dict, command: list[str] | None = None) -> list[str]:
    """The argv after `sweeper` for a service of the sweeper image (`command` replaces the
    service's, as `docker compose run SERVICE ARGS...` does)."""
    entrypoint = service.get("entrypoint") or image_entrypoint()
    assert entrypoint[0] == "sweeper", f"the sweeper image's services run `sweeper`, not {entrypoint!r}"
    return [*entrypoint[1:], *(service["command"] if command is None else command)]


def local_postgres(url: str, pg) -> str:
    """A compose PostgreSQL URL pointed at the test server instead of the `postgres` service."""
    assert PG_HOST_IN_COMPOSE in url, f"expected {PG_HOST_IN_COMPOSE!r} in the compose URL {url!r}"
    return url.replace(PG_HOST_IN_COMPOSE, f"@{pg.hostname}:{pg.port or 5432}/")


def local_pooler(url: str, bouncer) -> str:
    """A compose storage URL pointed at a real local PgBouncer instead of the `pgbouncer` service."""
    assert POOLER_IN_COMPOSE in url, f"expected {POOLER_IN_COMPOSE!r} in the compose URL {url!r}"
    return url.replace(POOLER_IN_COMPOSE, f"@127.0.0.1:{bouncer.port}/")


def process_env(compose_env: dict[str, str]) -> dict[str, str]:
    """A container's environment: the image's ENV, then the service's; nothing of this shell's
    sweeper/MLflow settings leaks in."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SWEEPER_", "MLFLOW_"))}
    venv_bin = str(Path(sys.executable).parent)
    base["PATH"] = f"{venv_bin}:{base.get('PATH', '')}"
    base.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")  # small CPU box
    return {**base, **compose_env}


def sweeper_env(
    service: dict, variables: dict[str, str], pooler, tracking_uri: str, data_dir: Path, home: Path
) -> dict[str, str]:
    """The service's environment with the compose-network URLs and container paths made local."""
    env = service_environment(service, variables)
    rewritten = {
        "SWEEPER_STORAGE": local_pooler(env["SWEEPER_STORAGE"], pooler),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "SWEEPER_DATA_DIR": str(data_dir),
        "SWEEPER_HOME": str(home),
    }
    assert env["MLFLOW_TRACKING_URI"] == TRACKING_IN_COMPOSE, env["MLFLOW_TRACKING_URI"]
    assert env["SWEEPER_DATA_DIR"] == DATA_DIR_IN_COMPOSE, env["SWEEPER_DATA_DIR"]
    assert env["SWEEPER_HOME"] == HOME_IN_COMPOSE, env["SWEEPER_HOME"]
    kept = {k: v for k, v in env.items() if k not in rewritten}
    for key, value in kept.items():  # a new URL or path in the compose env needs a rewrite rule here
        assert "://" not in value and not value.startswith("/"), f"{key}={value!r} is not rewritten"
    home.mkdir(parents=True, exist_ok=True)
    return process_env({**kept, **rewritten})


# --- processes ------------------------------------------------------------------------------


def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def wait_group_gone(pgid: int, timeout: float = 15) -> list[int]:
    """The group's live processes once it emptied or the timeout passed (SIGKILL is not instant)."""
    deadline = time.monotonic() + timeout
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if not wait_group_gone(proc.pid, timeout=5):
            return


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except Exception:
            assert proc.poll() is None, f"the server exited {proc.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout:.0f}s:\n{tail(log)}"
            time.sleep(0.5)


# --- the test -------------------------------------------------------------------------------


@pytest.mark.slow
def test_compose_topology_without_containers(pg_database, pgbouncer, tmp_path):
    started = time.monotonic()

    def phase(name: str) -> None:  # shown with -s: where the time goes on a loaded machine
        print(f"[topology] {time.monotonic() - started:6.1f}s {name}")

    services = yaml.safe_load(COMPOSE.read_text())["services"]

    # postgres: the two databases of init-databases.sh
    optuna_db, mlflow_db = pg_database(), pg_database()
    pooler = pgbouncer(pool_size=10)  # the `pgbouncer` service: the workers' storage goes through it
    pg = urlsplit(optuna_db)
    assert urlsplit(mlflow_db).netloc == pg.netloc, "both databases live on the one `postgres` service"
    port = free_port()
    variables = {
        **env_example(),
        "POSTGRES_USER": pg.username or "postgres",
        "POSTGRES_PASSWORD": pg.password or "ignored-by-trust-auth",
        "SWEEPER_OPTUNA_DB": pg.path.lstrip("/"),
        "SWEEPER_MLFLOW_DB": urlsplit(mlflow_db).path.lstrip("/"),
        "MLFLOW_PORT": str(port),
    }

    # mlflow: the service's command, with the container's host, port and volume made local
    mlflow_service = services["mlflow"]
    assert "entrypoint" not in mlflow_service, "the mlflow service is expected to run its `command` as is"
    args = [interpolate(a, variables) for a in mlflow_service["command"]]
    assert args[:2] == ["mlflow", "server"], args
    assert "--serve-artifacts" in args, "workers must upload artifacts through the server"
    artifacts = tmp_path / "mlflow" / "artifacts"
    for old, new in (
        ("--host=0.0.0.0", "--host=127.0.0.1"),
        ("--port=5000", f"--port={port}"),
        ("--artifacts-destination=/mlflow/artifacts", f"--artifacts-destination={artifacts}"),
    ):
        assert args.count(old) == 1, f"mlflow command: expected {old!r} once in {args}"
        args[args.index(old)] = new
    (allowed,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--allowed-hosts=")]
    assert f"127.0.0.1:{port}" in allowed and "*" not in allowed and "" not in allowed, allowed
    (origins,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--cors-allowed-origins=")]
    assert origins and "*" not in origins and "" not in origins, origins
    assert not any(a.startswith("--backend-store-uri") for a in args), "the backend store comes from the environment"
    (workers,) = [a for a in args if a.startswith(("--workers", "-w"))]
    args[args.index(workers)] = LEAN_SERVER_ARGS[0]
    mlflow_env = service_environment(mlflow_service, variables)
    backend = local_postgres(mlflow_env["MLFLOW_BACKEND_STORE_URI"], pg)
    assert urlsplit(backend).path == urlsplit(mlflow_db).path and backend.startswith("postgresql+psycopg2://")
    args[0] = str(Path(sys.executable).parent / "mlflow")
    server_log = tmp_path / "mlflow" / "server.log"
    artifacts.mkdir(parents=True)
    server_url = f"http://127.0.0.1:{port}"

    spec = write_spec(
        tmp_path / "topo.toml",
        variants=VARIANTS,
        datasets=("digits",),
        seeds=(1,),
        epochs=1,
        limit_train=64,
        limit_test=32,
    )
    study = spec.stem
    keys = {f"{v}/digits/s1" for v in VARIANTS}
    data_dir = tmp_path / "data"  # the sweeper-data volume, shared by every replica
    data_dir.mkdir()

    server: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = []
    worker_logs = [tmp_path / f"worker-{i + 1}" / "worker.log" for i in range(N_WORKERS)]

    def logs() -> str:
        return "\n".join(f"--- worker {i + 1}:\n{tail(p)}" for i, p in enumerate(worker_logs))

    try:
        server = start(
            args,
            process_env({**mlflow_env, "MLFLOW_BACKEND_STORE_URI": backend, **LEAN_SERVER_ENV}),
            cwd=tmp_path / "mlflow",
            log=server_log,
        )
        # compose's healthcheck asks /health (start_period 180s: the first start migrates the schema)
        wait_healthy(f"{server_url}/health", server, server_log, timeout=180)
        phase("mlflow server healthy")
        # --allowed-hosts is in force: a Host header not on the list is refused
        request = urllib.request.Request(
            f"{server_url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": "attacker.example"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (400, 403), refused.value.code

        # worker x3 (`up --scale worker=3`): same command and environment, a filesystem each
        worker_service = services["worker"]
        worker_argv = [sys.executable, "-m", "sweeper", *sweeper_argv(worker_service), "--poll-interval=1"]
        assert worker_argv[3:5] == ["worker", "--forever"], worker_argv
        for i in range(N_WORKERS):
            root = tmp_path / f"worker-{i + 1}"
            env = sweeper_env(worker_service, variables, pooler, server_url, data_dir, root / "home")
            workers.append(start(worker_argv, env, cwd=root / "cwd", log=worker_logs[i]))

        # launcher: `docker compose run --rm launcher launch --study SPEC`
        launcher_service = services["launcher"]
        tools_env = sweeper_env(
            launcher_service, variables, pooler, server_url, data_dir, tmp_path / "launcher" / "home"
        )
        sweeper(
            *sweeper_argv(launcher_service, ["launch", "--study", str(spec)]),
            env=tools_env,
            cwd=tmp_path / "launcher",
            timeout=180,
        )
        phase("study launched")

        # the worker's healthcheck command, with a worker's environment, while they run
        check = worker_service["healthcheck"]["test"]
        assert check[:2] == ["CMD", "sweeper"], check
        doctor = sweeper(
            *check[2:],
            env=sweeper_env(worker_service, variables, pooler, server_url, data_dir, tmp_path / "doctor" / "home"),
            check=False,
            timeout=120,
        )
        assert doctor.returncode == 0, f"{' '.join(check[1:])} failed:\n{doctor.stdout}\n{doctor.stderr}"

        # wait (bounded) through `run --rm launcher status --study NAME --format json`
        # (a status call costs a few CPU seconds: asked every 20s, or as soon as the workers'
        # logs say every cell completed)
        deadline = time.monotonic() + 300
        asked = 0.0
        while True:
            for i, w in enumerate(workers):
                assert w.poll() is None, f"worker {i + 1} exited {w.returncode}:\n{logs()}"
            completed = sum(
                len(re.findall(r"trial \d+: \S+ complete", p.read_text(errors="replace"))) for p in worker_logs
            )
            if completed >= len(keys) or time.monotonic() - asked > 20:
                asked = time.monotonic()
                status = json.loads(
                    sweeper(
                        *sweeper_argv(launcher_service, ["status", "--study", study, "--format", "json"]),
                        env=tools_env,
                        timeout=120,
                    ).stdout
                )
                if status["counts"]["COMPLETE"] == len(keys):
                    break
                assert status["counts"]["FAIL"] == 0, f"a trial failed: {status['trials']}\n{logs()}"
            assert time.monotonic() < deadline, f"not complete after 300s: {status['counts']}\n{logs()}"
            time.sleep(1)
        phase("all cells COMPLETE")
        assert status["counts"] == {"WAITING": 0, "RUNNING": 0, "COMPLETE": 3, "PRUNED": 0, "FAIL": 0}, status
        assert {t["cell"] for t in status["trials"]} == keys
        assert all(t["epoch"] == 1 and t["epochs"] == 1 for t in status["trials"]), status["trials"]
        assert all(t["host"] for t in status["trials"]), "every trial records its worker's host (sweeper.host)"
        assert "postgres" in status["storage"] and status["tracking_uri"] == server_url

        # no worker crashed: all three still serve the queue; each cell was claimed exactly once
        for i, w in enumerate(workers):
            assert w.poll() is None, f"worker {i + 1} exited {w.returncode}:\n{logs()}"
        texts = [p.read_text(errors="replace") for p in worker_logs]
        assert not any("Traceback" in t for t in texts), logs()
        assert sum(len(re.findall(r"trial \d+: \S+ claimed", t)) for t in texts) == len(keys), logs()

        # MLflow, through the server: one FINISHED run per cell, each epoch once, proxied artifacts
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=server_url)
        experiment = client.get_experiment_by_name(study)
        assert experiment is not None, f"no MLflow experiment {study}"
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        assert len([r for r in runs if r.data.tags.get("sweeper.role") == "study"]) == 1, "one parent run"
        cells = [r for r in runs if r.data.tags.get("sweeper.role") == "cell"]
        assert sorted(r.data.tags["sweeper.key"] for r in cells) == sorted(keys), "exactly one run per cell"
        for run in cells:
            run_id = run.info.run_id
            assert run.info.status == "FINISHED", (run.data.tags.get("sweeper.key"), run.info.status)
            assert run.data.tags.get("sweeper.host"), run.data.tags
            for metric in EPOCH_METRICS:
                steps = [m.step for m in client.get_metric_history(run_id, metric)]
                assert steps == [1], f"{run.data.tags['sweeper.key']}: {metric} logged at steps {steps}"
            assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
            # One epoch: the trial ends with its model, and the last epoch is never checkpointed.
            assert not client.list_artifacts(run_id, "checkpoint")
            (model,) = client.search_logged_models(
                [experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'"
            )  # named after the cell: what mlflow.pytorch.load_model(f"models:/{model.model_id}") loads
            assert model.status.name == "READY" and model.artifact_location.startswith("mlflow-artifacts:")
            on_disk = list(artifacts.rglob(f"models/{model.model_id}/artifacts/data/model.pt2"))
            assert len(on_disk) == 1 and on_disk[0].stat().st_size > 0, f"model {model.model_id} not in {artifacts}"
        for i in range(N_WORKERS):  # nothing went around the server into a worker's own filesystem
            cwd = tmp_path / f"worker-{i + 1}" / "cwd"
            assert not {"mlruns", "mlartifacts", "mlflow.db"} & {p.name for p in cwd.iterdir()}, list(cwd.iterdir())

        phase("MLflow checked")
        # report: `docker compose run --rm report --study NAME --format json`
        report_service = services["report"]
        report = sweeper(
            *sweeper_argv(report_service, ["--study", study, "--format", "json"]),
            env=tools_env,
            timeout=180,
            check=False,
        )
        assert report.returncode == 0, f"REPORT SERVICE: `sweeper report` failed:\n{report.stdout}\n{report.stderr}"
        rows = json.loads(report.stdout)
        assert sorted(r["variant"] for r in rows) == sorted(VARIANTS), f"REPORT SERVICE: {rows}"
        assert all(r["state"] == "COMPLETE" and r["dataset"] == "digits" for r in rows), f"REPORT SERVICE: {rows}"

        phase("report checked")
        # `docker compose stop`: the service's stop_signal; each worker exits 0 well within the grace period
        stop_signal = signal.Signals[worker_service.get("stop_signal", "SIGTERM")]
        for w in workers:
            w.send_signal(stop_signal)  # tini (init: true) forwards it to the worker alone
        for i, w in enumerate(workers):
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {i + 1} ignored {stop_signal.name} for 30s:\n{logs()}")
            assert w.returncode == 0, f"worker {i + 1} exited {w.returncode} on {stop_signal.name}:\n{logs()}"
            left = wait_group_gone(w.pid)
            assert not left, f"worker {i + 1} left processes behind: {left}"
        phase("workers stopped")
    finally:
        for w in workers:
            kill_group(w)
        if server is not None:
            kill_group(server, signal.SIGTERM)
    assert server is not None and not wait_group_gone(server.pid), "the MLflow server left processes behind"
    phase("mlflow server stopped")
