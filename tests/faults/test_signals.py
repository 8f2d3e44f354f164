"""Workers killed with real signals in the middle of a trial.

SIGKILL: nothing runs in the worker; its heartbeat goes stale, another worker retries the trial
from the checkpoint in the same MLflow run. SIGTERM: the worker stops at the next batch,
marks the run KILLED and re-queues the trial at once; a second SIGTERM exits immediately.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from fault_helpers import EPOCHS, FAST, assert_cell_run, cli, enqueue, trials_of
from helpers import write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


def test_sigkill_mid_trial_is_retried_from_the_checkpoint(tmp_path, sweeper_env, spawn, reference):
    """Embedded stores (SQLite Optuna + SQLite MLflow in $SWEEPER_HOME), the default setup."""
    enqueue(write_spec(tmp_path / "killed.toml", epochs=EPOCHS))
    home = sweeper_env["SWEEPER_HOME"]
    url, uri = f"sqlite:///{home}/optuna.db", f"sqlite:///{home}/mlflow.db"

    first = spawn("worker", "--study", "killed", *FAST, "--grace-period", "3", env=sweeper_env)
    first.wait_for(r"checkpoint of epoch 1 sent")  # written in the background after "epoch 1/3"
    first.send(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    killed_at = time.monotonic()

    # A waiting worker: it finds the trial RUNNING until the heartbeat is 3 s stale, then retries it.
    second = spawn(
        "worker",
        "--study",
        "killed",
        *FAST,
        "--grace-period",
        "3",
        "--forever",
        "--poll-interval",
        "0.5",
        "--max-trials",
        "1",
        env=sweeper_env,
    )
    second.wait_for(r"resumes after epoch [12] ")
    assert second.wait(180) == 0, second.text()
    assert time.monotonic() - killed_at >= 3  # not before the grace period

    trials = trials_of(url, "killed")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    failed, retry = trials
    assert "no heartbeat for over 3s" in failed.system_attrs["sweeper.fail_reason"]
    assert retry.system_attrs["failed_trial"] == failed.number and retry.system_attrs["retry_history"] == [0]
    assert "sweeper.fail_reason" not in retry.system_attrs
    assert retry.user_attrs["mlflow_run_id"] == failed.user_attrs["mlflow_run_id"]
    assert retry.value == reference()[-1]["top1_error"]

    client = MlflowClient(uri)
    resumed_from = int(client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags["sweeper.resumed_from_epoch"])
    assert resumed_from in (1, 2)
    assert_cell_run(client, retry.user_attrs["mlflow_run_id"], reference(), resumed_from=resumed_from)
    cells = client.search_runs(
        [client.get_experiment_by_name("killed").experiment_id], filter_string="tags.`sweeper.role` = 'cell'"
    )
    assert len(cells) == 1

    # `sweeper status` shows the retry and its history.
    status = json.loads(cli("status", "--study", "killed", "--format", "json").stdout)
    assert status["counts"]["COMPLETE"] == 1 and status["counts"]["FAIL"] == 1
    rows = {r["number"]: r for r in status["trials"]}
    assert rows[1]["retry_of"] == 0 and rows[1]["retry_history"] == [0] and rows[1]["fail_reason"] is None
    assert "no heartbeat" in rows[0]["fail_reason"]
    table = cli("status", "--study", "killed").stdout
    assert "#0" in table and "no heartbeat" in table


def test_sigterm_requeues_at_once_and_a_second_signal_exits_now(tmp_path, sweeper_env, spawn, tracking, reference):
    """Tracking on a real MLflow server; a long grace period proves the SIGTERM retry does not wait for it."""
    env = {**sweeper_env, "MLFLOW_TRACKING_URI": tracking.url}
    enqueue(write_spec(tmp_path / "stopped.toml", epochs=EPOCHS))
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"

    first = spawn("worker", "--study", "stopped", *FAST, "--grace-period", "600", env=env)
    first.wait_for(r"epoch 1/3")
    first.send(signal.SIGTERM)
    first.wait_for(r"SIGTERM received: stopping after this batch")
    assert first.wait(60) == 0, first.text()
    assert "stopped after epoch 1 and re-queued" in first.text()
    trials = trials_of(url, "stopped")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # no grace period to wait
    assert trials[0].system_attrs["sweeper.fail_reason"] == "worker stopped by a signal after epoch 1"
    client = MlflowClient(tracking.url)
    run = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["sweeper.reason"].startswith("worker stopped by a signal after epoch 1")

    # The retry resumes at once; two SIGTERMs in a row end its worker immediately.
    second = spawn("worker", "--study", "stopped", *FAST, "--grace-period", "600", env=env)
    second.wait_for(r"resumes after epoch 1 ")
    second.send(signal.SIGTERM)
    second.wait_for(r"SIGTERM received")
    sent = time.monotonic()
    second.send(signal.SIGTERM)
    assert second.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - sent < 5
    assert "second SIGTERM: exiting now" in second.text()

    # That trial is RUNNING with a dead worker: the next worker retries it once its heartbeat is stale.
    third = spawn(
        "worker",
        "--study",
        "stopped",
        *FAST,
        "--grace-period",
        "3",
        "--forever",
        "--poll-interval",
        "0.5",
        "--max-trials",
        "1",
        env=env,
    )
    assert third.wait(180) == 0, third.text()
    trials = trials_of(url, "stopped")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].system_attrs["retry_history"] == [0, 1]
    assert trials[2].value == reference()[-1]["top1_error"]
    assert_cell_run(client, trials[2].user_attrs["mlflow_run_id"], reference(), resumed_from=1)


def test_a_frozen_worker_that_wakes_up_after_its_trial_was_retried_stands_down(
    tmp_path, sweeper_env, spawn, tracking, reference, pg_database
):
    """SIGSTOP past the grace period (a paused VM, a long stall): another worker retries the trial;
    on SIGCONT the first one notices at its next epoch and stands down, touching neither store.
    On PostgreSQL, the several-machines setup (on SQLite a process frozen while it holds the
    database lock blocks every other process until it resumes)."""
    url = pg_database()
    env = {**sweeper_env, "MLFLOW_TRACKING_URI": tracking.url, "SWEEPER_STORAGE": url}
    enqueue(write_spec(tmp_path / "frozen.toml", epochs=EPOCHS), url)

    frozen = spawn("worker", "--study", "frozen", *FAST, "--grace-period", "3", env=env)
    # Frozen once epoch 1's checkpoint is in MLflow, so the retry resumes from it; a freeze in the
    # middle of the upload is covered by EpochReporter._still_owned (the woken thread writes nothing).
    frozen.wait_for(r"checkpoint of epoch 1 sent")
    frozen.send(signal.SIGSTOP)
    try:
        other = spawn(
            "worker",
            "--study",
            "frozen",
            *FAST,
            "--grace-period",
            "3",
            "--forever",
            "--poll-interval",
            "0.5",
            "--max-trials",
            "1",
            env=env,
        )
        assert other.wait(180) == 0, other.text()
    finally:
        frozen.send(signal.SIGCONT)
    frozen.wait_for(r"this worker stands down")
    assert frozen.wait(120) == 0, frozen.text()
    assert "complete" not in frozen.text()

    failed, done = trials_of(url, "frozen")
    assert (failed.state, done.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert done.value == reference()[-1]["top1_error"]
    assert_cell_run(MlflowClient(tracking.url), done.user_attrs["mlflow_run_id"], reference(), resumed_from=1)
