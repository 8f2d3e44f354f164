"""Running a study like a service, with real worker processes and real stores: stop, pause,
resume and cancel (stored in the study, so every worker sees them), the failure policy in the
spec, the parent MLflow run following the study, and notifications to a local HTTP server."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time

import pytest
from fault_helpers import FAST, cli, enqueue, trials_of
from helpers import free_port, write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


class Hook:
    """A local HTTP server that records every JSON document POSTed to it."""

    def __init__(self):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/s3cr3t-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.received if e["event"] == kind]


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.server.shutdown()


def mlflow_of(env: dict[str, str]) -> MlflowClient:
    return MlflowClient(f"sqlite:///{env['SWEEPER_HOME']}/mlflow.db")


def parent_status(client: MlflowClient, study: str) -> str:
    experiment = client.get_experiment_by_name(study)
    (run,) = client.search_runs([experiment.experiment_id], "tags.`sweeper.role` = 'study'")
    return run.info.status


def test_stop_lets_the_running_trial_finish_and_claims_nothing_more(tmp_path, sweeper_env, spawn):
    env = sweeper_env
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    cli("launch", "--study", str(write_spec(tmp_path / "halt.toml", seeds=(1, 2), epochs=3)), env=env)
    worker = spawn("worker", "--study", "halt", *FAST, env=env)
    worker.wait_for(r"epoch 1/3", timeout=600)
    stopped = json.loads(cli("stop", "--study", "halt", "--format", "json", env=env).stdout)
    assert stopped["previous"] == "running" and stopped["state"] == "stopped"
    assert worker.wait(600) == 0, worker.text()
    assert "1 run by this worker" in worker.text()
    assert [t.state for t in trials_of(url, "halt")] == [TrialState.COMPLETE, TrialState.WAITING]

    status = json.loads(cli("status", "--study", "halt", "--format", "json", env=env).stdout)
    assert status["state"] == "stopped" and status["outcome"] == "running"
    assert "stopped" in cli("status", "--study", "halt", env=env).stdout
    # A worker started now claims nothing either, and exits 0 at once.
    late = spawn("worker", "--study", "halt", *FAST, env=env)
    assert late.wait(300) == 0 and "0 run by this worker" in late.text()
    assert parent_status(mlflow_of(sweeper_env), "halt") == "RUNNING", "a cell still waits"


def test_pause_resume_and_cancel_across_two_workers(tmp_path, sweeper_env, spawn, pg_database, hook):
    storage = pg_database()
    env = {**sweeper_env, "SWEEPER_STORAGE": storage}
    client = mlflow_of(sweeper_env)
    spec = write_spec(tmp_path / "steer.toml", seeds=(1, 2, 3), epochs=4, limit_train=512)
    enqueue(spec, storage)
    workers = [
        spawn("worker", "--study", "steer", *FAST, "--forever", "--poll-interval", "0.5", "--notify", hook.url, env=env)
        for _ in range(2)
    ]
    for w in workers:
        w.wait_for(r"epoch 1/4", timeout=600)

    # Cancel: both running trials checkpoint and are handed back after their epoch, retries untouched.
    cli("cancel", "--study", "steer", env=env)
    for w in workers:
        w.wait_for(r"handed back after epoch \d: study cancelled", timeout=600)
    trials = trials_of(storage, "steer")
    handed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(handed) == 2 and all("study cancelled" in t.system_attrs["sweeper.fail_reason"] for t in handed)
    assert [t.state for t in trials].count(TrialState.WAITING) == 3, "two handed back, one never claimed"
    assert all(not t.system_attrs.get("retry_history") for t in trials), "a cancel is not a retry"
    for t in handed:
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    status = json.loads(cli("status", "--study", "steer", "--format", "json", env=env).stdout)
    assert status["state"] == "cancelled" and status["counts"]["RUNNING"] == 0

    # Resume: the workers (still polling) claim again. Pause: their trials finish, nothing more is claimed.
    marks = [len(w.text()) for w in workers]
    cli("resume", "--study", "steer", env=env)
    for w, mark in zip(workers, marks):
        w.wait_for(r"claimed", after=mark, timeout=600)
    cli("pause", "--study", "steer", env=env)
    for w, mark in zip(workers, marks):
        w.wait_for(r"complete, top1_error", after=mark, timeout=600)
    trials = trials_of(storage, "steer")
    assert [t.state for t in trials].count(TrialState.WAITING) == 1, "paused: the last cell is not claimed"
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert parent_status(client, "steer") == "RUNNING"

    # Resume again: the last cell runs; the study completes, its parent run FINISHED, one notification.
    cli("resume", "--study", "steer", env=env)
    deadline = time.monotonic() + 600
    while not hook.events("study_complete") and time.monotonic() < deadline:
        time.sleep(0.5)
    (done,) = hook.events("study_complete")
    assert done["study"] == "steer" and done["outcome"] == "finished"
    assert done["counts"]["COMPLETE"] == 3 and not hook.events("cell_failed")
    latest = {t.user_attrs["sweeper.key"]: t for t in trials_of(storage, "steer")}
    assert len(latest) == 3 and all(t.state == TrialState.COMPLETE for t in latest.values())
    for t in handed:  # the handed-back cells continued from their checkpoints, in the same run
        final = latest[t.user_attrs["sweeper.key"]]
        run = client.get_run(final.user_attrs["mlflow_run_id"])
        assert final.user_attrs["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
        assert int(run.data.tags["sweeper.resumed_from_epoch"]) >= 1
    assert parent_status(client, "steer") == "FINISHED"
    # Issue #21, item 9: a finished run no longer says it was cancelled, nor does `status`.
    for t in handed:
        assert "sweeper.reason" not in client.get_run(t.user_attrs["mlflow_run_id"]).data.tags
    text = cli("status", "--study", "steer", env=env).stdout
    assert "failed: study cancelled" not in text, text

    # New cells enqueued: the parent run is RUNNING again.
    cli(
        "launch",
        "--study",
        str(write_spec(spec, seeds=(1, 2, 3, 4), epochs=4, limit_train=512)),
        "--force-update",
        env=env,
    )
    assert parent_status(client, "steer") == "RUNNING"


def test_a_study_whose_cells_always_fail_pauses_itself(tmp_path, sweeper_env, spawn, hook):
    env = sweeper_env
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    policy = "[policy]\nmax_failed_cells = 2\n"
    enqueue(write_spec(tmp_path / "doomed.toml", seeds=(1, 2, 3), epochs=2, extra="lr = 1e30\n" + policy))
    worker = spawn("worker", "--study", "doomed", *FAST, env={**env, "SWEEPER_NOTIFY_URL": hook.url})
    assert worker.wait(600) == 0, worker.text()
    assert "study doomed paused itself: 2 cell(s) failed for good (policy max_failed_cells = 2)" in worker.text()
    assert "s3cr3t" not in worker.text(), "a webhook's path is its secret"
    assert [t.state for t in trials_of(url, "doomed")] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]

    status = json.loads(cli("status", "--study", "doomed", "--format", "json", env=env).stdout)
    assert status["state"] == "paused" and "max_failed_cells = 2" in status["state_reason"]
    (group,) = status["failures"]
    assert group["cause"] == "non-finite loss" and group["cells_failed_for_good"] == 2
    assert "lower [train] lr" in group["fix"]
    text = cli("status", "--study", "doomed", env=env).stdout
    assert "paused" in text and "non-finite loss: 2 trial(s), 2 cell(s) for good; fix: lower [train] lr" in text

    failed = hook.events("cell_failed")
    assert sorted(e["cell"] for e in failed) == ["short4/digits/s1", "short4/digits/s2"]
    for e in failed:
        assert e["study"] == "doomed" and e["reason"].startswith("training loss became nan")
        assert e["mlflow_url"] == f"runs:/{e['mlflow_run_id']}"
    assert failed[-1]["paused"].startswith("2 cell(s) failed for good")
    assert not hook.events("study_complete")


def test_after_retry_cells_that_fail_again_are_announced_and_pause_the_study_again(tmp_path, sweeper_env, spawn, hook):
    """Issue #21, item 2: `retry` left the record of failed cells as it was: after `retry`,
    `resume` and a worker, only 1 of the 2 re-failures was posted, no study_complete, the study's
    MLflow run stayed FAILED right after `retry`, and a re-queued cell kept its retry history."""
    env = {**sweeper_env, "SWEEPER_NOTIFY_URL": hook.url}
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    policy = "[policy]\nmax_failed_cells = 2\n"
    enqueue(write_spec(tmp_path / "again.toml", seeds=(1, 2), epochs=1, extra="lr = 1e30\n" + policy))
    cells = ["short4/digits/s1", "short4/digits/s2"]
    first = spawn("worker", "--study", "again", *FAST, env=env)
    assert first.wait(600) == 0, first.text()
    assert sorted(e["cell"] for e in hook.events("cell_failed")) == cells
    assert len(hook.events("study_complete")) == 1
    client = mlflow_of(sweeper_env)
    assert parent_status(client, "again") == "FAILED"

    retried = json.loads(cli("retry", "--study", "again", "--format", "json", env=sweeper_env).stdout)
    assert retried["retried"] == 2
    assert parent_status(client, "again") == "RUNNING", "cells were added: the study runs again"
    waiting = [t for t in trials_of(url, "again") if t.state == TrialState.WAITING]
    assert [t.system_attrs["retry_history"] for t in waiting] == [[], []], "a fresh retry budget"

    cli("resume", "--study", "again", env=sweeper_env)
    second = spawn("worker", "--study", "again", *FAST, env=env)
    assert second.wait(600) == 0, second.text()
    assert sorted(e["cell"] for e in hook.events("cell_failed")[2:]) == cells, "both re-failures posted"
    assert len(hook.events("study_complete")) == 2
    assert "study again paused itself: 2 cell(s) failed for good" in second.text()
    status = json.loads(cli("status", "--study", "again", "--format", "json", env=sweeper_env).stdout)
    # One state word: failed (cells failed for good) wins over the lifecycle it paused itself into.
    assert (status["state"], status["lifecycle"], status["outcome"]) == ("failed", "paused", "failed")
    assert parent_status(client, "again") == "FAILED"


def test_trial_timeout_checkpoints_hands_back_and_max_retries_bounds_it(tmp_path, sweeper_env, spawn):
    """With the default checkpoint_every (60 s) a timed-out attempt wrote no checkpoint: each
    retry started at epoch 1 and a cell longer than the timeout could never finish (issue #21,
    item 1); the last attempt said "re-queued". Each attempt now keeps its epoch."""
    env = sweeper_env
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    policy = "[policy]\nmax_retries = 1\ntrial_timeout = 0.5\n"
    enqueue(write_spec(tmp_path / "slow.toml", epochs=3, checkpoint_every=60, extra=policy))
    worker = spawn("worker", "--study", "slow", *FAST, env=env)
    assert worker.wait(600) == 0, worker.text()
    trials = trials_of(url, "slow")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL], "one retry, then failed for good"
    for t in trials:
        assert "trial_timeout (0.5s)" in t.system_attrs["sweeper.fail_reason"]
    # Attempt 1 trained epoch 1 and checkpointed it; attempt 2 resumed there and trained epoch 2.
    assert [max(t.intermediate_values) for t in trials] == [1, 2]
    assert "short4/digits/s1 resumes after epoch 1" in worker.text()
    assert "stopped after epoch 2 and failed for good (max_retries = 1 reached)" in worker.text()
    run = mlflow_of(sweeper_env).get_run(trials[-1].user_attrs["mlflow_run_id"])
    assert run.data.tags["sweeper.resumed_from_epoch"] == "1"
    assert "failed for good" in run.data.tags["sweeper.reason"] and "re-queued" not in run.data.tags["sweeper.reason"]
    status = json.loads(cli("status", "--study", "slow", "--format", "json", env=env).stdout)
    (group,) = status["failures"]
    assert group["cause"] == "trial timeout" and group["trials"] == 2 and group["cells_failed_for_good"] == 1
    assert status["outcome"] == "failed"
    assert parent_status(mlflow_of(sweeper_env), "slow") == "FAILED"


def test_a_failed_notification_is_logged_without_its_secret(caplog):
    from sweeper import notify

    url = f"http://127.0.0.1:{free_port()}/hooks/s3cr3t-token"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="sweeper.notify"):
        assert notify.send(url, {"event": "study_complete", "study": "x"}) is False
    assert "notification to http://127.0.0.1" in caplog.text and "s3cr3t" not in caplog.text
