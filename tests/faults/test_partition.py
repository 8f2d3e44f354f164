"""Workers on other hosts: one cut off mid-trial, its trial taken over, then the network heals;
and both servers restarted for real while workers on two hosts train.

Worker B runs in its own network namespace (tests/hosts.py) and reaches PostgreSQL and the
`mlflow server` only across its veth link; worker A runs on this machine. After B's checkpoint
of an epoch, B's link drops every packet (iptables DROP: connections hang, as on a real
network): to PostgreSQL only (B still reaches MLflow, so only the fence, its lease on the trial,
keeps it from writing there), or to both servers in the middle of a checkpoint upload (B's link
slowed with tc so that the upload takes seconds). The reverse cut (MLflow only) keeps the trial
B's: its lease holds through PostgreSQL. A, started without --forever, waits for the running
trial, fails it once its heartbeat is older than the grace period, and resumes the retry from the
checkpoint in the same MLflow run. While A trains, the link heals: whatever B still held (epochs,
a checkpoint, its run's end) must not reach the run, and B stands down on its own.

SWEEPER_REQUIRE_NETNS=1 (CI) fails instead of skipping where namespaces cannot be made."""

from __future__ import annotations

import os
import time

import pytest
import torch
from fault_helpers import FAST, cli, trials_of
from helpers import PrivatePostgres, write_spec
from hosts import Network, network_unavailable
from optuna.trial import TrialState

from sweeper.names import CHECKPOINT_ARTIFACT

pytestmark = pytest.mark.slow

EPOCHS = 12
GRACE = 10  # seconds: B's lease is half of it, its connections give up on a quarter


@pytest.fixture
def network():
    why = network_unavailable()
    if why:
        if os.environ.get("SWEEPER_REQUIRE_NETNS") == "1":
            pytest.fail(f"extra hosts are required (SWEEPER_REQUIRE_NETNS=1) but {why}")
        pytest.skip(f"no extra hosts: {why}")
    with Network() as net:
        yield net


def on_host(host, env: dict[str, str], pg_port: int, mlflow_port: int, home) -> tuple[dict[str, str], int, int]:
    """The environment of a worker on ``host``: its own SWEEPER_HOME, both servers reached across
    the host's link; and the two forwarded ports (a partition can cut one of them)."""
    pg, mlflow = host.forward(pg_port), host.forward(mlflow_port)
    home.mkdir()
    local = env["SWEEPER_STORAGE"].replace(f"127.0.0.1:{pg_port}", f"{host.gateway}:{pg}")
    remote = {
        "SWEEPER_HOME": str(home),
        "SWEEPER_STORAGE": local,
        "MLFLOW_TRACKING_URI": f"http://{host.gateway}:{mlflow}",
    }
    return {**env, **remote}, pg, mlflow


def the_finished_run(server, study: str, epochs: int):
    """(An MLflow client, the study's one cell run), the run FINISHED with each epoch's metrics
    logged exactly once."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    (experiment,) = [e for e in client.search_experiments() if e.name == study]
    (run,) = client.search_runs([experiment.experiment_id], "tags.`sweeper.role` = 'cell'")
    assert run.info.status == "FINISHED", run.info
    for metric in ("train_loss", "test_loss", "top1_error"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), (metric, steps)  # each epoch once
    return client, run


@pytest.mark.parametrize("cut", ["postgresql only", "both servers, mid-upload"])
def test_a_cut_off_worker_taken_over_writes_nothing_when_the_network_heals(
    cut, network, pg_database, mlflow_server, sweeper_env, spawn, tmp_path
):
    storage, server = pg_database(), mlflow_server()
    env = {**sweeper_env, "SWEEPER_STORAGE": storage, "MLFLOW_TRACKING_URI": server.url}
    write_spec(tmp_path / "cut.toml", epochs=EPOCHS, limit_train=512, limit_test=128)
    cli("launch", "--study", str(tmp_path / "cut.toml"), env=env)

    b = network.host()
    env_b, pg_port, _ = on_host(b, env, 5432, server.port, tmp_path / "home-b")
    common = [*FAST, "--grace-period", str(GRACE), "--poll-interval", "0.5", "--study", "cut"]
    mid_upload = cut.endswith("mid-upload")
    if mid_upload:  # an 18 MB checkpoint then takes ~4 s to send
        b.limit_rate("40mbit")
    worker_b = spawn("worker", *common, env=env_b, name="b", host=b)
    worker_b.wait_for(r"ready after", timeout=300)
    worker_a = spawn("worker", *common, env=env, name="a")
    worker_a.wait_for(r"waiting for 1 running trial")

    sent = worker_b.wait_for(r"checkpoint of epoch (\d+) sent", after=len(worker_b.text()))
    if mid_upload:  # the next epoch's checkpoint goes once that epoch is reported (before or after)
        uploading = int(sent[1]) + 1
        worker_b.wait_for(rf"epoch {uploading}/{EPOCHS}")
        time.sleep(1)
    at_cut = len(worker_b.text())
    b.partition(port=pg_port if cut == "postgresql only" else None)
    cut_at = time.monotonic()
    # A dead connection is noticed in seconds (TCP user timeout, keepalives), not the kernel's
    # ~15 minutes of retransmissions: the heartbeat's query into the cut fails well within the grace.
    worker_b.wait_for(r"heartbeat for trial \d+ failed", after=at_cut, timeout=GRACE)
    if mid_upload:
        assert f"checkpoint of epoch {uploading} sent" not in worker_b.text(), "the cut came after the upload"
    resumed = worker_a.wait_for(r"resumes after epoch (\d+) ", timeout=120)
    took_over = time.monotonic() - cut_at
    worker_a.wait_for(rf"epoch {int(resumed[1]) + 1}/{EPOCHS}", after=resumed.end())
    b.heal()  # while A trains

    assert worker_a.wait(300) == 0, worker_a.text()
    assert worker_b.wait(120) == 0, worker_b.text()  # on its own, once nothing waits or runs
    assert "this worker stands down" in worker_b.text(), worker_b.text()
    # Not before the grace period (less the heartbeat interval: B's last beat came up to 1 s before the cut).
    assert GRACE - 2 <= took_over < 6 * GRACE, (
        f"A took the trial over {took_over:.0f}s after the cut\n{worker_a.text()}"
    )

    cut_trial, retry = trials_of(storage, "cut")
    assert (cut_trial.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)

    client, run = the_finished_run(server, "cut", EPOCHS)
    assert run.data.tags["sweeper.resumed_from_epoch"] == resumed[1]
    last = client.download_artifacts(run.info.run_id, f"{CHECKPOINT_ARTIFACT}/last.pt", str(tmp_path))
    ended_with = torch.load(last, map_location="cpu", weights_only=False)
    assert (ended_with["trial"], ended_with["epoch"]) == (retry.number, EPOCHS - 1), "the run ends with A's checkpoint"
    cli("verify", "--study", "cut", env=env)  # exit 1 on any drift between MLflow and Optuna


TELL_COMPLETE = rb"UPDATE trials SET state=.*COMPLETE"  # Optuna's write of the final state (its parameter)


@pytest.mark.parametrize("commit", ["lost", "done, answer lost"])
def test_a_cut_during_the_final_tell_leaves_one_complete_cell_either_way(
    commit, network, pg_database, mlflow_server, sweeper_env, spawn, tmp_path
):
    """B's link drops at its last write: the tell of COMPLETE, after its run was ended FINISHED.
    Either the tell never reaches PostgreSQL (A takes the trial over and finishes the retry from
    the last checkpoint, with nothing left to train) or its COMMIT does and the answer is lost (the
    trial is COMPLETE: A has nothing to take over, and B, back on the network, finds its own
    COMPLETE). Both ways: one COMPLETE cell, one FINISHED run, each epoch once, verify clean."""
    epochs = 3
    storage, server = pg_database(), mlflow_server()
    env = {**sweeper_env, "SWEEPER_STORAGE": storage, "MLFLOW_TRACKING_URI": server.url}
    write_spec(tmp_path / "tell.toml", epochs=epochs, limit_train=512, limit_test=128)
    cli("launch", "--study", str(tmp_path / "tell.toml"), env=env)
    b = network.host()
    env_b, pg_port, _ = on_host(b, env, 5432, server.port, tmp_path / "home-b")
    (to_postgres,) = [f for f in b.forwarders if f.target == ("127.0.0.1", 5432)]
    if commit == "lost":
        cut = to_postgres.cut_when(TELL_COMPLETE, deliver_last=False)
    else:
        cut = to_postgres.cut_when(TELL_COMPLETE, rb"^Q....COMMIT", deliver_last=True)
    common = [*FAST, "--grace-period", str(GRACE), "--poll-interval", "0.5", "--study", "tell"]
    worker_b = spawn("worker", *common, env=env_b, name="b", host=b)
    worker_b.wait_for(r"ready after", timeout=300)
    worker_a = spawn("worker", *common, env=env, name="a")
    worker_a.wait_for(r"waiting for 1 running trial")
    assert cut.wait(300), worker_b.text()
    b.partition(port=pg_port)  # and B's new connections hang too, until healed
    cut_at = len(worker_b.text())
    assert "complete," not in worker_b.text()[:cut_at], "B said complete before its tell was answered"

    if commit == "lost":
        worker_a.wait_for(r"resumes after epoch \d+ ", timeout=120)
    else:  # the trial is COMPLETE: A has nothing to take over and leaves
        assert worker_a.wait(120) == 0, worker_a.text()
        time.sleep(2)  # B's connection gives up (a quarter of the grace period); it retries the tell
    b.heal()
    assert worker_a.wait(300) == 0, worker_a.text()
    assert worker_b.wait(120) == 0, worker_b.text()

    trials = trials_of(storage, "tell")
    if commit == "lost":
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], trials
        assert "this worker stands down" in worker_b.text(), worker_b.text()
    else:
        assert [t.state for t in trials] == [TrialState.COMPLETE], trials
        assert "resumes after" not in worker_a.text(), worker_a.text()
        assert "complete," in worker_b.text()[cut_at:], worker_b.text()  # its own COMPLETE, found again
    the_finished_run(server, "tell", epochs)
    cli("verify", "--study", "tell", env=env)


def test_a_worker_cut_off_from_mlflow_only_keeps_its_trial_and_sends_what_it_held(
    network, pg_database, mlflow_server, sweeper_env, spawn, tmp_path
):
    """The reverse asymmetric cut: B still reaches PostgreSQL, so its heartbeat and lease hold
    past the grace period and nobody takes the trial over; it buffers what MLflow misses and
    sends it once the link heals. One trial, never failed, each epoch once."""
    storage, server = pg_database(), mlflow_server()
    env = {**sweeper_env, "SWEEPER_STORAGE": storage, "MLFLOW_TRACKING_URI": server.url}
    write_spec(tmp_path / "mlcut.toml", epochs=EPOCHS, limit_train=512, limit_test=128)
    cli("launch", "--study", str(tmp_path / "mlcut.toml"), env=env)
    b = network.host()
    env_b, _, mlflow_port = on_host(b, env, 5432, server.port, tmp_path / "home-b")
    common = [*FAST, "--grace-period", str(GRACE), "--poll-interval", "0.5", "--study", "mlcut"]
    worker_b = spawn("worker", *common, env=env_b, name="b", host=b)
    worker_b.wait_for(r"ready after", timeout=300)
    worker_a = spawn("worker", *common, env=env, name="a")
    worker_a.wait_for(r"waiting for 1 running trial")
    worker_b.wait_for(r"checkpoint of epoch \d+ sent", after=len(worker_b.text()))
    b.partition(port=mlflow_port)
    worker_b.wait_for(r"MLflow is unreachable")
    time.sleep(2 * GRACE)  # past the grace period: a stopped heartbeat would have been taken over by now
    b.heal()

    assert worker_b.wait(300) == 0, worker_b.text()
    assert worker_a.wait(120) == 0, worker_a.text()
    assert "MLflow is reachable again" in worker_b.text(), worker_b.text()
    assert "resumes after" not in worker_a.text(), worker_a.text()
    assert [t.state for t in trials_of(storage, "mlcut")] == [TrialState.COMPLETE], "one trial, never taken over"
    the_finished_run(server, "mlcut", EPOCHS)
    cli("verify", "--study", "mlcut", env=env)


@pytest.fixture
def private_postgres():
    server = PrivatePostgres().start()
    yield server
    server.stop()


def test_postgresql_and_the_mlflow_server_restarted_while_workers_on_two_hosts_train(
    network, private_postgres, mlflow_server, sweeper_env, spawn, tmp_path
):
    """A real restart of each server (PostgreSQL: a fast shutdown that ends every session, on a
    server of the test's own; the `mlflow server`: stopped, then started on the same port) while
    workers on two other hosts train: both trials go on through it, nothing lost, nothing twice."""
    server = mlflow_server()
    env = {**sweeper_env, "SWEEPER_STORAGE": private_postgres.url, "MLFLOW_TRACKING_URI": server.url}
    write_spec(tmp_path / "restarts.toml", seeds=(1, 2), epochs=EPOCHS, limit_train=512, limit_test=128)
    cli("launch", "--study", str(tmp_path / "restarts.toml"), env=env)

    workers = []
    for name in ("b", "c"):
        host = network.host()
        env_host, _, _ = on_host(host, env, private_postgres.port, server.port, tmp_path / f"home-{name}")
        common = [*FAST, "--grace-period", "30", "--poll-interval", "0.5", "--study", "restarts"]
        workers.append(spawn("worker", *common, env=env_host, name=name, host=host))
    for worker in workers:
        worker.wait_for(r"checkpoint of epoch 2 sent", timeout=300)
    private_postgres.restart()
    marks = [len(w.text()) for w in workers]
    for worker, mark in zip(workers, marks):
        worker.wait_for(rf"epoch \d+/{EPOCHS}", after=mark)  # training and reporting go on
    server.stop()
    time.sleep(3)
    server.start()

    for worker in workers:
        assert worker.wait(300) == 0, worker.text()
        assert "MLflow is reachable again" in worker.text(), worker.text()  # it buffered through the restart
    trials = trials_of(private_postgres.url, "restarts")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, "no trial failed or retried"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    (experiment,) = [e for e in client.search_experiments() if e.name == "restarts"]
    runs = client.search_runs([experiment.experiment_id], "tags.`sweeper.role` = 'cell'")
    assert sorted(r.data.tags["sweeper.key"] for r in runs) == ["short4/digits/s1", "short4/digits/s2"]
    for run in runs:
        assert run.info.status == "FINISHED", run.info
        for metric in ("train_loss", "test_loss", "top1_error"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.data.tags["sweeper.key"], metric, steps)
    cli("verify", "--study", "restarts", env=env)
