"""The real `mlflow server` stopped mid-trial, then started again on the same port.

Two workers live through the same outage: one with the default --tracking-outage-limit keeps
training, buffers its metrics and checkpoint and sends them in order when MLflow is back; the
other, with a 4 s limit, fails its trial with a clear reason, claims nothing while MLflow is
down, and the retry resumes from the local checkpoint, logging what MLflow missed. The writes
themselves (a flush, a model) face a server that never answers.
"""

from __future__ import annotations

import json
import threading
import time

import numpy
import pytest
from fault_helpers import EPOCHS, FAST, assert_cell_run, cli, enqueue, trials_of
from helpers import free_port, write_spec
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper import tracking
from sweeper import tracking as tracking_module  # where a test's `tracking` is the server

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's


def mend_after(forwarder, cut: threading.Event, seconds: float, reset: bool = False) -> list[float]:
    """Mend ``forwarder`` ``seconds`` after its tripwire ``cut`` fires (on a thread of its own);
    the list returned gets the moment it fired."""
    fired: list[float] = []

    def mend() -> None:
        if cut.wait(120):
            fired.append(time.monotonic())
            time.sleep(seconds)
            forwarder.mend(reset=reset)

    threading.Thread(target=mend, daemon=True).start()
    return fired


def test_mlflow_outage_buffers_or_fails_past_the_limit_and_nothing_is_lost(
    tmp_path, sweeper_env, spawn, tracking, reference
):
    env = {**sweeper_env, "MLFLOW_TRACKING_URI": tracking.url}
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    enqueue(write_spec(tmp_path / "patient.toml", epochs=EPOCHS))
    enqueue(write_spec(tmp_path / "hasty.toml", epochs=EPOCHS))
    common = [*FAST, "--grace-period", "60"]
    patient = spawn("worker", "--study", "patient", *common, env=env, name="patient")
    hasty = spawn("worker", "--study", "hasty", *common, "--tracking-outage-limit", "4", env=env, name="hasty")
    patient.wait_for(r"epoch 1/3")
    hasty.wait_for(r"epoch 1/3")

    tracking.stop()
    patient.wait_for(r"MLflow is unreachable")
    hasty.wait_for(r"MLflow is unreachable")

    # Past the limit: the trial fails with the reason and is re-queued; the worker claims
    # nothing while MLflow is down and exits 1 after waiting the limit once more.
    assert hasty.wait(120) == 1, hasty.text()
    log = hasty.text()
    assert "was unreachable for over 4s (--tracking-outage-limit)" in log
    assert "Error: cannot reach the MLflow tracking store" in log and "without claiming a trial" in log
    failed, waiting = trials_of(url, "hasty")
    assert (failed.state, waiting.state) == (TrialState.FAIL, TrialState.WAITING)
    assert "unreachable for over 4s" in failed.system_attrs["sweeper.fail_reason"]
    for epoch, value in failed.intermediate_values.items():  # what Optuna was told stays
        assert value == reference()[epoch - 1]["top1_error"]
    assert 1 in failed.intermediate_values

    # Within the limit: training went on while MLflow was down.
    patient.wait_for(r"epoch 3/3")
    assert patient.popen.poll() is None  # waiting for MLflow with everything buffered

    tracking.start()
    patient.wait_for(r"MLflow is reachable again")
    assert patient.wait(120) == 0, patient.text()
    (done,) = trials_of(url, "patient")
    assert done.state == TrialState.COMPLETE and done.value == reference()[-1]["top1_error"]
    client = MlflowClient(tracking.url)
    assert_cell_run(client, done.user_attrs["mlflow_run_id"], reference())
    assert "sweeper.resumed_from_epoch" not in client.get_run(done.user_attrs["mlflow_run_id"]).data.tags

    # The re-queued trial on the same machine resumes from its local checkpoint (newer than the
    # one MLflow got before the outage) and backfills the epochs MLflow missed, once each.
    retry = spawn("worker", "--study", "hasty", *common, env=env, name="retry")
    retry.wait_for(r"resumes after epoch [23] \(local checkpoint\)")
    assert retry.wait(120) == 0, retry.text()
    failed, done = trials_of(url, "hasty")
    assert done.state == TrialState.COMPLETE and done.value == reference()[-1]["top1_error"]
    resumed = int(client.get_run(done.user_attrs["mlflow_run_id"]).data.tags["sweeper.resumed_from_epoch"])
    assert_cell_run(client, done.user_attrs["mlflow_run_id"], reference(), resumed_from=resumed)


def test_writes_to_a_store_that_is_not_there_retry_until_the_deadline_then_fail_clearly(tmp_path, caplog):
    """Metrics and a model sent to an MLflow server that never answers: a flush without a
    deadline keeps them queued; with one, both writes retry until it, warn once, and end in
    one clear TrackingUnreachable. A store that answers with an error is not retried."""
    import torch

    down = tracking.client(f"http://127.0.0.1:{free_port()}")
    logger = tracking.RunLogger(down, "0" * 32)
    logger.log_metrics({"top1_error": 0.5}, step=1)
    assert logger.flush() is False and logger.pending() == 1  # kept for the next flush
    with pytest.raises(tracking.TrackingUnreachable, match="^MLflow stayed unreachable"):
        logger.flush(deadline=time.monotonic() + 3)
    assert logger.pending() == 1

    model, example = torch.nn.Linear(2, 3), numpy.zeros((2, 2), dtype="float32")
    with pytest.raises(tracking.TrackingUnreachable, match="^MLflow stayed unreachable"):
        tracking.log_model(down, "0" * 32, model, example, deadline=time.monotonic() + 3)
    warnings = [r.getMessage() for r in caplog.records if r.name == "sweeper.tracking" and r.levelname == "WARNING"]
    assert [w.split(" (")[0] for w in warnings] == ["MLflow is unreachable"] * 2, warnings  # once per write

    answers = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(MlflowException) as raised:  # an unknown run: an answer, not an outage
        tracking.log_model(answers, "0" * 32, model, example, deadline=time.monotonic() + 600)
    assert not isinstance(raised.value, tracking.TrackingUnreachable)


def test_a_write_refused_by_a_server_that_is_back_when_checked_is_retried(tmp_path):
    """The server restarts between a failed write and the reachability check that follows it: the
    write's own error says the connection was refused, so it is an outage and the write is tried
    again, even though the store answers by the time it is checked (CI saw a COMPLETE-to-be cell
    failed here, the model never logged, when MLflow came back in that window)."""
    answers = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    down = tracking.client(f"http://127.0.0.1:{free_port()}")
    calls = []

    def attempt() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            down.search_experiments(max_results=1)  # connection refused, for real
        return "written"

    failed = tracking.outage_or_raise(answers, "log the model")
    assert tracking.retry_while_unreachable(attempt, time.monotonic() + 30, None, failed) == "written"
    assert len(calls) == 2


def test_a_model_output_whose_answer_was_lost_is_logged_once(tmp_path, monkeypatch):
    """A `runs/outputs` request (the run's model at its last step) that reaches the server while
    its answer is lost is sent again: by MLflow's HTTP session (urllib3 re-sends a POST after a
    read timeout) or by sweeper's retry after a transport error. The second copy hits the store's
    unique key (`inputs_pk`, BAD_REQUEST): at 200 workers on 2 cores 12 of 1,000 trials failed so,
    their models saved (benchmarks/fleet.py). The output is looked up instead: logged once."""
    import torch
    from helpers import MlflowServer
    from hosts import Forwarder

    server = MlflowServer(tmp_path).start()
    try:
        forwarder = Forwarder("127.0.0.1", ("127.0.0.1", server.port))
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        client = tracking.client(f"http://127.0.0.1:{forwarder.port}")
        experiment_id = client.create_experiment("lost-answer")
        run_id = client.create_run(experiment_id).info.run_id
        deadline = time.monotonic() + 120
        created = tracking.create_model(client, experiment_id, run_id, "cell", {}, {}, deadline=deadline)
        client.log_metric(run_id, "top1_error", 0.5, step=1, model_id=created.model_id)
        cut = forwarder.cut_when(
            rb"POST /api/2\.0/mlflow/runs/outputs", rb"\"models\"", deliver_last=True
        )  # headers, body

        fired = mend_after(forwarder, cut, 3)  # past the client's read timeout: the request is sent again
        model = torch.nn.Linear(4, 2)
        example = numpy.zeros((2, 4), dtype=numpy.float32)
        kept = dict(model_id=created.model_id, metrics_linked=True, artifact_location=created.artifact_location)
        model_id = tracking.log_model(client, run_id, model, example, step=1, deadline=deadline, **kept)
        assert fired, "the tripwire never fired: the request was not made"
        outputs = MlflowClient(server.url).get_run(run_id).outputs.model_outputs
        assert [(o.model_id, o.step) for o in outputs] == [(model_id, 1)]
        assert str(MlflowClient(server.url).get_logged_model(model_id).status) == "READY"
    finally:
        server.stop()


def test_a_claim_made_while_mlflow_is_down_is_undone_and_spends_no_attempt(
    tmp_path, sweeper_env, tracking, monkeypatch
):
    """An idle worker does not ask MLflow before each look at the queue; it asks once a trial is
    its own, after a spell without a word from MLflow. MLflow down then: the claim is undone (the
    trial WAITING again, never FAIL, no retry made), the worker waits for MLflow without claiming,
    and runs the trial once MLflow is back."""
    import optuna

    from sweeper import worker
    from sweeper.signals import StopSignal
    from sweeper.storage import connect, leases
    from sweeper.trials import outcomes
    from sweeper.worker import loop

    monkeypatch.setattr(loop, "TRACKING_CHECK_EVERY", 0.0)  # every claim follows a spell without MLflow
    released = []
    release = leases.release
    monkeypatch.setattr(leases, "release", lambda *a: released.append(a) or release(*a))
    url = f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db"
    enqueue(write_spec(tmp_path / "idle.toml", epochs=1), url)
    study = optuna.load_study(study_name="idle", storage=connect.open_storage(url))
    outcomes.set_lifecycle(study, "paused", "until MLflow goes down")  # the worker starts idle
    seen = {}

    def outage() -> None:
        time.sleep(3)  # the worker is up, looking at a paused queue
        tracking.stop()
        outcomes.set_lifecycle(study, "running")
        deadline = time.monotonic() + 60
        while not released and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # it waits for MLflow now, claiming nothing
        seen["trials"] = [(t.state, t.datetime_start) for t in trials_of(url, "idle")]
        tracking.start()

    helper = threading.Thread(target=outage)
    helper.start()
    config = worker.WorkerConfig(
        storage_url=url,
        tracking_uri=tracking.url,
        study_names=("idle",),
        device="cpu",
        precision="fp32",
        threads=1,
        system_metrics=False,
        forever=True,
        max_trials=1,
        poll_interval=0.2,
    )
    try:
        assert worker.run(config, StopSignal()) == 1
    finally:
        helper.join()
    assert len(released) == 1, "the trial was claimed once while MLflow was down, then undone"
    assert seen["trials"] == [(TrialState.WAITING, None)]
    assert [t.state for t in trials_of(url, "idle")] == [TrialState.COMPLETE]  # one attempt: no FAIL, no retry


def test_a_cell_run_whose_create_answer_was_lost_is_one_run(tmp_path, sweeper_env, spawn, tracking):
    """A `runs/create` that reaches the server while its answer is lost is sent again by MLflow's
    HTTP session (urllib3 re-sends a POST after a read timeout): the server makes the cell's run
    twice, the worker trains in the second, and the first stays RUNNING in the comparison table
    with no metrics, a row that never ends (22 of 1,000 trials at 200 workers on 2 cores lost
    such an answer: benchmarks/fleet.py). The worker finds the copies by its trial's tags and
    deletes them: `verify` clean, one run for the cell."""
    from hosts import Forwarder
    from mlflow.entities import ViewType

    forwarder = Forwarder("127.0.0.1", ("127.0.0.1", tracking.port))
    timeout = 5  # the client's read timeout; the cut mends before it ends, so the copy goes through
    env = {
        **sweeper_env,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{forwarder.port}",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
    }
    enqueue(write_spec(tmp_path / "lostrun.toml", epochs=1))
    cut = forwarder.cut_when(rb"POST /api/2\.0/mlflow/runs/create", rb"short4/digits/s1", deliver_last=True)
    try:
        worker = spawn("worker", "--study", "lostrun", *FAST, env=env)
        assert cut.wait(180), worker.text()
        time.sleep(timeout - 3)
        forwarder.mend()
        assert worker.wait(180) == 0, worker.text()
    finally:
        forwarder.close()

    client = MlflowClient(tracking.url)
    experiment = client.get_experiment_by_name("lostrun")
    cell = "tags.`sweeper.role` = 'cell'"
    made = client.search_runs([experiment.experiment_id], cell, run_view_type=ViewType.ALL)
    assert len(made) >= 2, "the server made the run once: the lost answer was not re-sent"
    kept = client.search_runs([experiment.experiment_id], cell)
    (done,) = trials_of(f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db", "lostrun")
    assert [r.info.run_id for r in kept] == [done.user_attrs["mlflow_run_id"]], [r.info for r in kept]
    verified = cli(
        "verify", "--study", "lostrun", "--format", "json", env={**env, "MLFLOW_TRACKING_URI": tracking.url}, code=None
    )
    assert json.loads(verified.stdout)["ok"], verified.stdout


def test_a_run_made_whose_answer_never_came_is_found_rather_than_failing_the_attempt(tracking, monkeypatch):
    """The same lost answer with no copy sent (the session's retries spent): the run exists on the
    server, and the create goes on in it rather than failing the trial's attempt and leaving it."""
    from hosts import Forwarder

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    forwarder = Forwarder("127.0.0.1", ("127.0.0.1", tracking.port))
    try:
        client = tracking_module.client(f"http://127.0.0.1:{forwarder.port}")
        experiment_id = client.create_experiment(f"lost-answer-{time.time_ns()}")
        cut = forwarder.cut_when(rb"POST /api/2\.0/mlflow/runs/create", rb"the-only-one", deliver_last=True)
        fired = mend_after(forwarder, cut, 1, reset=True)  # the client, waiting for the answer, sees it closed
        tags = {"sweeper.role": "cell", "sweeper.key": "the-only-one"}
        run_id = tracking_module.create_run_once(client, experiment_id, "the-only-one", tags, identity=tags)
    finally:
        forwarder.close()
    assert fired, "the tripwire never fired"
    runs = MlflowClient(tracking.url).search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]


def test_a_model_whose_create_was_sent_again_after_its_connection_closed_is_one_model(tracking, monkeypatch):
    """A `logged-models` create applied while its connection closed under the answer (a server
    restarted, a proxy's idle cut) is re-sent by MLflow's session at once, well inside the read
    timeout: the cell had two models, one PENDING for ever. Now one, the one the worker fills."""
    from hosts import Forwarder

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    forwarder = Forwarder("127.0.0.1", ("127.0.0.1", tracking.port))
    try:
        client = tracking_module.client(f"http://127.0.0.1:{forwarder.port}")
        experiment_id = client.create_experiment(f"model-sent-again-{time.time_ns()}")
        run_id = client.create_run(experiment_id).info.run_id
        cut = forwarder.cut_when(rb"POST /api/2\.0/mlflow/logged-models", rb"short4-digits-s1", deliver_last=True)
        fired = mend_after(forwarder, cut, 1, reset=True)
        started = time.monotonic()
        model = tracking_module.create_model(
            client, experiment_id, run_id, "short4-digits-s1", {}, {}, deadline=started + 60
        )
    finally:
        forwarder.close()
    assert fired and time.monotonic() - started < 20, "the tripwire never fired, or the create waited for its timeout"
    models = MlflowClient(tracking.url).search_logged_models([experiment_id])
    assert [m.model_id for m in models] == [model.model_id], [(m.model_id, m.status) for m in models]
