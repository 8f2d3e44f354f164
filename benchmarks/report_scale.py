"""How long `sweeper report` takes to read a study of 1,000 finished cells.

Logs N synthetic cell runs (default 1,000: 5 variants x 2 datasets x 100 seeds, 14 epochs of
per-epoch metrics each) into a temporary MLflow SQLite store (one run through the client, the
rest as SQL copies of its rows), with the matching Optuna study,
then times ``sweeper.report.build_frame`` (paged ``search_runs``; no plots) against a naive
baseline that calls ``MlflowClient.get_run`` once per cell.

    python benchmarks/report_scale.py            # a few lines for people
    python benchmarks/report_scale.py --json     # one JSON document on stdout
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import harness  # noqa: F401  (first: this checkout's sweeper)

VARIANTS = ("standard", "long", "short", "short2", "short4")
DATASETS = ("cifar100", "cifar10")
EPOCHS = 14


def _metrics(i: int, variant: str) -> list[tuple[str, float, int]]:
    """(key, value, step) of one synthetic cell: 14 epochs of per-epoch metrics + run metrics."""
    from sweeper.names import EPOCH_METRICS

    rows = [(k, 1.0 / (epoch + i % 7 + 1), epoch) for epoch in range(1, EPOCHS + 1) for k in EPOCH_METRICS]
    return rows + [
        ("num_params", 1_000_000.0 + 1000 * VARIANTS.index(variant), 0),
        ("macs", 50_000_000.0 + VARIANTS.index(variant), 0),
        ("train_seconds", 100.0 + i % 13, 0),
    ]


def populate(n: int, study_name: str, log=print) -> None:
    """n FINISHED cell runs in MLflow and n COMPLETE trials in Optuna, as `sweeper launch` leaves them.

    The first run goes through the MLflow client (create_run, log_batch, set_terminated); the
    others are copies of its rows with their own ids, names, tags and metric values, inserted in
    one SQLite transaction (the client needs ~0.1-0.3 s per run on a small machine).
    """
    import sqlite3
    import uuid

    import optuna
    from mlflow.entities import Metric, Param, RunTag

    from sweeper import tracking
    from sweeper.names import KEY_ATTR, SPEC_ATTR
    from sweeper.storage import connect

    seeds = range(1, -(-n // (len(VARIANTS) * len(DATASETS))) + 1)
    cells = [(v, d, s) for s in seeds for d in DATASETS for v in VARIANTS][:n]
    spec = {
        "name": study_name,
        "description": "synthetic",
        "metric": "top1_error",
        "direction": "minimize",
        "grid": {"variant": list(VARIANTS), "dataset": list(DATASETS), "seed": list(seeds)},
        "train": {"epochs": EPOCHS},
        "search": None,
    }

    client = tracking.client()
    experiment_id = tracking.ensure_experiment(client, study_name)
    parent = tracking.ensure_study_run(client, experiment_id, spec)
    variant, dataset, seed = cells[0]
    key = f"{variant}/{dataset}/s{seed}"
    run = client.create_run(
        experiment_id,
        run_name=key,
        tags={
            tracking.PARENT_TAG: parent,
            tracking.ROLE_TAG: "cell",
            tracking.KEY_TAG: key,
            "optuna.study": study_name,
            "optuna.trial_number": "0",
        },
    )
    template = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        template,
        metrics=[Metric(k, v, now, step) for k, v, step in _metrics(0, variant)],
        params=[
            Param("variant", variant),
            Param("dataset", dataset),
            Param("seed", str(seed)),
            Param("epochs", str(EPOCHS)),
            Param("batch_size", "64"),
            Param("optimizer", "adadelta"),
            Param("lr", "1.0"),
            Param("lr_gamma", "0.7"),
        ],
        tags=[RunTag("sweeper.device", "cpu")],
    )
    client.set_terminated(template, "FINISHED")

    db = tracking.resolve_tracking_uri(None).removeprefix("sqlite:///")
    con = sqlite3.connect(db)

    def table(name: str):
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({name})")]
        rows = [dict(zip(cols, r)) for r in con.execute(f"SELECT * FROM {name} WHERE run_uuid = ?", (template,))]
        return cols, rows

    def insert(name: str, cols: list[str], rows: list[dict]) -> None:
        marks = ", ".join("?" for _ in cols)
        con.executemany(
            f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({marks})", [[r[c] for c in cols] for r in rows]
        )

    run_cols, (run_row,) = table("runs")
    tag_cols, tag_rows = table("tags")
    param_cols, param_rows = table("params")
    metric_cols, (metric_row, *_) = table("metrics")
    latest_cols, (latest_row, *_) = table("latest_metrics")
    run_ids = [template]
    with con:
        for i, (variant, dataset, seed) in enumerate(cells[1:], start=1):
            run_id = uuid.uuid4().hex
            key = f"{variant}/{dataset}/s{seed}"
            run_ids.append(run_id)
            insert(
                "runs",
                run_cols,
                [
                    {
                        **run_row,
                        "run_uuid": run_id,
                        "name": key,
                        "artifact_uri": run_row["artifact_uri"].replace(template, run_id),
                    }
                ],
            )
            tags = {r["key"]: r["value"] for r in tag_rows}
            tags.update({tracking.KEY_TAG: key, "mlflow.runName": key, "optuna.trial_number": str(i)})
            insert("tags", tag_cols, [{"key": k, "value": v, "run_uuid": run_id} for k, v in tags.items()])
            params = {r["key"]: r["value"] for r in param_rows}
            params.update(variant=variant, dataset=dataset, seed=str(seed))
            insert("params", param_cols, [{"key": k, "value": v, "run_uuid": run_id} for k, v in params.items()])
            metrics = _metrics(i, variant)
            insert(
                "metrics",
                metric_cols,
                [
                    {**metric_row, "key": k, "value": v, "step": step, "run_uuid": run_id, "timestamp": now}
                    for k, v, step in metrics
                ],
            )
            latest = {k: (v, step) for k, v, step in metrics}  # the highest step comes last
            insert(
                "latest_metrics",
                latest_cols,
                [
                    {**latest_row, "key": k, "value": v, "step": step, "run_uuid": run_id, "timestamp": now}
                    for k, (v, step) in latest.items()
                ],
            )
    con.close()
    log(f"  {len(cells)} runs in MLflow")

    storage = connect.open_storage()
    study = optuna.create_study(study_name=study_name, storage=storage)
    study.set_user_attr(SPEC_ATTR, spec)
    study.add_trials(
        [
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE,
                value=0.5,
                params={},
                distributions={},
                user_attrs={
                    KEY_ATTR: f"{v}/{d}/s{s}",
                    "variant": v,
                    "dataset": d,
                    "seed": s,
                    "mlflow_run_id": run_id,
                    "sweeper.epochs": EPOCHS,
                },
            )
            for (v, d, s), run_id in zip(cells, run_ids)
        ]
    )
    log(f"  {len(cells)} trials in Optuna")


def naive_frame(study_name: str):
    """The obvious way: one get_run per cell."""
    import pandas as pd

    from sweeper import report, tracking
    from sweeper.storage import connect

    study = connect.load_study(connect.open_storage(), study_name)
    client = tracking.client()
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        m = client.get_run(ua["mlflow_run_id"]).data.metrics
        rows.append(
            {
                "variant": ua["variant"],
                "dataset": ua["dataset"],
                "seed": ua["seed"],
                "state": t.state.name,
                "top1_error": m.get("top1_error"),
                "top5_error": m.get("top5_error"),
                "params": m.get("num_params"),
                "macs": m.get("macs"),
                "train_seconds": m.get("train_seconds"),
                "images_per_s": m.get("images_per_s"),
                "mlflow_run_id": ua["mlflow_run_id"],
            }
        )
    return pd.DataFrame(rows, columns=report.FRAME_COLUMNS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="synthetic cell runs to log (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="time each reader this many times, keep the best")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="sweeper-bench-") as home:
        os.environ["SWEEPER_HOME"] = home
        for var in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI"):
            os.environ.pop(var, None)
        from sweeper import report

        study_name = "report-scale"
        log(f"logging {args.runs} synthetic runs into {home} ...")
        t0 = time.perf_counter()
        gc.disable()  # only while writing the synthetic store; the timed readers run as usual
        populate(args.runs, study_name, log)
        gc.enable()
        populate_s = time.perf_counter() - t0

        report.build_frame(study_name)  # warm: imports, store initialisation, SQLite page cache
        fast, slow = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            frame = report.build_frame(study_name)
            fast.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            baseline = naive_frame(study_name)
            slow.append(time.perf_counter() - t0)
        assert len(frame) == len(baseline) == args.runs, (len(frame), len(baseline))
        assert frame["state"].eq("COMPLETE").all()
        by_id = baseline.set_index("mlflow_run_id")["top1_error"]
        assert (frame.set_index("mlflow_run_id")["top1_error"] == by_id.loc[frame["mlflow_run_id"]]).all()

    result = {
        "runs": args.runs,
        "epochs_per_run": EPOCHS,
        "repeat": args.repeat,
        "populate_s": round(populate_s, 2),
        "build_frame_s": round(min(fast), 3),
        "naive_get_run_s": round(min(slow), 3),
        "speedup": round(min(slow) / min(fast), 1),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.runs} runs ({EPOCHS} epochs of metrics each), best of {args.repeat}:")
        print(f"  build_frame (paged search_runs): {result['build_frame_s']:.3f} s")
        print(f"  naive get_run per run:           {result['naive_get_run_s']:.3f} s")
        print(f"  ratio:                           {result['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
