"""A fleet: N light workers on one PostgreSQL (through a real PgBouncer) and one ``mlflow server``.

    python benchmarks/fleet.py --workers 200 --trials 1000 --trial-seconds 30 --json

The stack of docker-compose.yml on this machine: fresh PostgreSQL databases for Optuna and for
MLflow's store, a real ``pgbouncer`` in transaction mode in front of the Optuna database with
compose's settings (tests/helpers.py's PgBouncer), a real ``mlflow server`` straight on its
database with compose's pool (server_cost's, with its access log and CPU meter; one uvicorn
worker by default: this machine's 2 cores are the workers' too; ``--mlflow-server gunicorn``: its
Flask app under gunicorn's threads, without the FastAPI app around it), artifacts written by the
workers straight to the artifact store unless ``--artifacts proxied``. One study of ``--trials`` cells.
The workers are the real ``sweeper.worker.run`` (claim, heartbeat, per-epoch report and
logging, model export, settle) with ``WorkerConfig.fit`` a sleep of ``--trial-seconds`` and a
one-layer model (harness.light_config); ``--workers-per-process`` of them run as threads of a
process forked from one warmed-up pool process (pool.run_workers), sharing that process's
``--exporters-per-process`` model-export helpers (``WorkerConfig.exporter``, forked from the pool:
~250 MB each; a worker's own, spawned, is a fresh ~500 MB interpreter). ``--start-spread``: the
workers start over that many seconds (200 at once can hold PgBouncer's whole pool while opening).

From the go signal until every worker has exited: PostgreSQL transactions (pg_stat_database),
HTTP requests (the access log), the mlflow server's CPU above idle (server_cost.Snapshot), the
Optuna database's server connections (pg_stat_activity every 0.5 s: what PgBouncer opened),
each claim's time (``WorkerConfig.on_phase``). Then: lost = cells without a COMPLETE trial;
duplicated = cells with more than one, plus MLflow runs with an epoch's metric logged twice and
active cell runs that no trial holds (a run made twice);
efficiency = ideal / measured, ideal = ceil(trials / workers) x trial-seconds (every worker
training all the time), measured = from the go signal to the last trial's COMPLETE (Optuna's
datetime_complete); efficiency_cpu_bound = the most the machine's cores allow for the CPU the
run measured (ideal / (CPU seconds / cores)); server_cost's projection fed with these per-trial costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import harness  # first: puts this checkout on the path
import pool
import psutil
import server_cost as cost
from harness import PG_ADMIN_URL, REPO, Databases, dispose, emit, grid_spec, light_config, log

sys.path.insert(0, str(REPO / "tests"))
from helpers import PgBouncer, pgbouncer_binary  # the tests' real PgBouncer, not a copy

SCRIPT = Path(__file__).resolve()
BOUNCER = {"pool_size": 30, "max_db_connections": 30, "max_client_conn": 1000}  # compose's defaults
CLIENTS_PER_WORKER = 2  # a worker's connections to PgBouncer: its storage pool's and its heartbeat's


class Recorder(harness.PhaseTimes):
    """WorkerConfig.on_phase of a process's workers: PhaseTimes, each claim's seconds (claimed: a trial
    followed on that thread; else an empty look), and the trials run so far in ``progress``."""

    def __init__(self, progress: Path):
        super().__init__()
        self.progress, self.pending, self.claimed, self.empty = progress, {}, [], []

    def __call__(self, phase: str, seconds: float) -> None:
        super().__call__(phase, seconds)
        thread = threading.get_ident()
        with self.lock:
            if phase == "claim":
                if thread in self.pending:
                    self.empty.append(self.pending.pop(thread))
                self.pending[thread] = seconds
            elif phase == "prepare" and thread in self.pending:
                self.claimed.append(self.pending.pop(thread))
            elif phase == "trial":
                self.progress.write_text(str(self.calls["trial"]))


def cpu_s(pids: list[int]) -> float:
    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def process_child(run: dict[str, Any], index: int, go_file: Path, rundir: Path) -> int:
    """(A forked worker process.) Start its export helpers, then its workers' threads at the go."""
    import gc

    from sweeper import worker
    from sweeper.cellmodel import Exporter
    from sweeper.contract import DEFAULT_GRACE_PERIOD as GRACE

    cost.SQL_COUNTS.clear()
    gc.collect()  # the shared pages this process touches are copied now, before the clock
    count = min(run["per_process"], run["workers_total"] - index * run["per_process"])
    # forked now, before any thread: they share the pool's imports (a spawned one is a ~500 MB interpreter)
    exporters = [Exporter(run["tracking_uri"], harness.tiny_model, GRACE / 4, "fork") for _ in range(run["exporters"])]
    for e in exporters:
        e.start()
    helpers = [e.process.pid for e in exporters]
    recorder = Recorder(rundir / f"progress-{index}")
    more = {"on_phase": recorder, "threads": 1}  # threads: no host core share to count, training sleeps
    configs = [
        light_config(run["storage_url"], run["tracking_uri"], run["study"], run["epoch_sleep"], **more, exporter=e)
        for e in (exporters[k % len(exporters)] for k in range(count))
    ]

    def run_later(delay: float, config) -> int:
        time.sleep(delay)
        return worker.run(config)

    (rundir / f"ready-{index}").write_text("")
    while not go_file.exists():
        time.sleep(0.01)
    cpu0, helpers_cpu0 = time.process_time(), cpu_s(helpers)
    with ThreadPoolExecutor(len(configs)) as threads:  # each worker on a thread of its own
        first, spread = index * run["per_process"], run["start_spread"] / run["workers_total"]
        futures = [threads.submit(run_later, (first + k) * spread, config) for k, config in enumerate(configs)]
    results = [f.result() if f.exception() is None else repr(f.exception()) for f in futures]
    done = dict(results=results, cpu_s=time.process_time() - cpu0, helpers_cpu_s=cpu_s(helpers) - helpers_cpu0)
    done["helpers_pss_mb"] = sum((pool.memory(p) or {}).get("pss_mb", 0.0) for p in helpers)
    done.update(claimed=recorder.claimed, empty=recorder.empty + list(recorder.pending.values()))
    done.update(phases={"calls": recorder.calls, "seconds": recorder.seconds}, sql=dict(cost.SQL_COUNTS))
    for e in exporters:  # not close(): a forked helper holds the pipe's other end too, it would see no EOF
        e.process.kill()
    (rundir / f"done-{index}.json").write_text(json.dumps(done))
    return 0


def pool_main(cfg_path: str) -> None:
    """(The pool process.) Warm up once, then fork the worker processes when the driver says go."""
    cfg = json.loads(Path(cfg_path).read_text())
    pool.warm_pool([cfg["warmup"]])
    import mlflow.pytorch  # noqa: F401  (what the export helpers forked from here use, shared by them)
    import torch

    torch.export.export(harness.tiny_model("standard", 10).eval(), (torch.zeros(1, 3, 32, 32),))  # its lazy imports
    cost.count_sql()
    control = Path(cfg["control"])
    (control / "want").write_text("")
    while not (control / "go").exists():
        time.sleep(0.05)
    result = pool.run_workers(cfg["run"], child=process_child)
    Path(cfg["run"]["result"]).write_text(json.dumps(result))
    (control / "ended").write_text("")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def check_outcome(storage, client, study_name: str, cells: int, go: float) -> dict[str, Any]:
    """Lost and duplicated cells, from the Optuna storage and MLflow's runs."""
    import optuna

    from sweeper.names import KEY_ATTR, RUN_ID_ATTR
    from sweeper.report.read import search_cell_runs

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    per_cell = Counter(t.user_attrs.get(KEY_ATTR) for t in complete)
    run_ids = sorted({t.user_attrs[RUN_ID_ATTR] for t in trials if RUN_ID_ATTR in t.user_attrs})

    def epochs_twice(run_id: str) -> bool:
        steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
        return len(steps) != len(set(steps))

    with ThreadPoolExecutor(8) as threads:
        twice = sum(threads.map(epochs_twice, run_ids))
    # A cell's run made twice (a create re-sent after its answer was lost) and left active: no trial holds it.
    cell_runs = search_cell_runs(client, client.get_experiment_by_name(study_name).experiment_id)
    last = max((t.datetime_complete.timestamp() for t in complete), default=go)
    out = dict(states=dict(states), lost=cells - len(per_cell), last_complete_s=last - go, runs_checked=len(run_ids))
    out.update(duplicated_cells=sum(1 for n in per_cell.values() if n > 1), runs_with_an_epoch_twice=twice)
    held = set(run_ids)
    out.update(runs_without_trial=sum(1 for r in cell_runs if r.info.run_id not in held))
    return out


def collect(rundir: Path, processes: int) -> dict[str, Any]:
    """What the worker processes saw, added up."""
    done = [json.loads((rundir / f"done-{i}.json").read_text()) for i in range(processes)]
    phases = harness.PhaseTimes()
    sql: Counter = Counter()
    for d in done:
        sql.update(d["sql"])
        for phase, calls in d["phases"]["calls"].items():
            phases.calls[phase] = phases.calls.get(phase, 0) + calls
            phases.seconds[phase] = phases.seconds.get(phase, 0.0) + d["phases"]["seconds"][phase]
    results = [r for d in done for r in d["results"]]
    logs = [line for f in rundir.glob("worker-*.log") for line in f.read_text(errors="replace").splitlines()]
    return {
        "trials_run": sum(r for r in results if isinstance(r, int)),
        "worker_errors": [r for r in results if not isinstance(r, int)],
        "error_lines": sum(1 for line in logs if "Traceback" in line or " ERROR " in line),
        "phases": phases,
        "sql": dict(sql),
        **{key: [v for d in done for v in d[key]] for key in ("claimed", "empty")},
        **{key: sum(d[key] for d in done) for key in ("cpu_s", "helpers_cpu_s", "helpers_pss_mb")},
    }


def projection(per_trial: dict[str, float], extras: dict[str, Any], trial_seconds: float) -> list[dict[str, Any]]:
    """server_cost's model fed with this run's per-trial costs (all per trial, none per epoch; the
    measured trials' heartbeats taken out: the model adds those of T), a real checkpoint's and
    model's bytes, one core for each server; and what 1,000 and 10,000 workers need."""
    hb, beats = extras["heartbeat"], trial_seconds / cost.HEARTBEAT_INTERVAL
    base = {**per_trial}
    for key, per_beat in zip(
        ("optuna_statements", "optuna_xacts", "postgres_cpu_s"), ("statements", "xacts", "postgres_cpu_s")
    ):
        base[key] = max(0.0, base[key] - beats * hb[f"{per_beat}_per_beat"])
    costs = {"default": {k: {"per_trial": v, "per_epoch": 0.0} for k, v in base.items()}}
    inputs = {**extras, "checkpoint_mb": 75.0, "model_mb": 25.0, "epoch_s": 30.0, "rho_max": 0.7}
    inputs["mlflow_server_workers"] = 1  # a core per uvicorn worker (one single-threaded process)
    # the workers' connections end at PgBouncer (~2 each, max_client_conn): it bounds them, not PostgreSQL
    inputs["connections"] = {"max_connections": BOUNCER["max_client_conn"], "reserved": 0, "mlflow_server": 0}
    inputs["connections"]["per_worker"] = CLIENTS_PER_WORKER
    rows = []
    for seconds in (60.0, 600.0):
        p = cost.project(costs, inputs, seconds, cores=1)
        t, cycle = p["trial"], p["cycle_s"]
        row = {key: p[key] for key in ("workers_by_postgres_cpu", "workers_by_mlflow_cpu", "workers_by_connections")}
        row.update(trial=t, first_bottleneck=p["bound_by"], efficiency_alone=p["efficiency_alone"])
        for fleet in (1000, 10000):
            row[f"{fleet}_workers_need"] = {
                "mlflow_server_cores": math.ceil(fleet / p["workers_by_mlflow_cpu"]),
                "postgres_cores": math.ceil(fleet / p["workers_by_postgres_cpu"]),
                "pgbouncer_clients": fleet * CLIENTS_PER_WORKER,
                "requests_per_s": fleet * t["http_requests"] / cycle,
                "optuna_xacts_per_s": fleet * t["optuna_xacts"] / cycle,
            }
        rows.append(row)
    return rows


class Stack:
    """The servers of one run: PgBouncer, the mlflow server and its CPU meter, the worker pool."""

    def __init__(self) -> None:
        self.things: list = []

    def start(self, tmp: Path, dbs: Databases, mlflow_workers: int, direct_artifacts: bool, sgi: str) -> None:
        self.optuna_url, mlflow_url = dbs.new("postgresql", "fleet_optuna"), dbs.new("postgresql", "fleet_mlflow")
        self.databases = {"optuna": self.optuna_url.rsplit("/", 1)[1], "mlflow": mlflow_url.rsplit("/", 1)[1]}
        root = Path(tempfile.mkdtemp(prefix="fleet-pgbouncer-", dir=tmp))
        for path in (tmp, root):  # pgbouncer started as root drops to the postgres user, which reads it
            path.chmod(0o755)
        self.bouncer = self.keep(PgBouncer(root, **BOUNCER)).start()
        self.storage_url = self.bouncer.url(self.optuna_url)
        log(f"pgbouncer: {self.storage_url}; mlflow server with {mlflow_workers} {sgi} workers")
        backend = mlflow_url.replace("postgresql://", "postgresql+psycopg2://")
        self.server = self.keep(cost.MlflowServer(backend, tmp, mlflow_workers, direct_artifacts, sgi))
        self.server.wait_ready()
        self.meter = self.keep(cost.CpuMeter(self.server.proc.pid, self.databases))
        self.meter.start()
        idle = self.snapshot()
        time.sleep(5)
        self.idle_rate = (self.meter.totals()["mlflow_server"] - idle.cpu["mlflow_server"]) / (time.time() - idle.at)

    def keep(self, thing):
        self.things.append(thing)
        return thing

    def snapshot(self) -> cost.Snapshot:
        return cost.Snapshot(self.server, self.meter, self.databases)

    def stop(self) -> None:
        for thing in reversed(self.things):
            with contextlib.suppress(Exception):
                thing.kill() if isinstance(thing, subprocess.Popen) else thing.stop()


def enqueue_studies(stack: Stack, trials: int, epochs: int) -> dict[str, str]:
    """The warm-up's study (one cell) and the run's; each study's experiment and parent run made
    here, as its first trial would: once per study, not part of what a trial costs."""
    from sweeper import tracking
    from sweeper.storage import connect
    from sweeper.trials import enqueue

    client, storage = tracking.client(stack.server.uri), connect.open_storage(stack.optuna_url)
    tag, studies = uuid.uuid4().hex[:4], {}
    for kind, cells, e in (("warmup", 1, 1), ("run", trials, epochs)):
        name = studies[kind] = f"fleet-{kind}-{tag}"
        launched = enqueue.enqueue_study(storage, grid_spec(name, cells, epochs=e, limit_train=256, limit_test=64))
        experiment_id = tracking.ensure_experiment(client, name)
        tracking.ensure_study_run(client, experiment_id, connect.stored_spec(launched.study))
    dispose(storage)
    return studies


def run_fleet(args, tmp: Path, stack: Stack, studies: dict[str, str]) -> tuple[dict, dict, dict]:
    """Warm the pool up, go, wait for every worker to exit: (the servers' counters over the run,
    pool.run_workers' result, what the workers saw)."""
    processes = math.ceil(args.workers / args.workers_per_process)
    control, rundir = tmp / "control", tmp / "run"
    for folder in (control, rundir):
        folder.mkdir()
    # pool.run_workers forks run["workers"] processes; each runs per_process of the workers_total workers
    run = dict(rundir=str(rundir), workers=processes, workers_total=args.workers, per_process=args.workers_per_process)
    run.update(storage_url=stack.storage_url, tracking_uri=stack.server.uri, study=studies["run"])
    run.update(exporters=args.exporters_per_process, epoch_sleep=args.trial_seconds / args.epochs)
    run["start_spread"] = args.start_spread
    run.update(pg_dbs=list(stack.databases.values()), ready_timeout=900, run_timeout=args.timeout)
    run["result"] = str(tmp / "run-result.json")
    warmup = {"storage_url": stack.storage_url, "tracking_uri": stack.server.uri, "study": studies["warmup"]}
    (tmp / "pool.json").write_text(json.dumps({"warmup": warmup, "run": run, "control": str(control)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log(f"{args.workers} workers in {processes} processes: a warm-up trial, then each process's export helpers")
    command = [sys.executable, str(SCRIPT), "--_pool", str(tmp / "pool.json")]
    output = open(tmp / "pool.log", "wb")
    proc = stack.keep(subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT))
    cost.wait_for(control / "want", proc, "the warm-up", 900)
    time.sleep(cost.STATS_FLUSH_WAIT)  # the warm-up's counters settle
    before = stack.snapshot()
    (control / "go").write_text("")
    next_line = time.time() + 15
    while not (control / "ended").exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the worker pool exited ({proc.returncode}): see {tmp / 'pool.log'} (--keep)")
        time.sleep(0.5)
        if time.time() >= next_line:
            next_line += 15
            ran = sum(int(p.read_text() or 0) for p in rundir.glob("progress-*"))
            log(f"  {ran}/{args.trials} trials trained, load {os.getloadavg()[0]:.1f}")
    time.sleep(cost.STATS_FLUSH_WAIT)
    servers = stack.snapshot().minus(before, stack.idle_rate)
    return servers, json.loads(Path(run["result"]).read_text()), collect(rundir, processes)


def measure(args, tmp: Path, stack: Stack) -> dict[str, Any]:
    from sweeper import tracking
    from sweeper.storage import connect

    studies = enqueue_studies(stack, args.trials, args.epochs)
    servers, ran, saw = run_fleet(args, tmp, stack, studies)
    client, storage = tracking.client(stack.server.uri), connect.open_storage(stack.optuna_url)
    outcome = check_outcome(storage, client, studies["run"], args.trials, ran["go"])  # straight: not the fleet's
    dispose(storage)
    log("one heartbeat's cost; the mlflow server's CPU per uploaded MB")
    args_ = (stack.server, stack.meter, stack.databases, stack.idle_rate)
    extras = {
        "heartbeat": cost.heartbeat_cost(stack.optuna_url, *args_),
        # the server's CPU per MB it proxies, as server_cost; none when the workers write them
        "upload": cost.upload_cost(stack.server.uri, tmp, *args_, 64)
        if args.artifacts == "proxied"
        else {"server_cpu_s_per_mb": 0.0, "artifacts": "direct"},
    }
    n = max(outcome["states"].get("COMPLETE", 0), 1)
    ideal = math.ceil(args.trials / args.workers) * args.trial_seconds
    phases, claimed = saw.pop("phases"), saw.pop("claimed")
    claim_p50 = percentile(claimed, 0.5)
    trial_mean = phases.seconds.get("trial", 0.0) / max(phases.calls.get("trial", 0), 1)
    saw.update(  # what server_cost.per_trial reads
        trials=n,
        outside_training_s_per_trial=claim_p50 + trial_mean - args.trial_seconds,
        worker_cpu_s=saw["cpu_s"] + saw["helpers_cpu_s"],
        worker_runqueue_wait_s=0.0,
    )
    per_trial = cost.per_trial({"workers_saw": saw, "servers": servers})
    empty = saw.pop("empty")
    connections, db, ms = ran["peak_pg_connections"], stack.databases, 1000
    last = outcome["last_complete_s"]
    r = dict(workers=args.workers, processes=math.ceil(args.workers / args.workers_per_process))
    r.update(trials_done=outcome["states"].get("COMPLETE", 0), lost=outcome["lost"])
    r.update(
        duplicated=outcome["duplicated_cells"] + outcome["runs_with_an_epoch_twice"] + outcome["runs_without_trial"]
    )
    r.update(efficiency=ideal / last if last > 0 else 0.0, ideal_s=ideal, measured_s=last)
    # The most this machine allows: every core busy for the run's measured CPU (workers, their
    # export helpers, the mlflow server, PostgreSQL), nothing lost to scheduling or lockstep.
    cpu = per_trial["worker_cpu_s"] + per_trial["mlflow_server_cpu_s"] + per_trial["postgres_cpu_s"]
    r.update(cpu_s_per_trial=cpu, efficiency_cpu_bound=min(1.0, ideal / (cpu * n / (os.cpu_count() or 1))))
    r.update(
        pg_connections_max=connections.get(db["optuna"], 0), mlflow_pg_connections_max=connections.get(db["mlflow"], 0)
    )
    r.update(sql_transactions_per_trial=per_trial["optuna_xacts"], http_requests_per_trial=per_trial["http_requests"])
    r.update(mlflow_server_cpu_ms_per_trial=per_trial["mlflow_server_cpu_s"] * ms)
    r.update(claim_p50_ms=claim_p50 * ms, claim_p99_ms=percentile(claimed, 0.99) * ms, claims=len(claimed))
    r.update(empty_looks=len(empty), empty_look_p50_ms=percentile(empty, 0.5) * ms)
    r.update(errors=saw.pop("worker_errors"), error_lines=saw.pop("error_lines"), timed_out=ran["timed_out"])
    r.update(per_trial=per_trial, phases=phases.rows(n), outcome=outcome, workers_saw=saw)
    r["http_by_endpoint_per_trial"] = {k: v / n for k, v in servers["http_by_endpoint"].items()}
    r["memory_mb"] = {
        "worker_processes_pss_peak": ran["peak_workers_total"]["pss_mb"],
        "helpers_pss": saw["helpers_pss_mb"],
    }
    r["memory_mb"]["per_worker"] = sum(r["memory_mb"].values()) / args.workers
    r.update(extras=extras, projection=projection(per_trial, extras, args.trial_seconds))
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--trials", type=int, default=30, help="cells of the study, one trial each")
    parser.add_argument("--trial-seconds", type=float, default=5.0, help="training (sleep) per trial")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (the sleep split between them)")
    parser.add_argument("--workers-per-process", type=int, default=25, help="worker threads per forked process")
    parser.add_argument("--exporters-per-process", type=int, default=2, help="model-export helpers per process")
    parser.add_argument("--start-spread", type=float, default=0.0, help="seconds over which the workers start")
    parser.add_argument(
        "--mlflow-workers",
        type=int,
        default=1,
        help="uvicorn workers of the mlflow server (each pools up to 50 PostgreSQL connections, as in compose)",
    )
    parser.add_argument(
        "--mlflow-server",
        choices=("uvicorn", "gunicorn"),
        default="uvicorn",
        help="what serves MLflow: uvicorn (its default, the FastAPI app around the Flask one) or gunicorn "
        "(the Flask app, threads per worker)",
    )
    parser.add_argument(
        "--artifacts",
        choices=("proxied", "direct"),
        default="direct",
        help="direct: workers write the model's files to the artifact store themselves (a shared folder here, "
        "as an S3 bucket would be: what a fleet runs, docs/DEPLOY.md); proxied: through the mlflow server "
        "(compose's default)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the workers are killed")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument("--_pool", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._pool:
        pool_main(args._pool)
        return 0
    if min(args.workers, args.trials, args.epochs, args.workers_per_process, args.exporters_per_process) < 1:
        parser.exit(2, "fleet: --workers, --trials, --epochs and the per-process counts must be at least 1\n")
    if why := Databases.postgres_reachable():
        parser.exit(2, f"fleet: PostgreSQL is not reachable at {PG_ADMIN_URL} ({why}); set SWEEPER_TEST_PG\n")
    if pgbouncer_binary() is None:
        parser.exit(2, "fleet: pgbouncer is not installed (apt-get install pgbouncer)\n")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the servers, drops the databases
    tmp = Path(tempfile.mkdtemp(prefix="fleet-"))
    os.environ["SWEEPER_HOME"] = str(tmp / "home")
    os.chdir(tmp)
    dbs = Databases(tmp)
    command = " ".join(["python benchmarks/fleet.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"date": time.strftime("%F %T %z"), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    result.update(command=command, mlflow_server=args.mlflow_server)
    stack = Stack()
    started = time.perf_counter()
    try:
        stack.start(tmp, dbs, args.mlflow_workers, args.artifacts == "direct", args.mlflow_server)
        result.update(measure(args, tmp, stack))
    finally:
        stack.stop()
        dbs.close()
        result["seconds"] = time.perf_counter() - started
        result["loadavg_end"] = os.getloadavg()
        if args.keep:
            result["tmp"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    emit(result, args.json, print_summary)
    return 0


def print_summary(r: dict[str, Any]) -> None:
    print(
        f"{r['command']}: done {r['trials_done']}, lost {r['lost']}, duplicated {r['duplicated']}, efficiency "
        f"{r['efficiency']:.2f} ({r['ideal_s']:.0f}s ideal / {r['measured_s']:.0f}s; at most "
        f"{r['efficiency_cpu_bound']:.2f} on {os.cpu_count()} cores for {r['cpu_s_per_trial']:.2f} CPU-s per trial); per trial "
        f"{r['sql_transactions_per_trial']:.1f} SQL transactions, {r['http_requests_per_trial']:.1f} HTTP requests, "
        f"{r['mlflow_server_cpu_ms_per_trial']:.0f} ms mlflow CPU; PostgreSQL connections <= {r['pg_connections_max']}; "
        f"claim p50 {r['claim_p50_ms']:.0f} ms, p99 {r['claim_p99_ms']:.0f} ms; load {r['loadavg_end'][0]:.1f}"
    )


if __name__ == "__main__":
    sys.exit(main())
