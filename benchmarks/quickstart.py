#!/usr/bin/env python
"""The quickstart as a new user runs it, timed: ``sweeper launch --study quickstart --workers 2``.

    python benchmarks/quickstart.py [--checkout DIR ...] [--study quickstart] [--workers 2] [--json]

Each ``--checkout`` (default: this one) runs the command in a fresh ``$SWEEPER_HOME`` with that
checkout's ``sweeper`` first on PYTHONPATH, one after the other, so a change and its baseline are
measured in one run. Reported per checkout: the wall time of the command, each cell's time
outside training (its MLflow run's wall time minus ``train_seconds``: opening the run, data,
checkpoints, uploads, the final model) and its parts (``prepare``: the run, checkpoint, data and
model before training; ``setup``: fit()'s choice of precision, a probe included; ``finish``: the
training thread's part after the last epoch; ``model_log``: logging the model, which since the
worker logs it in the background overlaps the next trial; checkouts before that record no
``finish_seconds`` and their finish is the rest, the model included), the time outside training
on the worker's critical path (prepare + setup + blocking checkpoints + finish) per cell and in
all, the wall time against the ideal packing of the cells (the longest run, or the cells' time
on the workers' training threads summed over the workers, whichever is larger), each cell's
top-1 error, and the load average before and after (other jobs on the machine slow everything).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run(checkout: Path, study: str, workers: int) -> dict:
    from mlflow.tracking import MlflowClient

    home = Path(tempfile.mkdtemp(prefix="sweeper-quickstart-"))
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(SWEEPER_HOME=str(home), PYTHONPATH=str(checkout), SWEEPER_CACHE_DIR=str(home / "cache"))
    env.pop("OMP_NUM_THREADS", None)
    if os.environ.get("SWEEPER_CACHE_DIR"):  # a warm machine: keep its measured precision choices
        env["SWEEPER_CACHE_DIR"] = os.environ["SWEEPER_CACHE_DIR"]
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sweeper", "launch", "--study", study, "--workers", str(workers), "--format", "json"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the quickstart failed in {checkout} (exit {proc.returncode}); logs in {home / 'logs'}")
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(Path(study).stem if study.endswith(".toml") else study)
    cells = []
    for r in client.search_runs([experiment.experiment_id], "tags.`sweeper.role` = 'cell'", max_results=1000):
        run_wall = (r.info.end_time - r.info.start_time) / 1000
        train = r.data.metrics.get("train_seconds", 0.0)
        parts = {  # what the run records of its time outside training (older checkouts: nothing)
            name: r.data.metrics.get(f"{name}_seconds")
            for name in ("prepare", "setup", "checkpoint_blocking", "checkpoint_background", "finish", "model_log")
        }
        known = [parts[n] for n in ("prepare", "setup", "checkpoint_blocking")]
        finish = parts["finish"]
        if finish is None and None not in known:  # before the background model: the rest, model included
            finish = run_wall - train - sum(known)
        model_log = parts["model_log"] or 0.0
        cells.append(
            {
                "cell": r.info.run_name,
                "run_seconds": run_wall,
                "train_seconds": train,
                "outside_training_s": run_wall - train,
                **{f"{name}_s": value for name, value in parts.items()},
                "finish_s": finish,
                # the training thread's time outside training: what delays the worker's next trial
                "critical_outside_s": None if finish is None else sum(known) + finish,
                "busy_s": run_wall - model_log,  # the run's time on the worker's training thread
                "top1_error": r.data.metrics.get("top1_error"),
                "precision": r.data.tags.get("sweeper.precision"),
            }
        )
    cells.sort(key=lambda c: -c["run_seconds"])
    critical = [c["critical_outside_s"] for c in cells]
    ideal = max(max(c["run_seconds"] for c in cells), sum(c["busy_s"] for c in cells) / workers)
    return {
        "checkout": str(checkout),
        "wall_seconds": wall,
        "ideal_packing_s": ideal,
        "wall_vs_ideal": wall / ideal,
        "run_total_s": sum(c["run_seconds"] for c in cells),
        "train_total_s": sum(c["train_seconds"] for c in cells),
        "outside_training_total_s": sum(c["outside_training_s"] for c in cells),
        "critical_outside_total_s": None if None in critical else sum(critical),
        "cells": cells,
        "max_top1_error": max(c["top1_error"] for c in cells),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", type=Path, help="a sweeper checkout (repeatable)")
    parser.add_argument("--study", default="quickstart")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    results = []
    for checkout in args.checkout or [HERE]:
        print(f"running the {args.study} study from {checkout} ...", file=sys.stderr, flush=True)
        results.append(run(checkout.resolve(), args.study, args.workers))
        r = results[-1]
        print(f"  {r['wall_seconds']:.0f} s wall, load {r['load_average_before'][0]:.1f}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        critical = r["critical_outside_total_s"]
        print(
            f"{r['checkout']}: {r['wall_seconds']:.0f} s wall, {r['wall_vs_ideal']:.2f}x the ideal packing "
            f"({r['ideal_packing_s']:.0f} s); runs {r['run_total_s']:.0f} s in all, outside training "
            f"{r['outside_training_total_s']:.1f} s, on the critical path "
            f"{'?' if critical is None else f'{critical:.1f}'} s; max top-1 error {r['max_top1_error']:.3f}; "
            f"load {r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}"
        )
        for c in r["cells"]:
            parts = ""
            if c["setup_s"] is not None:
                parts = f" (prepare {c['prepare_s']:.1f}, setup {c['setup_s']:.1f}, finish {c['finish_s']:.1f}"
                parts += f", model in the background {c['model_log_s']:.1f})" if c["model_log_s"] is not None else ")"
            if c["checkpoint_background_s"]:
                parts += (
                    f" checkpoints: {c['checkpoint_blocking_s']:.1f} s blocking, "
                    f"{c['checkpoint_background_s']:.1f} s in the background"
                )
            print(
                f"  {c['cell']:<22} run {c['run_seconds']:6.1f} s  train {c['train_seconds']:6.1f} s  "
                f"outside {c['outside_training_s']:5.1f} s{parts}  top-1 {c['top1_error']:.3f}  {c['precision']}"
            )


if __name__ == "__main__":
    main()
