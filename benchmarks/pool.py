"""Pools of light workers forked from one warmed-up process (sweep_scale part b, server_cost):
start them together, sample their memory, collect what each saw."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from harness import PG_ADMIN_URL, PhaseTimes, light_config


def warm_pool(warmups: list[dict[str, str]]) -> int:
    """In the pool process, before any fork: import what a worker uses once, run one warm-up trial
    per ``warmups`` entry (storage_url, tracking_uri, study) so that what a worker loads on first
    use (MLflow's store, alembic, Optuna's models, SQLAlchemy's caches) is loaded as in a worker
    that has been running a while, then close every connection. Forked workers share these pages
    (a fresh interpreter per worker costs ~650 MB RSS and ~10 s of CPU here). Returns the trials run."""
    import gc
    import logging

    import torch

    torch.set_num_threads(1)
    import mlflow  # noqa: F401  (loaded once, shared by the forked workers)
    import optuna  # noqa: F401
    import sqlalchemy.engine

    from sweeper import worker

    with contextlib.suppress(ImportError):
        import psycopg2  # noqa: F401
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    worker.load_data("synthetic", None)  # the 2,000-image synthetic set, shared too
    warm = sum(worker.run(light_config(w["storage_url"], w["tracking_uri"], w["study"])) for w in warmups)
    for obj in gc.get_objects():
        with contextlib.suppress(Exception):
            if isinstance(obj, sqlalchemy.engine.Engine):
                obj.dispose()
    gc.collect()
    return warm


def worker_child(run: dict[str, Any], index: int, go_file: Path, rundir: Path) -> int:
    """One forked worker: ready, wait for the go signal, run trials, write done-INDEX.json."""
    import gc

    from sweeper import worker

    # A worker started on its own has a private heap; here the first collection after the fork
    # copies the shared pages it touches. Pay that before the clock starts.
    gc.collect()
    phases = PhaseTimes()
    config = light_config(run["storage_url"], run["tracking_uri"], run["study"], run["epoch_sleep"], on_phase=phases)
    (rundir / f"ready-{index}").write_text("")
    while not go_file.exists():
        time.sleep(0.01)
    started, cpu0, sched0 = time.time(), time.process_time(), schedstat()
    if run.get("profile"):
        import cProfile

        prof = cProfile.Profile(time.process_time)  # CPU seconds, not wall
        done = prof.runcall(worker.run, config)
        prof.dump_stats(str(rundir / f"worker-{index}.prof"))
    else:
        done = worker.run(config)
    ended, sched1 = time.time(), schedstat()
    (rundir / f"done-{index}.json").write_text(
        json.dumps(
            {
                "done": done,
                "started": started,
                "ended": ended,
                "cpu_s": time.process_time() - cpu0,
                # seconds this process was runnable but waiting for a CPU (all its threads)
                "runqueue_wait_s": (sched1[1] - sched0[1]) / 1e9 if sched0 and sched1 else None,
                "intervals": phases.intervals,
            }
        )
    )
    return 0


def run_workers(run: dict[str, Any], child=worker_child) -> dict[str, Any]:
    """Fork ``run["workers"]`` processes, each ``child(run, index, go_file, rundir)`` with its output
    in rundir/worker-INDEX.log; start them together once all are ready; sample their memory (and
    the run's PostgreSQL connections) until they exit, killing them past ``run["run_timeout"]``."""
    import logging
    import signal

    rundir = Path(run["rundir"])
    go_file = rundir / "go"
    pids: dict[int, int] = {}
    for i in range(run["workers"]):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                fd = os.open(rundir / f"worker-{i}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                logging.basicConfig(
                    level=logging.INFO,
                    stream=sys.stderr,
                    force=True,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                )
                code = child(run, i, go_file, rundir)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        pids[pid] = i
    exits: dict[int, dict[str, Any]] = {}

    def reap() -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exits[pids[pid]] = {
                "status": os.waitstatus_to_exitcode(status),
                "cpu_s": ru.ru_utime + ru.ru_stime,
                "maxrss_mb": ru.ru_maxrss / 1024,
                "exited_at": time.time(),
            }

    deadline = time.time() + run["ready_timeout"]
    while sum(1 for i in range(run["workers"]) if (rundir / f"ready-{i}").exists()) < run["workers"]:
        reap()
        if time.time() > deadline or exits:
            break
        time.sleep(0.05)
    ready_s = run["ready_timeout"] - (deadline - time.time())
    go = time.time()
    go_file.write_text(repr(go))
    peak = {"rss_mb": 0.0, "pss_mb": 0.0}
    per_worker_peak: dict[int, dict[str, float]] = {}
    deadline = go + run["run_timeout"]
    timed_out = False
    pg = pg_sampler(run.get("pg_dbs") or [])
    connections: dict[str, int] = {}
    next_sample = next_memory = 0.0
    while len(exits) < len(pids):
        reap()
        if pg and time.time() >= next_sample:
            next_sample = time.time() + 0.5
            for db, count in pg().items():
                connections[db] = max(connections.get(db, 0), count)
        # Every 2 s: reading smaps_rollup walks the page tables of 5 GB of address space, ~12 % of
        # a core at 4 reads a second for 8 processes, taken from the fleet it measures.
        sample_memory = time.time() >= next_memory
        next_memory = time.time() + 2.0 if sample_memory else next_memory
        total_rss = total_pss = 0.0
        for pid, i in pids.items():
            if i in exits or not sample_memory:
                continue
            m = memory(pid)
            if m:
                total_rss += m["rss_mb"]
                total_pss += m["pss_mb"]
                p = per_worker_peak.setdefault(i, {"rss_mb": 0.0, "pss_mb": 0.0})
                p["rss_mb"], p["pss_mb"] = max(p["rss_mb"], m["rss_mb"]), max(p["pss_mb"], m["pss_mb"])
        peak["rss_mb"], peak["pss_mb"] = max(peak["rss_mb"], total_rss), max(peak["pss_mb"], total_pss)
        if time.time() > deadline and not timed_out:
            timed_out = True
            for pid, i in pids.items():
                if i not in exits:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        time.sleep(0.25)
    return {
        "go": go,
        "ready_s": ready_s,
        "exits": exits,
        "timed_out": timed_out,
        "peak_workers_total": peak,
        "peak_pg_connections": connections,
        "per_worker_peak": per_worker_peak,
        "loadavg_end": os.getloadavg(),
    }


def pg_sampler(dbs: list[str]):
    """A function returning {database: open connections} for the run's PostgreSQL databases."""
    if not dbs:
        return None
    try:
        import psycopg2

        conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=5)
        conn.autocommit = True
    except Exception:  # the figure is optional
        return None

    def sample() -> dict[str, int]:
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT datname, count(*) FROM pg_stat_activity WHERE datname = ANY(%s) GROUP BY datname", (dbs,)
                )
                return dict(cur.fetchall())
        except Exception:
            return {}

    return sample


def memory(pid: int) -> dict[str, float] | None:
    """{rss_mb, pss_mb} of a process, from /proc (None when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            values[parts[0][:-1].lower() + "_mb"] = int(parts[1]) / 1024
    return values


def schedstat() -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of this process's threads so far."""
    total = [0, 0]
    try:
        for task in Path("/proc/self/task").iterdir():
            run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
            total[0] += int(run_ns)
            total[1] += int(wait_ns)
    except (OSError, ValueError):
        return None
    return total[0], total[1]
