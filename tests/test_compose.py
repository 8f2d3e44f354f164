"""Static checks of the container deployment: docker-compose.yml (+ the CPU override), the
Dockerfiles, .env.example, .dockerignore, the PostgreSQL init script and the Kubernetes Job.

The compose file is read with PyYAML (``safe_load`` resolves the anchors and ``<<`` merge keys
the file is built from). Then ``docker-compose config`` validates it for real: skipped with a
reason when no compose binary is installed, unless SWEEPER_REQUIRE_COMPOSE=1 (CI), which turns
the skip into a failure. Nothing here needs a Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from compose_rules import INTERPOLATION, env_example, interpolate, load_compose, strings, variables_used

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
MLFLOW_DOCKERFILE = ROOT / "docker" / "mlflow.Dockerfile"
DASHBOARD_DOCKERFILE = ROOT / "docker" / "dashboard.Dockerfile"
DASHBOARD_SERVE = ROOT / "docker" / "dashboard" / "serve.py"
POSTGRES_DOCKERFILE = ROOT / "docker" / "postgres.Dockerfile"
PGBOUNCER_DOCKERFILE = ROOT / "docker" / "pgbouncer.Dockerfile"
PGBOUNCER_ENTRYPOINT = ROOT / "docker" / "pgbouncer" / "entrypoint.sh"
POSTGRES_ENTRYPOINT = ROOT / "docker" / "postgres" / "entrypoint.sh"
INIT_DATABASES = ROOT / "docker" / "postgres" / "init-databases.sh"
BUILD_LOCAL = ROOT / "docker" / "build-local.sh"
K8S_JOB = ROOT / "docker" / "k8s" / "worker-job.yaml"
K8S_PGBOUNCER = ROOT / "docker" / "k8s" / "pgbouncer.yaml"

LONG_RUNNING = ("postgres", "pgbouncer", "mlflow", "dashboard", "worker")
PUBLISHED_ON_LOOPBACK = ("mlflow", "mlflow-auth", "dashboard")
SWEEPER_SERVICES = ("worker", "worker-cpu", "data", "launcher", "report")
REQUIRE_COMPOSE = os.environ.get("SWEEPER_REQUIRE_COMPOSE") == "1"

SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$", re.IGNORECASE)
URL_USERINFO = re.compile(r"://([^/@\s:]+):([^/@\s]+)@")


# --- helpers ----------------------------------------------------------------------------------
# (how compose reads .env.example and ${VAR}: compose_rules.py, shared with the other compose tests)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on must use the long form with a condition"
    return deps


def port_specs(service: dict) -> list[str]:
    specs = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # long syntax
            specs.append(f"{port.get('host_ip', '')}:{port.get('published', '')}:{port.get('target')}")
        else:
            specs.append(str(port))
    return specs


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, args = line.partition(" ")
        instructions.append((word.upper(), args.strip()))
    return instructions


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    total, found = 0.0, False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text):
        total += float(number) * units[unit]
        found = True
    assert found, f"not a duration: {text!r}"
    return total


# --- the compose file ---------------------------------------------------------------------


def test_long_running_services_have_healthchecks(services):
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        if check is None and name == "worker":  # allowed to come from the image
            assert any(i == "HEALTHCHECK" for i, _ in dockerfile(WORKER_DOCKERFILE))
            continue
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name}'s healthcheck is disabled"
        assert check.get("test") and check["test"] != ["NONE"], name
        if check["test"][0] == "CMD":  # podman's Docker API splits CMD arguments at spaces
            assert not any(" " in arg for arg in check["test"][1:]), f"{name}: use CMD-SHELL for {check['test']}"


def test_worker_healthcheck_is_sweeper_doctor(services):
    for name in ("worker", "worker-cpu"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "sweeper", "doctor", "--quiet"]
    (args,) = [a for i, a in dockerfile(WORKER_DOCKERFILE) if i == "HEALTHCHECK"]
    assert args.split("CMD", 1)[1].strip() == '["sweeper", "doctor", "--quiet"]'


def test_postgres_is_not_published(services):
    postgres = services["postgres"]
    assert not postgres.get("ports"), "PostgreSQL must not be published on the host"
    assert postgres.get("network_mode") != "host"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_uis_bind_loopback_only(services):
    for name in PUBLISHED_ON_LOOPBACK:
        specs = port_specs(services[name])
        assert specs, f"{name} publishes nothing"
        for spec in specs:
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec!r} beyond 127.0.0.1"
    for name, service in services.items():
        if name not in PUBLISHED_ON_LOOPBACK:
            assert not service.get("ports"), f"{name} publishes a port"
        assert service.get("network_mode") != "host", name


def test_worker_scales(services):
    for name in ("worker", "worker-cpu"):
        worker = services[name]
        assert "container_name" not in worker, f"{name}: container_name forbids --scale"
        assert not worker.get("ports"), f"{name}: host ports forbid --scale"
        assert worker["restart"] == "unless-stopped"
        assert worker["command"] == ["worker", "--forever"]
        assert worker.get("init") is True  # signals reach the worker, children are reaped


def test_worker_reserves_all_gpus(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker-cpu"], "worker-cpu must not reserve GPUs"


def test_worker_gets_both_urls_and_a_host_id(services):
    env = {k: interpolate(v, env_example()) for k, v in environment(services["worker"]).items()}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["SWEEPER_STORAGE"].startswith("postgresql+psycopg2://")
    assert "@pgbouncer:6432/" in env["SWEEPER_STORAGE"]  # through the pooler (docs/DEPLOY.md)
    assert env["SWEEPER_DATA_DIR"] == "/data"
    assert env["SWEEPER_HOST_ID"], "replicas must share a host id for GPU slots"


def test_worker_waits_for_data_and_mounts_it_read_only(services):
    for name in ("worker", "worker-cpu"):
        worker = services[name]
        assert depends_on(worker)["data"] == {"condition": "service_completed_successfully"}
        data_mounts = [v for v in worker["volumes"] if str(v).startswith("sweeper-data:")]
        assert data_mounts == ["sweeper-data:/data:ro"], data_mounts
    data = services["data"]
    # `sh -c` splits SWEEPER_DATASETS into arguments; CIFAR by default, digits alone offline.
    assert data["entrypoint"][:2] == ["/bin/sh", "-c"]
    assert data["entrypoint"][2] == "exec sweeper data fetch $$SWEEPER_DATASETS"
    assert interpolate(environment(data)["SWEEPER_DATASETS"], {}) == "cifar10 cifar100"
    assert environment(data)["SWEEPER_STORAGE"] == environment(services["worker"])["SWEEPER_STORAGE"]
    assert data.get("restart", "no") == "no"
    assert "sweeper-data:/data" in data["volumes"]


def test_worker_stop_grace_period_leaves_time_to_checkpoint(services):
    grace = interpolate(str(services["worker"]["stop_grace_period"]), {})
    assert duration_seconds(grace) >= 60


def test_depends_on_conditions(services):
    completed = {"data"}
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep in completed else "service_healthy"
            assert spec == {"condition": want}, f"{name} -> {dep}: {spec}"
            if want == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}, which has no healthcheck"
    for name in ("mlflow", "dashboard"):
        assert "postgres" in depends_on(services[name])
    assert set(depends_on(services["worker"])) == {"postgres", "pgbouncer", "mlflow", "data"}
    assert set(depends_on(services["pgbouncer"])) == {"postgres"}


def test_tools_are_behind_a_profile(services):
    launcher, report = services["launcher"], services["report"]
    assert launcher["profiles"] == ["tools"]
    assert launcher["entrypoint"] == ["sweeper"]  # run --rm launcher launch --study NAME
    assert report["profiles"] == ["tools"]
    assert report["entrypoint"] == ["sweeper", "report"]  # run --rm report --study NAME
    for name in ("mlflow-auth", "worker-cpu"):
        assert services[name].get("profiles"), f"{name} must be opt-in"
    enabled_by_default = {n for n, s in services.items() if not s.get("profiles")}
    assert enabled_by_default == {"postgres", "pgbouncer", "mlflow", "dashboard", "data", "worker"}


def test_sweeper_services_share_one_image(services):
    images = {services[n]["image"] for n in SWEEPER_SERVICES}
    builds = {json.dumps(services[n]["build"], sort_keys=True) for n in SWEEPER_SERVICES}
    assert len(images) == 1 and len(builds) == 1
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"


def test_no_secrets_in_compose_files():
    for path in (COMPOSE, COMPOSE_CPU):
        doc = load_compose(path)
        for name, service in (doc.get("services") or {}).items():
            for key, value in environment(service).items():
                if SECRET_KEY.search(key):
                    assert value == "" or re.fullmatch(r"\$\{[^}]+\}", value), (
                        f"{path.name}: {name}.{key} is not a ${{...}} interpolation"
                    )
        for where, value in strings(doc):
            for _, password in URL_USERINFO.findall(value):
                assert re.fullmatch(r"\$\{[^}]+\}", password), f"{path.name}{where}: literal password in URL"
        for where, value in strings(doc):
            if "CHANGE-ME" in value:  # only the auth start script may name the placeholder, to refuse it
                assert where.startswith(".services.mlflow-auth.entrypoint"), f"{path.name}{where}"


def test_only_core_secrets_are_required_by_compose():
    """A `${VAR:?}` is evaluated for every service, profile or not: the auth profile's secrets
    must be checked inside its container, or a plain `up` would demand them."""
    required = {
        m.group(1) for _, s in strings(load_compose()) for m in INTERPOLATION.finditer(s) if m.group(2) in (":?", "?")
    }
    assert required == {"POSTGRES_PASSWORD"}
    script = " ".join(load_compose()["services"]["mlflow-auth"]["entrypoint"])
    assert "$${MLFLOW_AUTH_ADMIN_PASSWORD:?" in script
    assert "$${MLFLOW_FLASK_SERVER_SECRET_KEY:?" in script
    assert "CHANGE-ME" in script  # the placeholder is refused too


def test_mlflow_server_flags(services):
    env = env_example()
    for name, host, port in (
        ("mlflow", "mlflow", env["MLFLOW_PORT"]),
        ("mlflow-auth", "mlflow-auth", env["MLFLOW_AUTH_PORT"]),
    ):
        args = [interpolate(a, env) for a in services[name]["command"]]
        assert "--serve-artifacts" in args
        assert "--artifacts-destination=/mlflow/artifacts" in args
        assert "--host=0.0.0.0" in args and "--port=5000" in args
        (hosts,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--allowed-hosts=")]
        assert {host, f"{host}:5000", f"localhost:{port}", f"127.0.0.1:{port}"} <= set(hosts)
        assert "*" not in hosts and "" not in hosts
        (origins,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--cors-allowed-origins=")]
        assert "*" not in origins and "" not in origins
        assert "MLFLOW_BACKEND_STORE_URI" in environment(services[name])
        assert "/mlflow" in [v.split(":")[1] for v in services[name]["volumes"]]
    assert "--app-name=basic-auth" in services["mlflow-auth"]["command"]
    assert not any("app-name" in a for a in services["mlflow"]["command"])
    assert {"mlflow", "mlflow:5000", "localhost:5000", "127.0.0.1:5000"} <= set(
        interpolate(next(a for a in services["mlflow"]["command"] if a.startswith("--allowed-hosts=")), {})
        .split("=", 1)[1]
        .split(",")
    )


def test_mlflow_pool_outnumbers_its_request_threads_and_postgres_has_room_for_it(services):
    """MLflow 3.17's log-batch holds a pooled connection while it asks for a second: with fewer
    connections than a uvicorn worker's request threads (anyio's limiter), a fleet's burst left
    every connection held by a request waiting for another and the server stopped answering
    (MLflow's default pool, 5 + 10, against 40 threads). So each server pools more than its
    threads, and PostgreSQL's default max_connections covers every uvicorn worker's pool at its
    largest plus PgBouncer's."""
    import anyio
    import anyio.to_thread

    async def request_threads() -> int:
        return anyio.to_thread.current_default_thread_limiter().total_tokens

    threads, env = anyio.run(request_threads), env_example()
    pools = {}
    for name in ("mlflow", "mlflow-auth"):
        env_of = environment(services[name])
        pools[name] = sum(int(env_of[f"MLFLOW_SQLALCHEMYSTORE_{key}"]) for key in ("POOL_SIZE", "MAX_OVERFLOW"))
        assert pools[name] > threads, (name, pools[name], threads)
    (workers,) = [interpolate(a, {}) for a in services["mlflow"]["command"] if a.startswith("--workers=")]
    (max_connections,) = [interpolate(a, {}) for a in services["postgres"]["command"] if "max_connections" in a]
    needed = int(workers.split("=")[1]) * pools["mlflow"] + int(env["PGBOUNCER_POOL_SIZE"])
    assert int(max_connections.split("=")[1]) >= needed
    assert int(env["POSTGRES_MAX_CONNECTIONS"]) >= needed


def test_databases_are_separate(services):
    env = env_example()
    storage = interpolate(environment(services["worker"])["SWEEPER_STORAGE"], env)
    backend = interpolate(environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"], env)
    assert storage.rsplit("/", 1)[1] == env["SWEEPER_OPTUNA_DB"]
    assert backend.rsplit("/", 1)[1] == env["SWEEPER_MLFLOW_DB"]
    assert storage.rsplit("/", 1)[1] != backend.rsplit("/", 1)[1]
    assert interpolate(environment(services["dashboard"])["SWEEPER_STORAGE"], env) == storage
    postgres = services["postgres"]
    assert postgres["build"] == {"context": "docker", "dockerfile": "postgres.Dockerfile"}
    steps = dockerfile(POSTGRES_DOCKERFILE)
    assert ("COPY", "postgres/init-databases.sh /docker-entrypoint-initdb.d/10-init-databases.sh") in steps
    assert {"SWEEPER_OPTUNA_DB", "SWEEPER_MLFLOW_DB"} <= set(environment(postgres))
    assert any(v.startswith("postgres-data:") for v in postgres["volumes"])


def test_named_volumes_declared(compose):
    assert {"postgres-data", "mlflow-artifacts", "sweeper-data"} <= set(compose["volumes"])


def test_header_documents_every_variable():
    header = "\n".join(line for line in COMPOSE.read_text().splitlines() if line.startswith("#"))
    for name in variables_used(COMPOSE):
        assert re.search(rf"^#\s+{name}\s", header, re.MULTILINE), f"{name} is not documented in the header"


def test_env_example_covers_every_variable():
    env = env_example()
    for path in (COMPOSE, COMPOSE_CPU):
        missing = variables_used(path) - set(env)
        assert not missing, f".env.example lacks {sorted(missing)} (used in {path.name})"
    for key, value in env.items():
        if SECRET_KEY.search(key):
            assert value in ("", "CHANGE-ME"), f".env.example: {key} must be a CHANGE-ME placeholder"
    assert env["POSTGRES_PASSWORD"] == "CHANGE-ME"


def test_cpu_override_switches_worker_off():
    override = load_compose(COMPOSE_CPU)["services"]
    assert override == {"worker": {"profiles": ["gpu"]}}
    assert load_compose()["services"]["worker-cpu"]["profiles"] == ["cpu"]


# --- Dockerfiles, .dockerignore, init script, Kubernetes ------------------------------------


def test_worker_dockerfile_layers_and_user():
    steps = dockerfile(WORKER_DOCKERFILE)
    kinds = [i for i, _ in steps]
    froms = [a for i, a in steps if i == "FROM"]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in steps if i == "ARG" and "=" in a}
    base = froms[0].replace("${BASE_IMAGE}", args.get("BASE_IMAGE", ""))
    assert re.match(r"pytorch/pytorch:2\.\d+(\.\d+)?-cuda12\.\d+-cudnn9-runtime$", base), base

    def index(kind: str, needle: str) -> int:
        return next(n for n, (i, a) in enumerate(steps) if i == kind and needle in a)

    first_copy = kinds.index("COPY")
    assert steps[first_copy][1].split() == ["pyproject.toml", "./"], "pyproject.toml must be copied alone, first"
    deps = index("RUN", "pip install -c")
    source = index("COPY", "sweeper/")
    assert first_copy < deps < source < index("COPY", "experiments/") < index("RUN", "--no-deps")
    assert "constraints" in steps[deps][1]  # torch stays the base image's
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the worker must run as a non-root USER"
    assert kinds.index("USER") > index("RUN", "--no-deps")
    assert exec_form(next(a for i, a in steps if i == "ENTRYPOINT")) == ["sweeper"]
    assert exec_form(next(a for i, a in steps if i == "CMD")) == ["worker", "--forever"]


def test_service_dockerfiles():
    mlflow = dockerfile(MLFLOW_DOCKERFILE)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in mlflow if i == "ARG" and "=" in a}
    (base,) = [a for i, a in mlflow if i == "FROM"]
    base = base.replace("${MLFLOW_BASE_IMAGE}", args["MLFLOW_BASE_IMAGE"])
    assert base.replace("${MLFLOW_VERSION}", args["MLFLOW_VERSION"]).startswith("ghcr.io/mlflow/mlflow:v3.")
    installs = " ".join(a for i, a in mlflow if i == "RUN")
    assert "psycopg2-binary" in installs and "mlflow[auth]" in installs
    assert "admin_password" not in MLFLOW_DOCKERFILE.read_text().replace("# admin_password", "")
    dashboard = dockerfile(DASHBOARD_DOCKERFILE)
    assert "psycopg2-binary" in " ".join(a for i, a in dashboard if i == "RUN")
    for steps, path in ((mlflow, MLFLOW_DOCKERFILE), (dashboard, DASHBOARD_DOCKERFILE)):
        users = [a for i, a in steps if i == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{path.name} runs as root"
        assert any(i == "HEALTHCHECK" for i, _ in steps), path.name


def test_pgbouncer_serves_the_optuna_storage_in_transaction_mode(services, tmp_path):
    """The pooler of docs/DEPLOY.md: Debian's pgbouncer, not root, a healthcheck; the entrypoint
    writes a transaction-pooling config for the Optuna database (run here with a stand-in
    `pgbouncer` that prints the config it is given)."""
    steps = dockerfile(PGBOUNCER_DOCKERFILE)
    assert "pgbouncer" in " ".join(a for i, a in steps if i == "RUN")
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(i == "HEALTHCHECK" for i, _ in steps)
    assert PGBOUNCER_ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    env = {k: interpolate(v, env_example()) for k, v in environment(services["pgbouncer"]).items()}
    fake = tmp_path / "bin" / "pgbouncer"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncat "$1"\n')
    fake.chmod(0o755)
    run_env = {**env, "PATH": f"{fake.parent}:{os.environ['PATH']}", "PGBOUNCER_CONFIG_DIR": str(tmp_path / "conf")}
    run_env["POSTGRES_PASSWORD"] = 'pa"ss'
    ini = subprocess.run(
        ["bash", str(PGBOUNCER_ENTRYPOINT)], env=run_env, capture_output=True, text=True, check=True
    ).stdout
    settings = dict(line.split(" = ", 1) for line in ini.splitlines() if " = " in line)
    assert settings["pool_mode"] == "transaction"
    assert settings["default_pool_size"] == settings["max_db_connections"] == "30"
    assert settings["optuna"] == "host=postgres port=5432"
    assert settings["auth_type"] == "scram-sha-256"
    assert "options" not in settings.get("ignore_startup_parameters", "")  # would drop settings silently
    assert (tmp_path / "conf" / "userlist.txt").read_text() == '"sweeper" "pa""ss"\n'
    assert stat.S_IMODE((tmp_path / "conf" / "userlist.txt").stat().st_mode) == 0o600
    assert "pa" not in " ".join(services["pgbouncer"].get("command") or [])


def test_postgres_dockerfile_keeps_the_official_image_by_default():
    steps = dockerfile(POSTGRES_DOCKERFILE)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in steps if i == "ARG" and "=" in a}
    assert args["POSTGRES_BASE"] == "postgres:16"
    assert [a for i, a in steps if i == "FROM"] == ["${POSTGRES_BASE}"]
    assert exec_form(next(a for i, a in steps if i == "ENTRYPOINT")) == ["sweeper-postgres-entrypoint.sh"]
    assert exec_form(next(a for i, a in steps if i == "CMD")) == ["postgres"]
    assert POSTGRES_ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def run_postgres_entrypoint(tmp_path: Path, password: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    """docker/postgres/entrypoint.sh with a stand-in for the base image's docker-entrypoint.sh
    that records its arguments (the real image runs in tests/e2e)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    handed_over = tmp_path / "handed-over"
    stand_in = bin_dir / "docker-entrypoint.sh"
    stand_in.write_text(f'#!/bin/sh\necho "$@" > {shlex.quote(str(handed_over))}\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    proc = subprocess.run(
        ["sh", str(POSTGRES_ENTRYPOINT), "postgres", "-c", "max_connections=200"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc, handed_over


@pytest.mark.parametrize("placeholder", ["CHANGE-ME", "CHANGE-ME-too"])
def test_postgres_refuses_the_env_example_placeholder(tmp_path, placeholder):
    proc, handed_over = run_postgres_entrypoint(tmp_path, placeholder)
    assert proc.returncode == 1
    assert "POSTGRES_PASSWORD" in proc.stderr and ".env" in proc.stderr
    assert placeholder not in proc.stderr.replace("CHANGE-ME placeholder", "")
    assert not handed_over.exists(), "PostgreSQL must not be initialised with the placeholder"


def test_postgres_entrypoint_hands_over_with_a_real_password(tmp_path):
    proc, handed_over = run_postgres_entrypoint(tmp_path, "s3cret-Xy7")
    assert proc.returncode == 0, proc.stderr
    assert handed_over.read_text().split() == ["postgres", "-c", "max_connections=200"]


def test_dashboard_storage_url_is_on_no_command_line():
    """`ps` on the host shows the arguments of container processes: the URL with the
    password must stay in the environment (SWEEPER_STORAGE)."""
    steps = dockerfile(DASHBOARD_DOCKERFILE)
    for kind in ("ENTRYPOINT", "CMD"):
        for arg in exec_form(next((a for i, a in steps if i == kind), "[]")):
            assert "SWEEPER_STORAGE" not in arg, f"dashboard.Dockerfile {kind} passes the storage URL as an argument"
    dashboard = load_compose()["services"]["dashboard"]
    assert "command" not in dashboard and "entrypoint" not in dashboard
    assert "SWEEPER_STORAGE" in environment(dashboard)


@pytest.mark.slow
def test_dashboard_serve_reads_the_url_from_the_environment(postgres_available, pg_database, tmp_path):
    """docker/dashboard/serve.py, the image's entrypoint, on real PostgreSQL: the dashboard
    answers, and neither its command line nor its output holds the password."""
    from helpers import free_port

    url = pg_database().replace("postgresql://postgres@", "postgresql+psycopg2://postgres:pw-Not-In-Argv@")
    port = free_port()
    env = {**os.environ, "SWEEPER_STORAGE": url, "DASHBOARD_BIND": f"127.0.0.1:{port}"}
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(DASHBOARD_SERVE)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        pids = [proc.pid] + [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert "pw-Not-In-Argv" not in cmdline and "SWEEPER_STORAGE" not in cmdline
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "pw-Not-In-Argv" not in log.read_text()


def test_dashboard_serve_without_a_url_says_what_to_set():
    env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    proc = subprocess.run([sys.executable, str(DASHBOARD_SERVE)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "SWEEPER_STORAGE" in proc.stderr and "Traceback" not in proc.stderr


def test_build_local_script():
    text = BUILD_LOCAL.read_text()
    assert BUILD_LOCAL.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(BUILD_LOCAL)], check=True)
    # The images docker-compose.yml names, each built from the published Dockerfile.
    services = load_compose()["services"]
    for name in ("postgres", "pgbouncer", "mlflow", "dashboard", "worker"):
        build = services[name]["build"]
        dockerfile_path = (Path(build["context"]) / build["dockerfile"]).as_posix()
        dockerfile_path = dockerfile_path.removeprefix("./")
        assert f" {dockerfile_path} " in text, f"build-local.sh does not build {dockerfile_path}"
    for image in (
        "sweeper-postgres:latest",
        "sweeper-pgbouncer:latest",
        "sweeper-mlflow:latest",
        "sweeper-dashboard:latest",
    ):
        assert f"build {image} " in text
    assert 'build "$IMAGE" docker/worker.Dockerfile' in text and "SWEEPER_IMAGE:-sweeper:latest" in text


def test_no_install_at_container_start():
    for path in (WORKER_DOCKERFILE, MLFLOW_DOCKERFILE, DASHBOARD_DOCKERFILE):
        for kind, args in dockerfile(path):
            if kind in ("ENTRYPOINT", "CMD"):
                assert "pip" not in args, f"{path.name}: {kind} installs at start"
    for name, service in load_compose()["services"].items():
        for key in ("command", "entrypoint"):
            value = service.get(key) or []
            text = value if isinstance(value, str) else " ".join(value)
            assert "pip install" not in text, f"{name}.{key} installs at start"


def test_dockerignore():
    patterns = {
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".git", ".sweeper", ".pytest_cache", "docs", "mlruns", ".env"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    for kept in ("sweeper", "experiments", "pyproject.toml", "README.md"):
        assert kept not in patterns and f"/{kept}" not in patterns, f".dockerignore drops {kept}"


def test_init_databases_script():
    mode = INIT_DATABASES.stat().st_mode
    assert mode & stat.S_IXUSR, "init-databases.sh must be executable (else the entrypoint sources it)"
    text = INIT_DATABASES.read_text()
    assert text.startswith("#!/bin/bash")
    assert "SWEEPER_OPTUNA_DB" in text and "SWEEPER_MLFLOW_DB" in text
    assert "CREATE DATABASE" in text
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(INIT_DATABASES)], check=True)


def test_kubernetes_job():
    docs = [d for d in yaml.safe_load_all(K8S_JOB.read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]
    assert spec["parallelism"] >= 1
    assert spec.get("completions") in (None, spec["parallelism"])
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][0] == "worker"
    from_secret = set()
    for source in worker.get("envFrom", []):
        if "secretRef" in source:
            from_secret |= {"SWEEPER_STORAGE", "MLFLOW_TRACKING_URI"}  # the whole Secret
    for var in worker.get("env", []):
        if "secretKeyRef" in (var.get("valueFrom") or {}):
            from_secret.add(var["name"])
        assert var["name"] not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI") or "value" not in var
    assert {"SWEEPER_STORAGE", "MLFLOW_TRACKING_URI"} <= from_secret
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not any(d["kind"] == "Secret" for d in docs), "credentials belong in a Secret made apart"


def test_kubernetes_pgbouncer():
    """The pooler of the Kubernetes workers: one replica (each pools on its own), the image's
    numeric non-root user, credentials from a Secret, a Service the workers' URL names."""
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(K8S_PGBOUNCER.read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"ARG PGBOUNCER_UID={pod['securityContext']['runAsUser']}" in PGBOUNCER_DOCKERFILE.read_text()
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "sweeper-pgbouncer"}}]
    assert not any("PASSWORD" in v["name"] for v in container.get("env", []))
    assert service["spec"]["ports"][0]["port"] == 6432
    assert not any(d["kind"] == "Secret" for d in docs)
    assert f"@{service['metadata']['name']}:6432/" in K8S_JOB.read_text()


def test_kubernetes_job_matches_the_api_schema():
    """Every document of the Job file against the Kubernetes API schema, offline: the
    kubernetes-validate package bundles the schemas of every Kubernetes release."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    docs = [d for d in yaml.safe_load_all(K8S_JOB.read_text()) if d]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{K8S_JOB.name}: {doc['kind']} {where}: {e.message} (Kubernetes {version})")
    # The validator does catch what a hand-written file gets wrong (a misspelt key, a string count).
    job = next(d for d in docs if d["kind"] == "Job")
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["parallelism"] = "4"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_cli_provides_what_the_containers_run():
    """The compose file, the Dockerfile and the Job call these commands and options: keep in sync."""
    click = pytest.importorskip("click")
    from sweeper.cli import cli

    def command(*path: str):
        cmd = cli
        for name in path:
            assert isinstance(cmd, click.Group) and name in cmd.commands, f"`sweeper {' '.join(path)}` is missing"
            cmd = cmd.commands[name]
        return cmd

    def options(cmd) -> set[str]:
        return {o for p in cmd.params for o in getattr(p, "opts", [])}

    assert "--forever" in options(command("worker"))
    assert "--quiet" in options(command("doctor"))
    assert "--study" in options(command("launch"))
    assert "--study" in options(command("report"))
    assert "--study" in options(command("status"))
    fetch = command("data", "fetch")
    from sweeper.data import DATASETS

    assert {"cifar10", "cifar100"} <= set(DATASETS)
    assert fetch is not None
    envvars = {p.envvar for name in ("worker", "launch", "report", "doctor") for p in command(name).params}
    assert {
        "SWEEPER_STORAGE",
        "MLFLOW_TRACKING_URI",
        "SWEEPER_DATA_DIR",
        "SWEEPER_WORKERS_PER_GPU",
        "SWEEPER_DEVICE",
    } <= envvars


# --- docker-compose config ----------------------------------------------------------------


def compose_binaries() -> list[list[str]]:
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        found.append([docker, "compose"])
    return found


@pytest.fixture(params=["docker-compose", "docker compose"])
def compose_cmd(request) -> list[str]:
    for cmd in compose_binaries():
        if " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)) == request.param:
            return cmd
    if request.param == "docker compose":
        pytest.skip("Compose v2 (`docker compose`) is not installed; optional, docker-compose 1.29 is the one required")
    if REQUIRE_COMPOSE:
        pytest.fail("docker-compose is required (SWEEPER_REQUIRE_COMPOSE=1) but not on PATH")
    pytest.skip(
        "docker-compose is not installed (Debian: apt-get install docker-compose); "
        "set SWEEPER_REQUIRE_COMPOSE=1 to fail instead"
    )


def run_config(cmd: list[str], files: list[Path], env_file: Path, *extra: str) -> subprocess.CompletedProcess:
    # Only the temporary env file may supply values: drop the caller's copies of the variables.
    names = variables_used(COMPOSE) | variables_used(COMPOSE_CPU) | {"COMPOSE_FILE", "COMPOSE_PROFILES"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    args = [*cmd, "--env-file", str(env_file), "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run([*args, "config", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def env_file_from_example(tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line.partition("=")[0].strip() not in drop]
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compose_config_validates(compose_cmd, tmp_path):
    result = run_config(compose_cmd, [COMPOSE], env_file_from_example(tmp_path))
    assert result.returncode == 0, f"{shlex.join(compose_cmd)} config failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    worker = config["services"]["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert not config["services"]["postgres"].get("ports")


def test_compose_config_with_cpu_override_validates(compose_cmd, tmp_path):
    result = run_config(compose_cmd, [COMPOSE, COMPOSE_CPU], env_file_from_example(tmp_path))
    assert result.returncode == 0, f"{shlex.join(compose_cmd)} config (cpu) failed:\n{result.stderr}"
    services = yaml.safe_load(result.stdout)["services"]
    assert "gpu" in services["worker"]["profiles"]
    assert "deploy" not in services["worker-cpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]


def test_compose_config_needs_no_auth_secrets(compose_cmd, tmp_path):
    env_file = env_file_from_example(tmp_path, drop=("MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"))
    result = run_config(compose_cmd, [COMPOSE], env_file)
    assert result.returncode == 0, f"a plain `up` must not need the auth profile's secrets:\n{result.stderr}"


def test_compose_config_requires_postgres_password(compose_cmd, tmp_path):
    result = run_config(compose_cmd, [COMPOSE], env_file_from_example(tmp_path, drop=("POSTGRES_PASSWORD",)))
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr
