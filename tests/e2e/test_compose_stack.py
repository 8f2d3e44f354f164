"""docker-compose.yml for real: the images of docker/build-local.sh, run by docker-compose
against podman's Docker-compatible socket, scaled, killed, scaled down, taken down and up.

One stack for the whole module (project `sweeper-e2e`, the CPU path of docker-compose.cpu.yml),
with the steps in order; every command is one of docs/DEPLOY.md's. Needs podman (its socket at
$DOCKER_HOST or unix:///run/podman/podman.sock), docker-compose and the images of
`bash docker/build-local.sh`; without them the module is skipped with the reason, unless
SWEEPER_REQUIRE_CONTAINERS=1 (CI), where it fails instead. Every container, volume and network
of the project is removed at the end, whatever happened.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "sweeper-e2e"
PODMAN_SOCKET = "unix:///run/podman/podman.sock"
IMAGES = (
    "sweeper:latest",
    "sweeper-postgres:latest",
    "sweeper-pgbouncer:latest",
    "sweeper-mlflow:latest",
    "sweeper-dashboard:latest",
)
REQUIRE = os.environ.get("SWEEPER_REQUIRE_CONTAINERS") == "1"
# The stack takes minutes even warm: it runs only when asked for (SWEEPER_RUN_CONTAINERS=1, or
# REQUIRE), not whenever podman and the images happen to be on the machine.
RUN = REQUIRE or os.environ.get("SWEEPER_RUN_CONTAINERS") == "1"
CHROMIUM = "/usr/bin/chromium"
LABEL = f"label=com.docker.compose.project={PROJECT}"
READY = re.compile(r"worker \d+ on \S+: storage ")  # sweeper/worker/boot.py, right before the first claim
STOP_GRACE = 60  # SWEEPER_STOP_GRACE_PERIOD in the test's .env, seconds
EPOCH_METRICS = ("train_loss", "test_loss", "top1_error", "top5_error", "lr", "epoch_seconds", "images_per_s")

# A step waits on container starts, which a loaded 2-core machine can stretch a lot.
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1500)]


def spec_text(
    description: str,
    variants,
    datasets,
    epochs: int,
    limit_train: int,
    limit_test: int = 64,
    batch_size: int = 64,
    seeds=(1,),
) -> str:
    return textwrap.dedent(f"""\
        description = "{description}"
        [grid]
        variant = {json.dumps(list(variants))}
        dataset = {json.dumps(list(datasets))}
        seed = {json.dumps(list(seeds))}
        [train]
        epochs = {epochs}
        limit_train = {limit_train}
        limit_test = {limit_test}
        batch_size = {batch_size}
        checkpoint_every = "epoch"  # the kill -9 step resumes from a checkpoint of epoch 2 or later
        """)


# Step 2: six cells, two epochs each, on digits: the CIFAR-shaped `synthetic` set costs minutes
# per cell on a shared 2-core machine (its first trial on a worker also times a few training steps
# per precision mode, sweeper/precision.py), and the containers' plumbing is the same.
VARIANTS, SEEDS = ("short4", "short3", "short2"), (1, 2)
GRID = ("e2e-grid", spec_text("e2e: 3 variants x 2 seeds", VARIANTS, ["digits"], 2, 64, 32, 16, SEEDS))
# Step 3: one cell long enough to be killed in the middle; then three cells for the scale-down.
RESUME_EPOCHS = 10  # the kill comes after epoch 2: the rest must outlast it on a quiet machine
RESUME = ("e2e-resume", spec_text("e2e: kill -9 in the middle", ["short4"], ["digits"], RESUME_EPOCHS, 512))
# Three cells of one variant, so that each costs the same (with three variants, short2's first
# epoch, with its precision probe, once came after short3 and short4 had trained all 30 on a
# loaded 2-core machine); the test waits for the three workers to be up before it launches, so
# all three start within a poll interval and are scaled down after their first epoch. The
# survivor then finishes all three.
HANDBACK_EPOCHS = 12
HANDBACK = (
    "e2e-handback",
    spec_text("e2e: scale down hands back", ["short4"], ["digits"], HANDBACK_EPOCHS, 512, seeds=(1, 2, 3)),
)


# --- the stack ---------------------------------------------------------------------------------


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 120, check: bool = True, input: str | None = None):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run(["podman", *args], timeout=timeout, check=check)


def missing() -> str | None:
    for tool, package in (("podman", "podman"), ("docker-compose", "docker-compose")):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install {package})"
    host = os.environ.get("DOCKER_HOST", PODMAN_SOCKET)
    if not host.startswith("unix://") or not Path(host[len("unix://") :]).is_socket():
        return f"no container engine socket at {host} (podman system service --time=0 {PODMAN_SOCKET} &)"
    absent = [image for image in IMAGES if podman("image", "exists", image, check=False).returncode != 0]
    if absent:
        return f"images {', '.join(absent)} are missing (bash docker/build-local.sh)"
    return None


@dataclass
class Stack:
    dir: Path
    env_file: Path
    specs: Path
    values: dict[str, str]
    env: dict[str, str]
    log: list[str] = field(default_factory=list)

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.values['MLFLOW_PORT']}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """docker-compose with the CPU override, as docs/DEPLOY.md runs it."""
        cmd = [
            "docker-compose",
            "-p",
            PROJECT,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(self.env_file),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "-f",
            str(ROOT / "docker-compose.cpu.yml"),
            "--profile",
            "cpu",
            *args,
        ]
        started = time.monotonic()
        proc = run(cmd, env=self.env, timeout=timeout, check=check)
        self.log.append(f"{time.monotonic() - started:6.1f}s docker-compose {' '.join(args)}")
        return proc

    def sweeper(self, service: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`docker-compose run --rm SERVICE ARGS...` with the test's specs at /specs."""
        return self.compose("run", "--rm", "-T", "-v", f"{self.specs}:/specs:ro", service, *args, timeout=timeout)

    def containers(self, service: str, all: bool = False) -> list[str]:
        out = podman(
            "ps",
            *(["--all"] if all else []),
            "--filter",
            LABEL,
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.ID}}",
        ).stdout
        return out.split()

    def inspect(self, container: str, template: str) -> str:
        return podman("inspect", "--format", template, container).stdout.strip()

    def wait_healthy(self, service: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ids = self.containers(service)
            states = [self.inspect(c, "{{.State.Health.Status}}") for c in ids]
            if ids and all(s == "healthy" for s in states):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(podman("logs", "--tail", "30", c, check=False).stderr for c in ids)
                pytest.fail(f"{service} not healthy after {timeout:.0f}s: {states}\n{logs}")
            time.sleep(2)

    def api(self, path: str, body: dict | None = None, base: str | None = None, auth: tuple[str, str] | None = None):
        """MLflow's REST API from the host (127.0.0.1 only)."""
        request = urllib.request.Request(
            (base or self.mlflow) + "/api/2.0/mlflow/" + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"{}")

    def cell_runs(self, study: str) -> list[dict]:
        """The study's cell runs; [] while its experiment does not exist yet or MLflow is too
        busy to answer (a slow answer on a loaded host is retried by the polling loops)."""
        try:
            experiment = self.api(f"experiments/get-by-name?experiment_name={study}")["experiment"]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
        except (TimeoutError, urllib.error.URLError):
            return []
        body = {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": "tags.`sweeper.role` = 'cell'",
            "max_results": 100,
        }
        try:
            return self.api("runs/search", body).get("runs", [])
        except (TimeoutError, urllib.error.URLError):
            return []

    def steps(self, run_id: str, metric: str) -> list[int]:
        history = self.api(f"metrics/get-history?run_id={run_id}&metric_key={metric}&max_results=1000")
        return sorted(int(m["step"]) for m in history.get("metrics", []))

    def wait_finished(self, study: str, cells: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            runs = self.cell_runs(study)
            if len(runs) >= cells and all(r["info"]["status"] == "FINISHED" for r in runs):
                return runs
            failed = [r for r in runs if r["info"]["status"] == "FAILED"]
            assert not failed, f"{study}: failed runs {[tags(r) for r in failed]}\n{self.worker_logs()}"
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{study}: {[r['info']['status'] for r in runs]} after {timeout:.0f}s\n{self.worker_logs()}"
                )
            time.sleep(2)

    def wait_workers_ready(self, count: int, timeout: float = 600) -> None:
        """Until ``count`` workers run and each has opened its stores (the line it logs right before
        it starts claiming): a study launched earlier could be done by the first ones before a
        late one, just re-created, gets any trial of it."""
        deadline = time.monotonic() + timeout
        while True:
            containers = self.containers("worker-cpu")
            ready = [c for c in containers if READY.search(self.logs_of_last_start(c))]
            if len(containers) == count and len(ready) == count:
                return
            assert time.monotonic() < deadline, (
                f"{len(ready)} of {count} workers ready after {timeout:.0f}s\n{self.worker_logs()}"
            )
            time.sleep(2)

    def logs_of_last_start(self, container: str) -> str:
        """What the container's current process logged (a restarted container keeps the old one's)."""
        started = int(self.inspect(container, "{{.State.StartedAt.Unix}}"))
        return podman("logs", "--since", str(started - 1), container, check=False).stderr

    def worker_logs(self, tail: int = 25) -> str:
        return "\n".join(
            f"--- {c}:\n" + podman("logs", "--tail", str(tail), c, check=False).stderr
            for c in self.containers("worker-cpu", all=True)
        )


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def leftovers() -> dict[str, list[str]]:
    found = {}
    for kind, args in (
        ("containers", ["ps", "--all", "--filter", LABEL, "--format", "{{.Names}}"]),
        ("volumes", ["volume", "ls", "--filter", LABEL, "--format", "{{.Name}}"]),
        ("networks", ["network", "ls", "--filter", LABEL, "--format", "{{.Name}}"]),
    ):
        names = podman(*args, check=False).stdout.split()
        if names:
            found[kind] = names
    return found


def remove_everything(stack: Stack) -> None:
    stack.compose(
        "--profile",
        "auth",
        "--profile",
        "tools",
        "down",
        "--volumes",
        "--remove-orphans",
        "--timeout",
        "10",
        check=False,
    )
    # What `down` missed (a container of an interrupted `run`, say), by the project's label.
    for kind, names in leftovers().items():
        if kind == "containers":
            podman("rm", "--force", "--volumes", *names, check=False)
        else:
            podman(kind[:-1], "rm", "--force", *names, check=False)


@pytest.fixture(scope="module")
def images():
    if not RUN:
        pytest.skip("container test skipped: set SWEEPER_RUN_CONTAINERS=1 (after `bash docker/build-local.sh`)")
    reason = missing()
    if reason:
        if REQUIRE:
            pytest.fail(f"SWEEPER_REQUIRE_CONTAINERS=1 but {reason}", pytrace=False)
        pytest.skip(f"container test skipped: {reason}")


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory):
    from compose_rules import env_example, variables_used

    root = tmp_path_factory.mktemp("e2e")
    specs = root / "specs"
    specs.mkdir()
    specs.chmod(0o755)  # read by the containers' user
    for name, text in (GRID, RESUME, HANDBACK):
        (specs / f"{name}.toml").write_text(text)
        (specs / f"{name}.toml").chmod(0o644)
    values = {
        **env_example(),
        "POSTGRES_PASSWORD": f"e2e-{uuid.uuid4().hex}",
        "MLFLOW_ADMIN_PASSWORD": f"e2e-admin-{uuid.uuid4().hex}",
        "MLFLOW_FLASK_SECRET_KEY": uuid.uuid4().hex,
        "MLFLOW_PORT": str(free_port()),
        "MLFLOW_AUTH_PORT": str(free_port()),
        "DASHBOARD_PORT": str(free_port()),
        "MLFLOW_SERVER_WORKERS": "1",  # a small shared CPU box
        "SWEEPER_DATASETS": "digits",  # built in: no internet needed
        "SWEEPER_DEVICE": "cpu",
        "SWEEPER_HEARTBEAT_INTERVAL": "2",
        "SWEEPER_GRACE_PERIOD": "10",
        "SWEEPER_STOP_GRACE_PERIOD": f"{STOP_GRACE}s",
    }
    env_file = root / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    # Only the .env file supplies compose's variables; the engine is podman's socket.
    names = variables_used(ROOT / "docker-compose.yml") | {"COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.setdefault("DOCKER_HOST", PODMAN_SOCKET)
    stack = Stack(root, env_file, specs, values, env)

    remove_everything(stack)  # what an interrupted earlier run left
    # Podman runs healthchecks from systemd timers; this machine may have no systemd.
    ticker = subprocess.Popen(
        ["bash", str(ROOT / "docker" / "podman-healthchecks.sh")],
        env={**os.environ, "SWEEPER_HEALTHCHECK_FILTER": LABEL},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        yield stack
    finally:
        try:
            remove_everything(stack)
        finally:
            os.killpg(ticker.pid, signal.SIGKILL)
            ticker.wait()
            print(f"[e2e] {time.monotonic() - started:.0f}s in all\n" + "\n".join(stack.log))


# --- the steps, in order -----------------------------------------------------------------------


def test_postgres_image_refuses_the_placeholder_password(images):
    proc = podman(
        "run", "--rm", "-e", "POSTGRES_PASSWORD=CHANGE-ME", "sweeper-postgres:latest", check=False, timeout=60
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "set POSTGRES_PASSWORD in .env" in proc.stderr
    assert "init process complete" not in proc.stdout + proc.stderr


def test_1_up_scaled(stack):
    stack.compose("up", "-d", "--scale", "worker-cpu=3", timeout=900)
    for service in ("postgres", "pgbouncer", "mlflow", "dashboard"):
        stack.wait_healthy(service)
    (data,) = stack.containers("data", all=True)
    assert stack.inspect(data, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    assert "digits: built in, nothing to fetch" in podman("logs", data).stderr
    workers = stack.containers("worker-cpu")
    assert len(workers) == 3, workers
    # The dashboard and MLflow answer on 127.0.0.1.
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.values['DASHBOARD_PORT']}/api/meta", timeout=120) as r:
        assert r.status == 200
    assert stack.api("experiments/search", {"max_results": 10})["experiments"]


def test_2_launch_a_study_all_cells_complete(stack):
    study, _ = GRID
    launched = json.loads(
        stack.sweeper("launcher", "launch", "--study", f"/specs/{study}.toml", "--format", "json").stdout
    )
    assert launched["enqueued"] == 6 and launched["already_enqueued"] == 0, launched
    runs = stack.wait_finished(study, 6, timeout=900)
    keys = sorted(tags(r)["sweeper.key"] for r in runs)
    assert keys == sorted(f"{v}/digits/s{seed}" for v in VARIANTS for seed in SEEDS)
    for r in runs:
        for metric in EPOCH_METRICS:
            assert stack.steps(r["info"]["run_id"], metric) == [1, 2], (tags(r)["sweeper.key"], metric)
    status = json.loads(stack.sweeper("launcher", "status", "--study", study, "--format", "json").stdout)
    assert status["counts"]["COMPLETE"] == 6, status["counts"]
    hosts = {tags(r)["sweeper.host"] for r in runs}
    assert hosts <= {c[:12] for c in stack.containers("worker-cpu")}, hosts  # a container's hostname is its id
    if len(os.sched_getaffinity(0)) < 3:  # three trials at once share the cores (the worker-cores volume)
        assert "training on 1 CPU thread(s)" in stack.worker_logs(tail=100_000)


def test_3a_kill_9_a_worker_the_trial_resumes_elsewhere(stack):
    study, _ = RESUME
    stack.sweeper("launcher", "launch", "--study", f"/specs/{study}.toml")
    deadline = time.monotonic() + 600
    while True:  # until the cell's run has logged two epochs
        runs = stack.cell_runs(study)
        if runs and len(stack.steps(runs[0]["info"]["run_id"], "train_loss")) >= 2:
            break
        assert time.monotonic() < deadline, f"no two epochs after 600s\n{stack.worker_logs()}"
        time.sleep(1)
    (run,) = runs
    victim = tags(run)["sweeper.host"]
    (container,) = [c for c in stack.containers("worker-cpu") if c.startswith(victim)]
    podman("kill", "--signal", "KILL", container)
    killed_at = time.monotonic()

    (run,) = stack.wait_finished(study, 1, timeout=900)
    resumed = tags(run)
    assert run["info"]["run_id"] == runs[0]["info"]["run_id"], "the same MLflow run goes on"
    assert int(resumed["sweeper.resumed_from_epoch"]) >= 2, resumed
    for metric in EPOCH_METRICS:
        assert stack.steps(run["info"]["run_id"], metric) == list(range(1, RESUME_EPOCHS + 1)), metric
    stack.log.append(
        f"kill -9 -> FINISHED in {time.monotonic() - killed_at:.0f}s (resumed on {resumed['sweeper.host']})"
    )


def test_3b_scale_down_hands_trials_back(stack):
    study, _ = HANDBACK
    stack.compose("up", "-d", "--scale", "worker-cpu=3")  # the killed one back, if it was not restarted
    stack.wait_workers_ready(3)
    stack.sweeper("launcher", "launch", "--study", f"/specs/{study}.toml")
    deadline = time.monotonic() + 600
    while True:  # every worker in the middle of a trial
        runs = stack.cell_runs(study)
        if len(runs) == 3 and all(stack.steps(r["info"]["run_id"], "train_loss") for r in runs):
            break
        assert time.monotonic() < deadline, f"three trials not started after 600s\n{stack.worker_logs()}"
        time.sleep(1)
    running = {tags(r)["sweeper.host"] for r in runs if r["info"]["status"] == "RUNNING"}
    assert len(running) == 3, f"not one trial on each of three workers at once: {[(tags(r), r['info']) for r in runs]}"
    before = set(stack.containers("worker-cpu"))
    since = str(int(time.time()) - 1)
    scaled_at_ms = int(time.time() * 1000)
    started = time.monotonic()
    stack.compose("up", "-d", "--scale", "worker-cpu=1", timeout=STOP_GRACE * 3)
    took = time.monotonic() - started
    removed = before - set(stack.containers("worker-cpu"))
    assert len(removed) == 2, (before, removed)
    # The trials the removed workers held then (one may have finished just before its worker went).
    held = {r["info"]["run_id"] for r in runs if tags(r)["sweeper.host"] in {c[:12] for c in removed}}
    assert held, f"no trial ran on the removed workers {removed}: {[tags(r) for r in runs]}"
    events = podman(
        "events", "--since", since, "--until", str(int(time.time()) + 1), "--filter", "event=died", "--format", "json"
    ).stdout
    died = {}
    for line in events.splitlines():
        event = json.loads(line)
        died[event["ID"]] = event.get("ContainerExitCode", 0)  # podman leaves out a 0
    # podman 4.3 loses its events file when it rotates it (1 MB by default, hours of containers):
    # with no death recorded at all, the clean exits show in the time taken and the handed-back runs.
    for container in removed if died else ():
        (full,) = [i for i in died if i.startswith(container)] or [None]
        assert full, f"no exit of {container} in podman events: {events}"
        assert died[full] == 0, (
            f"worker {container} exited {died[full]} on SIGTERM (137: killed after the grace period)"
        )
    assert took < STOP_GRACE, f"scaling down took {took:.0f}s, the stop grace period is {STOP_GRACE}s"

    runs = stack.wait_finished(study, 3, timeout=900)
    handed_back = [r for r in runs if r["info"]["run_id"] in held and int(r["info"]["end_time"]) > scaled_at_ms]
    assert handed_back, f"every trial of the removed workers had finished before they went: {held}"
    for r in handed_back:
        assert "sweeper.resumed_from_epoch" in tags(r), (tags(r), stack.worker_logs())
    for r in runs:
        for metric in EPOCH_METRICS:
            assert stack.steps(r["info"]["run_id"], metric) == list(range(1, HANDBACK_EPOCHS + 1)), (
                tags(r)["sweeper.key"],
                metric,
            )


def test_4_down_and_up_keeps_everything(stack):
    stack.compose("down", "--timeout", str(STOP_GRACE))
    assert not stack.containers("postgres", all=True)
    stack.compose("up", "-d", "--scale", "worker-cpu=1", timeout=900)
    for service in ("postgres", "pgbouncer", "mlflow", "dashboard"):
        stack.wait_healthy(service)
    study, _ = GRID
    again = json.loads(
        stack.sweeper("launcher", "launch", "--study", f"/specs/{study}.toml", "--format", "json").stdout
    )
    assert again["enqueued"] == 0 and again["already_enqueued"] == 6, again
    rows = json.loads(stack.sweeper("report", "--study", study, "--format", "json").stdout)
    assert len(rows) == 6 and all(r["state"] == "COMPLETE" for r in rows), rows
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted((v, s) for v in VARIANTS for s in SEEDS)
    assert len(stack.cell_runs(study)) == 6, "the MLflow runs survived too"


def test_5_auth_profile_non_root_loopback_only(stack):
    stack.compose("--profile", "auth", "up", "-d", "mlflow-auth", timeout=900)
    stack.wait_healthy("mlflow-auth")
    auth_base = f"http://127.0.0.1:{stack.values['MLFLOW_AUTH_PORT']}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        stack.api("experiments/search", {"max_results": 1}, base=auth_base)
    assert refused.value.code == 401
    admin = (stack.values["MLFLOW_ADMIN_USERNAME"], stack.values["MLFLOW_ADMIN_PASSWORD"])
    names = {
        e["name"]
        for e in stack.api("experiments/search", {"max_results": 100}, base=auth_base, auth=admin)["experiments"]
    }
    assert {GRID[0], RESUME[0], HANDBACK[0]} <= names, "the same runs, behind a password"

    secrets = [stack.values["POSTGRES_PASSWORD"], stack.values["MLFLOW_ADMIN_PASSWORD"]]
    published = {}
    for container in podman("ps", "--filter", LABEL, "--format", "{{.ID}}").stdout.split():
        service = stack.inspect(container, '{{index .Config.Labels "com.docker.compose.service"}}')
        users = podman("top", container, "user").stdout.split()[1:]
        assert users and "root" not in users, f"{service} runs processes as {set(users)}"
        args = podman("top", container, "args").stdout
        assert not any(s in args for s in secrets), f"a password is on a command line in {service}:\n{args}"
        ports = json.loads(stack.inspect(container, "{{json .NetworkSettings.Ports}}") or "null") or {}
        for bindings in ports.values():
            for binding in bindings or []:
                published.setdefault(service, []).append((binding["HostIp"], binding["HostPort"]))
    assert set(published) == {"mlflow", "mlflow-auth", "dashboard"}, published
    assert all(ip == "127.0.0.1" for ports in published.values() for ip, _ in ports), published


def test_6_uis_open_in_a_browser(stack, tmp_path):
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is absent (apt-get install chromium)"
        if REQUIRE or os.environ.get("SWEEPER_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from browser_steps import CHROMIUM_ARGS, close_assistant
    from playwright.sync_api import sync_playwright

    study, _ = GRID
    experiment_id = stack.api(f"experiments/get-by-name?experiment_name={study}")["experiment"]["experiment_id"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            # The experiment's runs table, as `sweeper ui` links it (MLflow 3 opens other views otherwise).
            page.goto(f"{stack.mlflow}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
            page.get_by_text("matching runs").first.wait_for()
            close_assistant(page)
            page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
            for cell in ("short4/digits/s1", "short2/digits/s2"):
                page.get_by_text(cell, exact=True).first.wait_for()
            page.screenshot(path=tmp_path / "mlflow.png")

            dashboard = f"http://127.0.0.1:{stack.values['DASHBOARD_PORT']}"
            page.goto(f"{dashboard}/dashboard")
            for name in (GRID[0], RESUME[0], HANDBACK[0]):
                page.get_by_text(name).first.wait_for()
            with urllib.request.urlopen(f"{dashboard}/api/studies", timeout=60) as response:
                studies = json.loads(response.read())["study_summaries"]
            (study_id,) = [s["study_id"] for s in studies if s["study_name"] == study]
            page.goto(f"{dashboard}/dashboard/studies/{study_id}/trials")
            page.get_by_text("6 Trials").first.wait_for()  # one per cell
            page.screenshot(path=tmp_path / "dashboard.png")
        finally:
            browser.close()


def test_7_down_volumes_leaves_nothing(stack):
    stack.compose("--profile", "auth", "down", "--volumes", "--timeout", str(STOP_GRACE))
    assert leftovers() == {}
