"""PostgreSQL faults and races, on the real server: a database blip during a live trial,
workers racing to retry a dead worker's trial, and two `sweeper launch` at the same moment."""

from __future__ import annotations

import re
import threading
import time

import optuna
import pytest
import sqlalchemy
from fault_helpers import EPOCHS, FAST, assert_cell_run, enqueue, run_together, storage_of, trials_of
from helpers import write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper.storage import dberrors, stale
from sweeper.trials import claims

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


def test_database_blip_shorter_than_the_grace_period_does_not_fail_a_live_trial(
    tmp_path, sweeper_env, spawn, tracking, reference, pg_database, pg_outage
):
    url = pg_database()
    env = {**sweeper_env, "SWEEPER_STORAGE": url, "MLFLOW_TRACKING_URI": tracking.url}
    enqueue(write_spec(tmp_path / "blip.toml", epochs=EPOCHS), url)
    worker = spawn("worker", "--study", "blip", *FAST, "--grace-period", "20", env=env)

    # A second worker's view, all along: would it find the trial stale and take it over?
    taken_over: list[int] = []
    done = threading.Event()

    def watchdog():
        study = optuna.load_study(study_name="blip", storage=storage_of(url, grace_period=20))
        while not done.wait(0.5):
            try:
                taken_over.extend(claims.fail_stale_trials(study))
            except Exception as e:  # the watchdog lives through the outage too
                if not dberrors.is_db_error(e):
                    raise

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        worker.wait_for(r"epoch 1/3")
        outage = pg_outage(url)
        assert outage.terminate() >= 1  # the worker's pooled connections die under it
        # Then no connection at all, until the worker's main thread has hit it (at its next
        # epoch) - at most 10 s, half the grace period.
        outage.block()
        blocked = time.monotonic()
        offset = len(worker.text())
        worker.wait_for(r"failed \(.*\); retrying for up to 20s", timeout=10, after=offset)
        worker.wait_for(r"heartbeat for trial 0 failed", timeout=10, after=offset)
        outage.unblock()
        assert time.monotonic() - blocked < 15
        assert worker.wait(180) == 0, worker.text()
    finally:
        done.set()
        thread.join()
    assert taken_over == []
    (trial,) = trials_of(url, "blip")
    assert trial.state == TrialState.COMPLETE and trial.value == reference()[-1]["top1_error"]
    assert_cell_run(MlflowClient(tracking.url), trial.user_attrs["mlflow_run_id"], reference())


def test_a_dead_workers_trial_is_retried_once_by_racing_workers_and_at_most_max_retry_times(tmp_path, pg_database):
    url = pg_database()
    enqueue(write_spec(tmp_path / "stale.toml"), url)
    storage = storage_of(url)
    study = optuna.load_study(study_name="stale", storage=storage)
    racers = [optuna.load_study(study_name="stale", storage=storage_of(url, grace_period=5)) for _ in range(4)]

    for attempt in range(stale.MAX_RETRY + 1):
        trial_id = claims.claim(study)  # a worker claims the trial ...
        assert trial_id is not None, f"attempt {attempt}: nothing to claim"
        with storage.engine.begin() as conn:  # ... and dies: its heartbeat is an hour old
            conn.execute(
                sqlalchemy.text(
                    "UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour' WHERE trial_id = :t"
                ),
                {"t": trial_id},
            )
        barrier = threading.Barrier(len(racers))
        failed: list[list[int]] = []

        def race(s):
            barrier.wait()
            failed.append(claims.fail_stale_trials(s))

        threads = [threading.Thread(target=race, args=(s,)) for s in racers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(map(len, failed)) == [0, 0, 0, 1], failed  # exactly one racer failed it
        states = [t.state for t in study.get_trials(deepcopy=False)]
        expected_waiting = 1 if attempt < stale.MAX_RETRY else 0
        assert states.count(TrialState.WAITING) == expected_waiting, states
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 1 + stale.MAX_RETRY and all(t.state == TrialState.FAIL for t in trials)
    assert trials[-1].system_attrs["retry_history"] == list(range(stale.MAX_RETRY))
    assert all("no heartbeat for over 5s" in t.system_attrs["sweeper.fail_reason"] for t in trials)


def test_two_launches_at_the_same_moment_enqueue_each_cell_once(tmp_path, sweeper_env, tracking, pg_database):
    """Two real `sweeper launch` processes, released at the same instant, on a fresh database."""
    url = pg_database()
    env = {**sweeper_env, "SWEEPER_STORAGE": url, "MLFLOW_TRACKING_URI": tracking.url}
    spec = write_spec(tmp_path / "race.toml", variants=("short4", "short3"), seeds=(1, 2, 3))
    done = run_together(tmp_path, env, ["launch", "--study", str(spec)], ["launch", "--study", str(spec)])
    for proc in done:
        assert proc.returncode == 0, proc.stderr
    added = sorted(int(m[1]) if m else 0 for m in (re.search(r"enqueued (\d+) trial", p.stderr) for p in done))
    assert added == [0, 6], [p.stderr for p in done]

    trials = trials_of(url, "race")
    keys = [t.user_attrs["sweeper.key"] for t in trials]
    assert len(keys) == 6 and len(set(keys)) == 6, keys
    # Launching writes only the queue; the first worker creates the MLflow experiment and parent run.
    assert MlflowClient(tracking.url).get_experiment_by_name("race") is None
