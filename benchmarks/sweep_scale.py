"""How the sweep layer scales: enqueue, many workers, per-trial orchestration overhead.

    python benchmarks/sweep_scale.py                      # all parts, a few lines for people
    python benchmarks/sweep_scale.py --part a --json      # one JSON document on stdout
    python benchmarks/sweep_scale.py --part b --workers 1,4,16,32 --backends sqlite,postgresql

(a) ``sweeper.trials.enqueue.enqueue_study`` of a 1,000-cell grid (``seed = list(range(1000))``) and its
    re-launch, on SQLite and PostgreSQL, next to Optuna's ``study.enqueue_trial(params,
    skip_if_exists=True)`` on the same storage (quadratic: run on ``--baseline-cells`` cells, 300
    by default, and projected to the full grid from a fit t(n) = a*n + b*n^2). Also the time of
    one ``claim`` with the whole grid waiting.
(b) W worker processes running ``sweeper.worker.run`` (real WorkerConfig, real Optuna storage,
    real MLflow tracking) whose training is a fixed sleep: ``WorkerConfig.fit`` is a function
    with fit's signature that sleeps per epoch and calls ``on_epoch``, and
    a tiny model (``WorkerConfig.build_model``) stands in for GoogLeNet. The workers are forked from
    one process that imported torch, mlflow and optuna once (a fresh interpreter per worker costs
    ~650 MB RSS and ~10 s of CPU here; forked, they share those pages). Trials per minute from
    the go signal to the last completion ("end to end") and from each worker's cycle time once
    running ("steady"), efficiency against W x one worker's rate, and every error in the
    workers' output.
(c) per-trial orchestration overhead, trivial model, no training, 14 epochs: sweeper's worker vs
    ``study.optimize`` with ``optuna_integration.MLflowCallback`` (an objective that reports 14
    values), both on SQLite with an MLflow SQLite store; rounds alternate, medians reported,
    and one extra round of each under cProfile shows where the time goes.

PostgreSQL: ``$SWEEPER_TEST_PG`` (default postgresql://postgres@127.0.0.1:5432/postgres) is
used to create and drop throwaway databases. Everything else lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import harness  # first: this checkout's sweeper
import pool
from harness import PG_ADMIN_URL, Databases, dispose, grid_spec, log

SCRIPT = Path(__file__).resolve()
ERROR_PATTERNS = {  # counted in the workers' output (stdout + stderr, logging at INFO)
    "database_is_locked": "database is locked",
    "too_many_clients": "too many clients",
    "deadlock": "deadlock",
    "operational_error": "OperationalError",
    "traceback": "Traceback",
    "error_lines": " ERROR ",
    "mlflow_error_lines": "ERROR mlflow",
    "storage_unreachable_at_start": "cannot open the Optuna storage",
    "warning_lines": " WARNING ",  # e.g. a database call retried, MLflow buffered: listed, not errors
}


# --- (a) enqueue ---------------------------------------------------------------------------------


def fit_quadratic(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares t = a*n + b*n^2 through the origin; returns (a, b)."""
    s11 = sum(n * n for n, _ in points)
    s12 = sum(n**3 for n, _ in points)
    s22 = sum(n**4 for n, _ in points)
    r1 = sum(n * t for n, t in points)
    r2 = sum(n * n * t for n, t in points)
    det = s11 * s22 - s12 * s12
    if det == 0:
        return (points[-1][1] / points[-1][0] if points else 0.0), 0.0
    return (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det


def part_a(dbs: Databases, backend: str, cells: int, baseline_cells: int, repeats: int) -> dict[str, Any]:
    import optuna

    from sweeper.names import KEY_ATTR
    from sweeper.storage import connect
    from sweeper.trials import claims, enqueue

    out: dict[str, Any] = {"backend": backend, "cells": cells, "baseline_cells": baseline_cells}
    runs = []
    for r in range(repeats):
        url = dbs.new(backend, f"a{r}")
        t0 = time.perf_counter()
        storage = connect.open_storage(url)
        t_open = time.perf_counter() - t0
        spec = grid_spec("scale-a", cells)
        t0 = time.perf_counter()
        first = enqueue.enqueue_study(storage, spec)
        t_launch = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = enqueue.enqueue_study(storage, spec)
        t_relaunch = time.perf_counter() - t0
        trials = storage.get_all_trials(first.study._study_id, deepcopy=False)
        keys = {t.user_attrs.get(KEY_ATTR) for t in trials}
        assert first.added == cells and again.added == 0 and again.existing == cells, (first.added, again.added)
        assert len(trials) == cells and len(keys) == cells, "one WAITING trial per cell"
        assert [t.number for t in trials] == list(range(cells)), "trials numbered as Optuna numbers them"
        t0 = time.perf_counter()
        claimed = claims.claim(first.study)
        t_claim = time.perf_counter() - t0
        assert claimed is not None
        runs.append(
            {
                "open_storage_s": t_open,
                "launch_s": t_launch,
                "relaunch_s": t_relaunch,
                "claim_with_all_waiting_s": t_claim,
            }
        )
        dispose(storage)
        log(
            f"  (a) {backend} sweeper run {r + 1}: launch {t_launch:.2f}s, re-launch {t_relaunch:.2f}s, "
            f"claim {t_claim * 1000:.0f}ms (open_storage {t_open:.2f}s)"
        )
    for k in runs[0]:
        out[f"sweeper_{k}"] = statistics.median(x[k] for x in runs)
    out["sweeper_runs"] = runs

    # Baseline: the public API, one trial at a time, each checking every existing trial.
    url = dbs.new(backend, "abase")
    storage = connect.open_storage(url)
    spec = grid_spec("scale-a-baseline", baseline_cells)
    study = optuna.create_study(study_name=spec.name, storage=storage)
    cum, marks = [], max(1, baseline_cells // 6)
    t0 = time.perf_counter()
    for i, cell in enumerate(spec.cells, start=1):
        study.enqueue_trial({"variant": cell.variant, "dataset": cell.dataset, "seed": cell.seed}, skip_if_exists=True)
        if i % marks == 0 or i == baseline_cells:
            cum.append((i, time.perf_counter() - t0))
    t_base = cum[-1][1]
    t0 = time.perf_counter()
    for cell in spec.cells:
        study.enqueue_trial({"variant": cell.variant, "dataset": cell.dataset, "seed": cell.seed}, skip_if_exists=True)
    t_base_re = time.perf_counter() - t0
    assert len(study.get_trials(deepcopy=False)) == baseline_cells
    dispose(storage)
    a, b = fit_quadratic(cum)
    if a < 0 or b < 0:  # a noisy fit on a short baseline: neither term can cost negative time
        a, b = max(a, 0.0), max(b, 0.0)
        if a == b == 0.0:
            a = t_base / baseline_cells
    out.update(
        {
            "baseline_enqueue_s": t_base,
            "baseline_relaunch_s": t_base_re,
            "baseline_enqueue_cumulative": cum,
            "baseline_fit_a_s_per_cell": a,
            "baseline_fit_b_s_per_cell2": b,
            "baseline_projected_enqueue_s": a * cells + b * cells**2,
        }
    )
    # Re-enqueueing n cells: n calls that each read all n trials. The per-trial read cost is the
    # fit's marginal 2*b per call; the rest of a call's cost is what the measured re-enqueue adds.
    per_call = t_base_re / baseline_cells
    read_cost = max(0.0, 2 * b)
    fixed = max(0.0, per_call - read_cost * baseline_cells)
    out["baseline_projected_relaunch_s"] = cells * (fixed + read_cost * cells)
    same_n_sweeper = out["sweeper_launch_s"] * baseline_cells / cells
    out["speedup_enqueue_per_cell"] = (t_base / baseline_cells) / (out["sweeper_launch_s"] / cells)
    out["speedup_enqueue_projected_full_grid"] = out["baseline_projected_enqueue_s"] / out["sweeper_launch_s"]
    out["speedup_relaunch_projected_full_grid"] = out["baseline_projected_relaunch_s"] / out["sweeper_relaunch_s"]
    out["targets"] = {"enqueue_lt_10s": out["sweeper_launch_s"] < 10, "relaunch_lt_5s": out["sweeper_relaunch_s"] < 5}
    log(
        f"  (a) {backend} baseline enqueue_trial(skip_if_exists=True): {baseline_cells} cells {t_base:.2f}s "
        f"(sweeper, pro rata: {same_n_sweeper:.2f}s), re-enqueue {t_base_re:.2f}s; projected to {cells}: "
        f"{out['baseline_projected_enqueue_s']:.0f}s / {out['baseline_projected_relaunch_s']:.0f}s"
    )
    return out


# --- (b) many worker processes --------------------------------------------------------------------


def pool_main(cfg_path: str) -> None:
    """One process per backend: import everything once, then for each W fork W workers and
    start them together. Workers forked from here share the imported modules' pages."""
    import resource
    import threading

    cfg = json.loads(Path(cfg_path).read_text())
    warm = pool.warm_pool(cfg["warmups"])  # one warm-up trial per backend
    usage = resource.getrusage(resource.RUSAGE_SELF)
    startup = {
        **(pool.memory(os.getpid()) or {}),
        "startup_cpu_s": usage.ru_utime + usage.ru_stime,
        "threads_before_fork": threading.active_count(),
        "warmup_trials": warm,
    }
    print(f"warm-up (imports + one trial): {startup}", flush=True)
    Path(cfg["startup_result"]).write_text(json.dumps(startup))
    for run in cfg["runs"]:
        result = pool.run_workers(run)
        Path(run["result"]).write_text(json.dumps(result))
        print(
            f"{run['backend']} W={run['workers']}: exits {[e['status'] for e in result['exits'].values()]}", flush=True
        )


def part_b(dbs: Databases, tmp: Path, backends: list[str], worker_counts: list[int], args) -> list[dict[str, Any]]:
    """Every (W, backend) run from one pool process, interleaved (W=1 sqlite, W=1 postgresql,
    W=4 sqlite, ...) so that the other load on the machine hits both backends alike."""
    import subprocess

    from sweeper import tracking
    from sweeper.storage import connect
    from sweeper.trials import enqueue

    tag = uuid.uuid4().hex[:4]
    base = tmp / "runs" / f"b-{tag}"
    base.mkdir(parents=True)
    per_backend: dict[str, dict[str, Any]] = {}
    warmups = []
    for backend in backends:
        kind = args.mlflow_store if args.mlflow_store != "auto" else backend
        uri = dbs.new(kind, f"mlflow-{backend}")
        t0 = time.perf_counter()
        client = tracking.client(uri)
        client.search_experiments(max_results=1)  # creates the MLflow schema once
        log(f"  (b) {backend}: MLflow store on {kind} ready in {time.perf_counter() - t0:.1f}s")
        url = dbs.new(backend, "bwarm")
        storage = connect.open_storage(url)
        study = f"scale-b-{backend}-warmup-{tag}"
        enqueue.enqueue_study(storage, grid_spec(study, 1, epochs=args.epochs, limit_train=256, limit_test=64))
        dispose(storage)
        client.create_experiment(study, artifact_location=(tmp / "mlartifacts" / study).as_uri())
        warmups.append({"storage_url": url, "tracking_uri": uri, "study": study})
        per_backend[backend] = {"mlflow_store": kind, "tracking_uri": uri, "client": client}
    runs = []
    for w in worker_counts:
        for backend in backends:
            info = per_backend[backend]
            name = f"scale-b-{backend}-w{w}-{tag}"
            n = max(w * args.trials_per_worker, 6)
            url = dbs.new(backend, f"b{w}")
            storage = connect.open_storage(url)
            enqueue.enqueue_study(storage, grid_spec(name, n, epochs=args.epochs, limit_train=256, limit_test=64))
            dispose(storage)
            experiment_id = info["client"].create_experiment(
                name, artifact_location=(tmp / "mlartifacts" / name).as_uri()
            )
            rundir = base / f"{backend}-w{w}"
            rundir.mkdir()
            pg_dbs = [u.rsplit("/", 1)[1] for u in (url, info["tracking_uri"]) if u.startswith("postgresql")]
            runs.append(
                {
                    "backend": backend,
                    "rundir": str(rundir),
                    "workers": w,
                    "trials": n,
                    "storage_url": url,
                    "pg_dbs": pg_dbs,
                    "tracking_uri": info["tracking_uri"],
                    "study": name,
                    "experiment_id": experiment_id,
                    "epoch_sleep": args.epoch_sleep,
                    "ready_timeout": 600,
                    "run_timeout": args.b_timeout,
                    "result": str(rundir / "pool.json"),
                    "profile": args.b_profile,
                }
            )
    cfg = {"runs": runs, "warmups": warmups, "startup_result": str(base / "startup.json")}
    (base / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(base / "pool.log", "wb") as pool_log:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--_pool", str(base / "cfg.json")],
            env=env,
            stdout=pool_log,
            stderr=subprocess.STDOUT,
            timeout=len(runs) * (args.b_timeout + 600) + 600,
        )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"the worker pool failed (exit {proc.returncode}); see {base / 'pool.log'}:\n"
            + (base / "pool.log").read_text()[-3000:]
        )
    startup = json.loads((base / "startup.json").read_text())
    out = []
    for backend in backends:
        info = per_backend[backend]
        results = [
            collect_run(run, info["client"], backend, info["mlflow_store"], args)
            for run in runs
            if run["backend"] == backend
        ]
        one = next((r for r in results if r["workers"] == 1), None)
        for r in results:
            if one:
                r["efficiency"] = r["trials_per_min"] / (r["workers"] * one["trials_per_min"])
                if r["steady_trials_per_min"] and one["steady_trials_per_min"]:
                    r["steady_efficiency"] = r["steady_trials_per_min"] / (r["workers"] * one["steady_trials_per_min"])
            log(
                f"  (b) {backend} W={r['workers']:>2}: {r['trials_per_min']:.1f} trials/min end to end "
                f"(eff {r.get('efficiency', float('nan')):.0%}), steady {r['steady_trials_per_min'] or 0:.1f} "
                f"(eff {r.get('steady_efficiency', float('nan')):.0%}), {r['trials']} trials {r['states']}, "
                f"errors {r['total_errors']} (locked {r['errors']['database_is_locked']}, too many clients "
                f"{r['errors']['too_many_clients']}, exits {r['nonzero_exits']}, warnings "
                f"{r['errors']['warning_lines']}), pg connections {r['peak_pg_connections']}, per trial: cpu {r['cpu_s_per_trial']:.2f}s, waiting for a CPU "
                f"{r['runqueue_wait_s_per_trial'] or 0:.2f}s, other waits {r['other_wait_s_per_trial'] or 0:.2f}s; "
                f"workers PSS {r['memory']['workers_total_peak']['pss_mb']:.0f} MB, load {r['loadavg_end'][0]:.1f}"
            )
        out.append(
            {
                "backend": backend,
                "mlflow_store": info["mlflow_store"],
                "pool_seconds": seconds,
                "worker_startup": startup,
                "runs": results,
            }
        )
    return out


def collect_run(run: dict[str, Any], client, backend: str, mlflow_kind: str, args) -> dict[str, Any]:
    from sweeper import tracking
    from sweeper.storage import connect

    rundir, n, name = Path(run["rundir"]), run["trials"], run["study"]
    pool = json.loads(Path(run["result"]).read_text())
    go = pool["go"]
    storage = connect.open_storage(run["storage_url"])
    trials = storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False)
    dispose(storage)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    last_complete = max(t.datetime_complete.timestamp() for t in complete) if complete else go
    in_trial = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete]
    runs = client.search_runs([run["experiment_id"]], max_results=5000)
    cell_runs = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "cell"]
    finished_runs = sum(1 for r in cell_runs if r.info.status == "FINISHED")

    errors = {k: 0 for k in ERROR_PATTERNS}
    error_lines = 0  # lines with any of the patterns but a warning, each counted once
    examples: list[str] = []
    for f in sorted(rundir.glob("worker-*.log")):
        for line in f.read_text(errors="replace").splitlines():
            hits = [k for k, pattern in ERROR_PATTERNS.items() if pattern in line]
            for k in hits:
                errors[k] += 1
            if any(k != "warning_lines" for k in hits):
                error_lines += 1
                if len(examples) < 5 and "Traceback" not in line:
                    examples.append(f"{f.name}: {line[:300]}")
    nonzero = sorted(i for i, e in pool["exits"].items() if e["status"] != 0)
    per_worker = [json.loads(p.read_text()) for p in sorted(rundir.glob("done-*.json"))]
    cycles = []
    for w in per_worker:
        iv = sorted(w["intervals"])
        if len(iv) >= 2:
            cycles.append((iv[-1][0] - iv[0][0]) / (len(iv) - 1))
    cpu_total = sum(w["cpu_s"] for w in per_worker)
    cpu_per_trial = cpu_total / max(1, len(complete))
    waits = [w["runqueue_wait_s"] for w in per_worker if w.get("runqueue_wait_s") is not None]
    runq_per_trial = sum(waits) / max(1, len(complete)) if waits else None
    busy = sum(w["ended"] - w["started"] for w in per_worker)  # worker-seconds from go to exit
    sleep_per_trial = args.epochs * args.epoch_sleep
    out = {
        "backend": backend,
        "mlflow_store": mlflow_kind,
        "workers": run["workers"],
        "trials": n,
        "epochs": args.epochs,
        "epoch_sleep_s": args.epoch_sleep,
        "states": states,
        "mlflow_cell_runs": len(cell_runs),
        "mlflow_finished_runs": finished_runs,
        "makespan_s": last_complete - go,
        "trials_per_min": len(complete) / (last_complete - go) * 60 if complete else 0.0,
        "steady_trials_per_min": sum(60.0 / c for c in cycles) if cycles else None,
        "steady_cycle_s_mean": statistics.mean(cycles) if cycles else None,
        "in_trial_s_mean": statistics.mean(in_trial) if in_trial else None,
        "first_claim_after_go_s_max": max(
            (sorted(w["intervals"])[0][0] - go for w in per_worker if w["intervals"]), default=None
        ),
        "trials_per_worker": sorted(w["done"] for w in per_worker),
        "cpu_s_per_trial": cpu_per_trial,
        "runqueue_wait_s_per_trial": runq_per_trial,
        # worker-seconds per trial left once sleep, CPU and run-queue waits are taken out: database
        # locks, network and disk (fsync) waits, and the idle end of a worker with nothing left
        "other_wait_s_per_trial": (
            busy / max(1, len(complete)) - sleep_per_trial - cpu_per_trial - (runq_per_trial or 0)
        ),
        "cores_used": cpu_total / (last_complete - go) if complete else None,
        # what 2 cores could sustain at this CPU cost per trial, were nothing else running
        "cpu_ceiling_trials_per_min_2_cores": 2 * 60 / cpu_per_trial if cpu_per_trial else None,
        "ideal_trials_per_min": run["workers"] * 60 / (args.epochs * args.epoch_sleep),
        "errors": errors,
        "error_examples": examples,
        "nonzero_exits": len(nonzero),
        "timed_out": pool["timed_out"],
        "workers_ready_s": pool["ready_s"],
        "peak_pg_connections": {
            ("optuna" if db == run["storage_url"].rsplit("/", 1)[1] else "mlflow"): c
            for db, c in pool.get("peak_pg_connections", {}).items()
        },
        "memory": {
            "workers_total_peak": pool["peak_workers_total"],
            "per_worker_pss_mb_max": max((p["pss_mb"] for p in pool["per_worker_peak"].values()), default=None),
            "per_worker_rss_mb_max": max((p["rss_mb"] for p in pool["per_worker_peak"].values()), default=None),
            "per_worker_maxrss_mb_max": max(e["maxrss_mb"] for e in pool["exits"].values()),
        },
        "loadavg_end": pool["loadavg_end"],
        "logs": str(rundir),
    }
    # error lines and tracebacks in the logs, workers that exited non-zero, trials not COMPLETE,
    # cells without a FINISHED MLflow run (warnings, e.g. a retried database call, are listed apart)
    out["error_lines"] = error_lines
    out["total_errors"] = error_lines + len(nonzero) + (n - len(complete)) + (n - finished_runs)
    return out


# --- (c) per-trial overhead -------------------------------------------------------------------------


def part_c(dbs: Databases, tmp: Path, trials: int, rounds: int, epochs: int, profile: bool) -> dict[str, Any]:
    import warnings
    from dataclasses import replace

    import optuna
    from mlflow.tracking import MlflowClient
    from optuna_integration.mlflow import MLflowCallback

    import sweeper.worker as worker
    from sweeper.storage import connect
    from sweeper.trials import enqueue

    warnings.filterwarnings("ignore", category=FutureWarning, message=".*MLflowCallback.*")
    sw_storage_url = dbs.new("sqlite", "c-sweeper-optuna")
    sw_mlflow = dbs.new("sqlite", "c-sweeper-mlflow")
    base_storage_url = dbs.new("sqlite", "c-base-optuna")
    base_mlflow = dbs.new("sqlite", "c-base-mlflow")
    for uri in (sw_mlflow, base_mlflow):
        MlflowClient(uri).search_experiments(max_results=1)  # schema created outside the timings
    os.environ["SWEEPER_HOME"] = str(tmp / "home-c")
    config = harness.light_config(sw_storage_url, sw_mlflow)
    counter = {"i": 0, "timed_trials": 0}
    export_ms: list[float] = []  # the "sweeper" variant's model export, per round
    # the worker's phases in the "sweeper" variant's timed trials: the profile table; its "model"
    # phase is the model export (the wait for the helper process), which the baseline does not do
    phases = harness.PhaseTimes()

    def sweeper_round(n: int, prof=None, system_metrics: bool = False) -> float:
        counter["i"] += 1
        name = f"scale-c-{counter['i']}"
        storage = connect.open_storage(sw_storage_url)
        enqueue.enqueue_study(storage, grid_spec(name, n + 1, epochs=epochs, limit_train=256, limit_test=64))
        dispose(storage)
        cfg = replace(config, study_names=(name,), system_metrics=system_metrics)
        worker.run(replace(cfg, max_trials=1))  # experiment, parent run: once per study
        t0 = time.perf_counter()
        worker.run(replace(cfg, max_trials=0))  # setup of run() alone
        setup = time.perf_counter() - t0
        plain = not system_metrics and prof is None
        if plain:
            cfg = replace(cfg, on_phase=phases)
        model_before = phases.seconds.get("model", 0.0)
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        try:
            done = worker.run(cfg)
        finally:
            elapsed = time.perf_counter() - t0
            if prof:
                prof.disable()
        assert done == n, (done, n)
        if plain:
            export_ms.append((phases.seconds.get("model", 0.0) - model_before) / n * 1000)
            counter["timed_trials"] += n
        return (elapsed - setup) / n

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("variant", ["standard"])
        value = 1.0
        for epoch in range(1, epochs + 1):
            value = 0.9 / epoch
            trial.report(value, epoch)
        return value

    def baseline_round(n: int, prof=None, wal: bool = False) -> float:
        counter["i"] += 1
        name = f"scale-c-base-{counter['i']}"
        MlflowClient(base_mlflow).create_experiment(name, artifact_location=(tmp / "mlartifacts-c" / name).as_uri())
        # plain: the storage URL as an Optuna user passes it; wal: sweeper's SQLite settings
        storage = connect.open_storage(base_storage_url) if wal else base_storage_url
        study = optuna.create_study(study_name=name, storage=storage)
        callback = MLflowCallback(tracking_uri=base_mlflow, metric_name="top1_error")
        study.optimize(objective, n_trials=1, callbacks=[callback])  # first trial: lazy imports, experiment
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        study.optimize(objective, n_trials=n, callbacks=[callback])
        elapsed = time.perf_counter() - t0
        if prof:
            prof.disable()
        if wal:
            dispose(storage)
        return elapsed / n

    variants = {
        "sweeper": lambda: sweeper_round(trials),
        "sweeper_system_metrics": lambda: sweeper_round(trials, system_metrics=True),
        "baseline": lambda: baseline_round(trials),
        "baseline_wal": lambda: baseline_round(trials, wal=True),
    }
    ms: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for k, fn in variants.items():
            ms[k].append(fn() * 1000)
        log(f"  (c) round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in ms.items()) + " ms/trial")
    out: dict[str, Any] = {
        "storage": "sqlite",
        "mlflow_store": "sqlite",
        "trials_per_round": trials,
        "rounds": rounds,
        "epochs": epochs,
        "loadavg": os.getloadavg(),
        "variants": {
            "sweeper": "sweeper.worker.run: claim, MLflow run, 14 epochs of checkpoint + metrics + report, tell",
            "sweeper_system_metrics": "the same with WorkerConfig(system_metrics=True), the CLI's default "
            "(MLflow's sampler thread per trial); the others run without it",
            "baseline": "study.optimize + MLflowCallback, 14 trial.report per trial, plain Optuna SQLite URL",
            "baseline_wal": "the same on sweeper.storage.connect.open_storage (WAL, synchronous=NORMAL, BEGIN IMMEDIATE)",
        },
    }
    for k, v in ms.items():
        out[f"{k}_ms_per_trial"] = statistics.median(v)
        out[f"{k}_ms_rounds"] = v
    out["ratio_sweeper_over_baseline"] = out["sweeper_ms_per_trial"] / out["baseline_ms_per_trial"]
    out["ratio_sweeper_over_baseline_wal"] = out["sweeper_ms_per_trial"] / out["baseline_wal_ms_per_trial"]
    out["ratio_sweeper_system_metrics_over_baseline"] = (
        out["sweeper_system_metrics_ms_per_trial"] / out["baseline_ms_per_trial"]
    )
    # sweeper logs each finished cell's model (torch.export + MLflow's save, load-back check): the
    # baseline logs none, so the orchestration is also given without it
    out["sweeper_model_export_ms_rounds"] = export_ms
    out["sweeper_model_export_ms_per_trial"] = statistics.median(export_ms)
    without = [a - b for a, b in zip(ms["sweeper"], export_ms)]
    out["sweeper_without_model_export_ms_rounds"] = without
    out["sweeper_without_model_export_ms_per_trial"] = statistics.median(without)
    out["ratio_per_round_without_model_export"] = [a / b for a, b in zip(without, ms["baseline"])]
    out["ratio_per_round_without_model_export_median"] = statistics.median(out["ratio_per_round_without_model_export"])
    # the same round's figures side by side: the other load on the machine hits both alike
    out["ratio_per_round"] = [a / b for a, b in zip(ms["sweeper"], ms["baseline"])]
    out["ratio_per_round_median"] = statistics.median(out["ratio_per_round"])
    out["target_met"] = out["sweeper_ms_per_trial"] <= out["baseline_ms_per_trial"]
    # per trial, by the worker's phases (WorkerConfig.on_phase); nested: "trial" holds prepare,
    # train and finish, "train" holds the epochs' reports
    out["sweeper_profile"] = phases.rows(counter["timed_trials"])
    if profile:
        import cProfile

        prof = cProfile.Profile()
        sweeper_round(trials, prof)
        out["sweeper_profile_by_call_site"] = call_site_rows(prof, trials)
        prof = cProfile.Profile()
        baseline_round(trials, prof)
        out["baseline_profile"] = profile_rows(prof, trials, BASELINE_CALLS)
    return out


# Optuna's and MLflow's functions whose cumulative time per trial says where the baseline's time goes.
BASELINE_CALLS = (
    ("optuna/study/_optimize.py", "_run_trial"),
    ("optuna/study/study.py", "ask"),
    ("optuna/study/study.py", "tell"),
    ("optuna/trial/_trial.py", "report"),
    ("optuna_integration/mlflow.py", "__call__"),
    ("mlflow/tracking/fluent.py", "start_run"),
    ("mlflow/tracking/fluent.py", "end_run"),
    ("mlflow/tracking/fluent.py", "log_params"),
    ("mlflow/tracking/fluent.py", "log_metrics"),
    ("mlflow/tracking/fluent.py", "set_tags"),
    ("mlflow/tracking/fluent.py", "set_experiment"),
    ("gc", "collect"),
)


def _match(key, file_part: str, func: str) -> bool:
    filename, _, name = key
    if file_part in ("posix", "gc"):
        return name.endswith(f"{file_part}.{func}>") or name == f"<built-in method {file_part}.{func}>"
    return name == func and filename.replace(os.sep, "/").endswith(file_part)


def profile_rows(prof, trials: int, calls) -> list[dict[str, Any]]:
    import pstats

    stats = pstats.Stats(prof).stats
    rows = []
    for file_part, func in calls:
        for key, (_cc, nc, _tt, ct, _callers) in sorted(stats.items(), key=lambda kv: kv[0][1]):
            if _match(key, file_part, func):  # one row per function (worker.py has two called run)
                where = f"{file_part}:{key[1]}" if key[1] else file_part
                rows.append(
                    {
                        "function": f"{where}({func})",
                        "calls_per_trial": round(nc / trials, 2),
                        "ms_per_trial": round(ct / trials * 1000, 2),
                    }
                )
    return rows


def call_site_rows(prof, trials: int, top: int = 25) -> list[dict[str, Any]]:
    """The storage and tracking calls made from sweeper's own lines, heaviest first."""
    import pstats

    stats = pstats.Stats(prof).stats
    rows = []
    for (filename, _line, name), (_cc, _nc, _tt, _ct, callers) in stats.items():
        for (cfile, _cline, cname), (_ccc, cnc, _ctt, cct) in callers.items():
            if "/sweeper/" in cfile.replace(os.sep, "/") and "/sweeper/" not in filename.replace(os.sep, "/"):
                rows.append(
                    {
                        "callee": f"{Path(filename).parent.name}/{Path(filename).name}:{name}"
                        if filename != "~"
                        else name,
                        "from": f"{Path(cfile).name}:{cname}",
                        "calls_per_trial": round(cnc / trials, 2),
                        "ms_per_trial": round(cct / trials * 1000, 2),
                    }
                )
    rows.sort(key=lambda r: -r["ms_per_trial"])
    return rows[:top]


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql")
    parser.add_argument("--workers", default="1,4,16,32", help="(b) worker process counts")
    parser.add_argument("--cells", type=int, default=1000, help="(a) grid size")
    parser.add_argument("--baseline-cells", type=int, default=300, help="(a) cells for the quadratic baseline")
    parser.add_argument("--repeats", type=int, default=3, help="(a) sweeper launches per backend (median)")
    parser.add_argument("--trials-per-worker", type=int, default=3, help="(b) trials each worker runs")
    parser.add_argument("--epochs", type=int, default=2, help="(b) epochs per trial")
    parser.add_argument("--epoch-sleep", type=float, default=1.0, help="(b) seconds of sleep per epoch")
    parser.add_argument("--b-timeout", type=float, default=300, help="(b) seconds one W may run")
    parser.add_argument(
        "--mlflow-store",
        choices=("sqlite", "postgresql", "auto"),
        default="sqlite",
        help="(b) the workers' MLflow store (embedded, no server): a SQLite file for every run "
        "(default), or a PostgreSQL database; auto = the Optuna storage's kind",
    )
    parser.add_argument("--b-profile", action="store_true", help="(b) cProfile each worker (worker-N.prof; use --keep)")
    parser.add_argument("--c-trials", type=int, default=20, help="(c) trials per round")
    parser.add_argument("--c-rounds", type=int, default=3, help="(c) alternating rounds (median)")
    parser.add_argument("--c-epochs", type=int, default=14, help="(c) epochs (reports) per trial")
    parser.add_argument("--no-profile", action="store_true", help="(c) skip the cProfile rounds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    parser.add_argument("--_pool", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._pool:
        pool_main(args._pool)
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgresql"):
            parser.error(f"unknown backend {b!r}; choose sqlite and/or postgresql")
    worker_counts = [int(w) for w in args.workers.split(",")]
    need_pg = "postgresql" in backends or args.mlflow_store == "postgresql"
    if need_pg and (why := Databases.postgres_reachable()):
        parser.exit(
            2,
            f"sweep_scale: PostgreSQL is not reachable at {PG_ADMIN_URL} ({why}); set SWEEPER_TEST_PG "
            "or pass --backends sqlite\n",
        )

    tmp = Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    os.environ["SWEEPER_HOME"] = str(tmp / "home")
    os.chdir(tmp)  # nothing (mlruns/, .sweeper/) lands in the checkout
    dbs = Databases(tmp)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    started = time.perf_counter()
    try:
        if args.part in ("a", "all"):
            log(f"(a) launch of {args.cells} cells")
            result["a"] = [part_a(dbs, b, args.cells, args.baseline_cells, args.repeats) for b in backends]
        if args.part in ("b", "all"):
            log(f"(b) worker processes {worker_counts}, {args.epochs} epochs x {args.epoch_sleep}s sleep")
            result["b"] = part_b(dbs, tmp, backends, worker_counts, args)
        if args.part in ("c", "all"):
            log(f"(c) per-trial overhead, {args.c_epochs} epochs, SQLite + MLflow SQLite")
            result["c"] = part_c(dbs, tmp, args.c_trials, args.c_rounds, args.c_epochs, not args.no_profile)
    finally:
        dbs.close()
        result["seconds"] = time.perf_counter() - started
        result["loadavg_end"] = os.getloadavg()
        if args.keep:
            result["tmp"] = str(tmp)
            log(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    harness.emit(result, args.json, print_summary)
    return 0


def print_summary(result: dict[str, Any]) -> None:
    print(
        f"sweep_scale {result['date']}, {result['cpus']} CPUs, load {result['loadavg_start'][0]:.1f} -> "
        f"{result['loadavg_end'][0]:.1f}, {result['seconds']:.0f}s"
    )
    for a in result.get("a", []):
        print(
            f"(a) {a['backend']:<10} launch {a['cells']} cells {a['sweeper_launch_s']:.2f}s, re-launch "
            f"{a['sweeper_relaunch_s']:.2f}s, claim {a['sweeper_claim_with_all_waiting_s'] * 1000:.0f}ms | "
            f"enqueue_trial(skip_if_exists) {a['baseline_cells']} cells {a['baseline_enqueue_s']:.2f}s, "
            f"re-enqueue {a['baseline_relaunch_s']:.2f}s, projected {a['cells']}: "
            f"{a['baseline_projected_enqueue_s']:.0f}s / {a['baseline_projected_relaunch_s']:.0f}s"
        )
    for b in result.get("b", []):
        for r in b["runs"]:
            print(
                f"(b) {b['backend']:<10} W={r['workers']:>2} {r['trials_per_min']:6.1f} trials/min "
                f"(eff {r.get('efficiency', float('nan')):.0%}), steady {r['steady_trials_per_min'] or 0:6.1f} "
                f"(eff {r.get('steady_efficiency', float('nan')):.0%}), errors {r['total_errors']}, locked "
                f"{r['errors']['database_is_locked']}, per trial cpu {r['cpu_s_per_trial']:.2f}s "
                f"+ waiting for a CPU {r['runqueue_wait_s_per_trial'] or 0:.2f}s"
            )
    if "c" in result:
        c = result["c"]
        print(
            f"(c) sweeper {c['sweeper_ms_per_trial']:.0f} ms/trial vs Optuna+MLflowCallback "
            f"{c['baseline_ms_per_trial']:.0f} ms/trial (on sweeper's SQLite settings "
            f"{c['baseline_wal_ms_per_trial']:.0f}): ratio {c['ratio_sweeper_over_baseline']:.2f}; "
            f"of which model export {c['sweeper_model_export_ms_per_trial']:.0f} ms/trial; with system metrics "
            f"{c['sweeper_system_metrics_ms_per_trial']:.0f} ms/trial"
        )
        for row in c.get("sweeper_profile", []):
            print(f"    {row['phase']:<12} {row['calls_per_trial']:6.1f} calls {row['ms_per_trial']:8.1f} ms/trial")


if __name__ == "__main__":
    sys.exit(main())
