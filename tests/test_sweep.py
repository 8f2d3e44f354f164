"""Sweeps end to end with real worker processes: SQLite embedded stores and real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from helpers import sweeper, write_spec
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's

METRICS = ("train_loss", "test_loss", "top1_error", "top5_error", "lr", "epoch_seconds", "images_per_s")


def cell_runs(client: MlflowClient, study: str):
    experiment = client.get_experiment_by_name(study)
    assert experiment is not None, f"no MLflow experiment named {study}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "study"]
    cells = [r for r in runs if r.data.tags.get("sweeper.role") == "cell"]
    assert len(parents) == 1, "one parent run per study"
    return parents[0], cells


def assert_one_finished_run_per_cell(client, study: str, keys: set[str], epochs: int, storage_url: str):
    parent, runs = cell_runs(client, study)
    assert sorted(r.info.run_name for r in runs) == sorted(keys), "exactly one run per cell, named by cell"
    trials = {t.user_attrs["sweeper.key"]: t for t in optuna.load_study(study_name=study, storage=storage_url).trials}
    assert set(trials) == keys and all(t.state.name == "COMPLETE" for t in trials.values())
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.study"] == study
        trial = trials[run.info.run_name]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id, "either side finds the other"
        variant, dataset, seed = run.info.run_name.split("/")
        assert run.data.params["variant"] == variant and run.data.params["dataset"] == dataset
        assert run.data.params["seed"] == seed.removeprefix("s") and run.data.params["epochs"] == str(epochs)
        assert run.data.params["optimizer"] == "adadelta" and run.data.params["lr"] == "1.0"
        for name in METRICS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert sorted(steps) == list(range(1, epochs + 1)), f"{name}: each epoch logged once, step = epoch"
        assert run.data.metrics["num_params"] > 1e6 and run.data.metrics["macs"] > 0
        assert run.data.metrics["train_seconds"] > 0
        # the time outside training, by part, is in the run too (the rest is logging the model)
        wall = (run.info.end_time - run.info.start_time) / 1000
        outside = [run.data.metrics["prepare_seconds"], run.data.metrics["setup_seconds"]]
        assert all(part > 0 for part in outside) and sum(outside) + run.data.metrics["train_seconds"] < wall
        assert trial.value == pytest.approx(run.data.metrics["top1_error"])
        models = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )  # named after the cell: mlflow.pytorch.load_model(f"runs:/{RUN_ID}/{name}") loads it
        assert [(m.name, m.status.name) for m in models] == [(f"{variant}-{dataset}-{seed}", "READY")]
        linked = {m.key for m in models[0].metrics if m.step == epochs}  # linked without MLflow's history reads
        assert set(METRICS) <= linked, f"the last epoch's metrics belong to the model: {linked}"


def test_launch_with_four_local_workers_on_sqlite(sweeper_env, tmp_path):
    spec = write_spec(tmp_path / "four.toml", variants=("short4", "short3"), seeds=(1, 2))
    proc = sweeper("launch", "--study", str(spec), "--workers", "4", env=sweeper_env)
    home = tmp_path / "home"
    assert f"embedded stores in {home}" in proc.stderr
    assert "enqueued 4 trial(s)" in proc.stderr
    logs = "".join(p.read_text() for p in (home / "logs").glob("worker-*.log"))
    assert "database is locked" not in logs and "Traceback" not in logs
    keys = {f"{v}/digits/s{s}" for v in ("short4", "short3") for s in (1, 2)}
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert_one_finished_run_per_cell(client, "four", keys, epochs=2, storage_url=f"sqlite:///{home / 'optuna.db'}")

    again = sweeper("launch", "--study", str(spec), env=sweeper_env)
    assert "nothing to add" in again.stderr
    assert len(optuna.load_study(study_name="four", storage=f"sqlite:///{home / 'optuna.db'}").trials) == 4


def test_changed_spec_is_refused_until_force_update(sweeper_env, tmp_path):
    spec = write_spec(tmp_path / "grow.toml", variants=("short4",))
    first = json.loads(sweeper("launch", "--study", str(spec), "--format", "json", env=sweeper_env).stdout)
    write_spec(spec, variants=("short4", "short3"))
    refused = sweeper("launch", "--study", str(spec), env=sweeper_env, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "different spec" in refused.stderr and "--force-update" in refused.stderr
    updated = sweeper("launch", "--study", str(spec), "--force-update", "--format", "json", env=sweeper_env)
    summary = json.loads(updated.stdout)
    assert summary["spec_hash"] != first["spec_hash"], "the study now records the changed spec"
    assert summary["enqueued"] == 1 and summary["already_enqueued"] == 1


def test_workers_racing_for_the_last_cell_invent_no_trial(sweeper_env, tmp_path):
    spec = write_spec(tmp_path / "race.toml", variants=("short4",), limit_train=64, limit_test=32, epochs=1)
    sweeper("launch", "--study", str(spec), env=sweeper_env)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeper", "worker", "--study", "race"],
            env=sweeper_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = optuna.load_study(study_name="race", storage=f"sqlite:///{tmp_path / 'home' / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE"], "one cell, one trial: no junk trials from an empty queue"
    assert sum("claimed" in out for out in outputs) == 1


def test_three_workers_on_postgres(sweeper_env, tmp_path, pg_database):
    storage = pg_database()
    env = {**sweeper_env, "SWEEPER_STORAGE": storage}
    spec = write_spec(tmp_path / "pg.toml", variants=("short4", "short3", "short2"), limit_train=128, limit_test=64)
    sweeper("launch", "--study", str(spec), env=env)
    # One trial each: which worker takes which cell is the queue's business, but a worker that
    # starts seconds late on a loaded machine finds every cell taken (the other two finished
    # theirs and claimed the third), and the test is about three workers sharing one queue.
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeper", "worker", "--max-trials", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    assert all("claimed" in out for out in outputs), "each of the three workers took a cell"
    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    keys = {f"{v}/digits/s1" for v in ("short4", "short3", "short2")}
    assert_one_finished_run_per_cell(client, "pg", keys, epochs=2, storage_url=storage)

    with_password = storage.replace("postgres@", "postgres:hunter2@")  # trust auth ignores the password
    status = sweeper("status", "--study", "pg", "--storage", with_password, "--format", "json", env=env)
    document = json.loads(status.stdout)
    assert "hunter2" not in status.stdout + status.stderr and "postgres:***@" in document["storage"]
    assert document["counts"] == {"WAITING": 0, "RUNNING": 0, "COMPLETE": 3, "PRUNED": 0, "FAIL": 0}
    assert {t["cell"] for t in document["trials"]} == keys
    assert all(t["epoch"] == 2 and t["epochs"] == 2 and t["host"] for t in document["trials"])


def test_ctrl_c_stops_local_workers_and_says_how_to_resume(sweeper_env, tmp_path):
    import re
    import signal
    import time

    spec = write_spec(tmp_path / "stop.toml", variants=("short4",), epochs=30, limit_train=256, limit_test=64)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "sweeper", "launch", "--study", str(spec), "--workers", "1"],
        env=sweeper_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "home" / "logs" / "worker-1.log"
    deadline = time.monotonic() + 240
    while not (log.exists() and re.search(r"epoch 1/30", log.read_text())):
        assert time.monotonic() < deadline and launcher.poll() is None, "the worker never finished an epoch"
        time.sleep(0.5)
    launcher.send_signal(signal.SIGINT)  # a flag the watch loop checks: never lost, however busy the machine
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 130
    assert "sweeper launch --study stop --workers 1" in err, err
    assert "Traceback" not in err
    trials = optuna.load_study(study_name="stop", storage=f"sqlite:///{tmp_path / 'home' / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"], "the stopped trial is re-queued at once"
    assert trials[1].system_attrs["retry_history"] == [0]


def test_longest_cells_are_claimed_first(sweeper_env, tmp_path):
    spec = write_spec(tmp_path / "order.toml", variants=("short4", "standard", "naive", "short3"), seeds=(1, 2))
    sweeper("launch", "--study", str(spec), env=sweeper_env)
    study = optuna.load_study(study_name="order", storage=f"sqlite:///{tmp_path / 'home' / 'optuna.db'}")
    keys = [t.user_attrs["sweeper.key"] for t in sorted(study.trials, key=lambda t: t.number)]
    # MACs per image x images x epochs: naive > standard > short4 > short3; seeds keep their order.
    assert keys == [f"{v}/digits/s{s}" for v in ("naive", "standard", "short4", "short3") for s in (1, 2)]


def test_checkpoint_cadence_in_seconds(sweeper_env, tmp_path):
    """checkpoint_every in seconds: a trial shorter than that writes none (it ends with its
    model); a tiny one checkpoints after every epoch but the last. Every epoch is logged once."""
    import torch

    home = tmp_path / "home"
    sweeper(
        "launch", "--study", str(write_spec(tmp_path / "rare.toml", epochs=3, checkpoint_every=3600)), env=sweeper_env
    )
    sweeper(
        "launch", "--study", str(write_spec(tmp_path / "often.toml", epochs=3, checkpoint_every=1e-3)), env=sweeper_env
    )
    sweeper("worker", "--device", "cpu", "--precision", "fp32", "--no-system-metrics", env=sweeper_env)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    checkpoints = {}
    for study in ("rare", "often"):
        _, (run,) = cell_runs(client, study)
        assert run.info.status == "FINISHED"
        for name in METRICS:
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [1, 2, 3]
        listed = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        checkpoints[study] = listed
        # what checkpoints cost the run, on the training thread and in the background
        cost = run.data.metrics["checkpoint_blocking_seconds"], run.data.metrics["checkpoint_background_seconds"]
        assert (cost == (0, 0)) == (not listed) and min(cost) >= 0
        if listed:
            path = client.download_artifacts(run.info.run_id, "checkpoint/last.pt", str(tmp_path / study))
            assert torch.load(path, weights_only=True)["epoch"] == 2  # the last epoch needs none
    assert checkpoints == {"rare": [], "often": ["checkpoint/last.pt"]}


def test_the_next_trial_is_claimed_while_the_model_is_logged_and_complete_means_logged(sweeper_env, tmp_path):
    """A real worker hands a trained trial's model to its helper process and claims the next
    trial at once; the trial stays RUNNING (heartbeat beating) until its model is READY, and only
    then becomes COMPLETE. Watched from outside, every 50 ms, in both stores."""
    import re
    import time

    home = tmp_path / "home"
    spec = write_spec(tmp_path / "overlap.toml", variants=("short4", "short3"), epochs=1, limit_train=64, limit_test=32)
    sweeper("launch", "--study", str(spec), env=sweeper_env)
    worker = subprocess.Popen(
        [sys.executable, "-m", "sweeper", "worker", "--study", "overlap", "--no-system-metrics"],
        env={**sweeper_env, "SWEEPER_HEARTBEAT_INTERVAL": "1", "SWEEPER_GRACE_PERIOD": "5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    from sweeper import tracking

    storage = f"sqlite:///{home / 'optuna.db'}"
    client = None
    seen_complete: set[int] = set()
    deadline = time.monotonic() + 600
    while worker.poll() is None:
        assert time.monotonic() < deadline, "the worker did not finish"
        if (home / "mlflow.db").exists():
            client = client or tracking.client(f"sqlite:///{home / 'mlflow.db'}")  # waits for its schema
            for t in optuna.load_study(study_name="overlap", storage=storage).get_trials(deepcopy=False):
                if t.state.name == "COMPLETE" and t.number not in seen_complete:
                    seen_complete.add(t.number)
                    run = client.get_run(t.user_attrs["mlflow_run_id"])
                    models = client.search_logged_models(
                        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
                    )
                    assert [m.status.name for m in models] == ["READY"], f"trial {t.number} COMPLETE without its model"
        time.sleep(0.05)
    out = worker.stdout.read()
    assert worker.returncode == 0, out[-3000:]
    lines = out.splitlines()

    def at(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    assert at(r"trial 1: .* claimed") < at(r"trial 0: .* model logged") < at(r"trial 0: .* complete"), out[-3000:]
    trials = optuna.load_study(study_name="overlap", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], "no trial failed as stale meanwhile"
    assert "Traceback" not in out
