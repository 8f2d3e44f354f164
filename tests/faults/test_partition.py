"""Workers on other hosts: one cut off mid-trial, its trial taken over, then the network heals;
and both servers restarted for real while workers on two hosts train.

Worker B runs in its own network namespace (tests/hosts.py) and reaches PostgreSQL and the
`mlflow server` only across its veth link; worker A runs on this machine. After B's checkpoint
of epoch 2, B's link drops every packet (iptables DROP: connections hang, as on a real network):
to both servers, or to PostgreSQL only (B still reaches MLflow, so only the fence, its lease on
the trial, keeps it from writing there). A, started without --forever, waits for the running
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


@pytest.mark.parametrize("cut", ["both servers", "postgresql only"])
def test_a_cut_off_worker_taken_over_writes_nothing_when_the_network_heals(
    cut, network, pg_database, mlflow_server, sweeper_env, spawn, tmp_path
):
    storage, server = pg_database(), mlflow_server()
    env = {**sweeper_env, "SWEEPER_STORAGE": storage, "MLFLOW_TRACKING_URI": server.url}
    write_spec(tmp_path / "cut.toml", epochs=EPOCHS, limit_train=None, limit_test=128)
    cli("launch", "--study", str(tmp_path / "cut.toml"), env=env)

    b = network.host()
    pg_port, mlflow_port = b.forward(5432), b.forward(server.port)
    home_b = tmp_path / "home-b"
    home_b.mkdir()
    env_b = {
        **env,
        "SWEEPER_HOME": str(home_b),
        "SWEEPER_STORAGE": storage.replace("127.0.0.1:5432", f"{b.gateway}:{pg_port}"),
        "MLFLOW_TRACKING_URI": f"http://{b.gateway}:{mlflow_port}",
    }
    common = [*FAST, "--grace-period", str(GRACE), "--poll-interval", "0.5", "--study", "cut"]
    worker_b = spawn("worker", *common, env=env_b, name="b", host=b)
    worker_b.wait_for(r"checkpoint of epoch 2 sent", timeout=300)
    worker_a = spawn("worker", *common, env=env, name="a")
    worker_a.wait_for(r"waiting for 1 running trial")

    b.partition(port=None if cut == "both servers" else pg_port)
    cut_at = time.monotonic()
    resumed = worker_a.wait_for(r"resumes after epoch (\d+) ", timeout=120)
    took_over = time.monotonic() - cut_at
    worker_a.wait_for(rf"epoch {int(resumed[1]) + 1}/{EPOCHS}", after=resumed.end())
    b.heal()  # while A trains

    assert worker_a.wait(300) == 0, worker_a.text()
    assert worker_b.wait(120) == 0, worker_b.text()  # on its own, once nothing waits or runs
    assert "this worker stands down" in worker_b.text(), worker_b.text()
    assert GRACE <= took_over < 4 * GRACE, f"A took the trial over {took_over:.0f}s after the cut"

    cut_trial, retry = trials_of(storage, "cut")
    assert (cut_trial.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    (experiment,) = [e for e in client.search_experiments() if e.name == "cut"]
    (run,) = client.search_runs([experiment.experiment_id], "tags.`sweeper.role` = 'cell'")
    assert run.info.status == "FINISHED", run.info
    assert run.data.tags["sweeper.resumed_from_epoch"] == resumed[1]
    for metric in ("train_loss", "test_loss", "top1_error"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (metric, steps)  # each epoch once
    last = client.download_artifacts(run.info.run_id, f"{CHECKPOINT_ARTIFACT}/last.pt", str(tmp_path))
    ended_with = torch.load(last, map_location="cpu", weights_only=False)
    assert (ended_with["trial"], ended_with["epoch"]) == (retry.number, EPOCHS - 1), "the run ends with A's checkpoint"
    cli("verify", "--study", "cut", env=env)  # exit 1 on any drift between MLflow and Optuna


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
    write_spec(tmp_path / "restarts.toml", seeds=(1, 2), epochs=EPOCHS, limit_train=None, limit_test=128)
    cli("launch", "--study", str(tmp_path / "restarts.toml"), env=env)

    workers = []
    for name in ("b", "c"):
        host = network.host()
        home = tmp_path / f"home-{name}"
        home.mkdir()
        env_host = {
            **env,
            "SWEEPER_HOME": str(home),
            "SWEEPER_STORAGE": private_postgres.url.replace(
                f"127.0.0.1:{private_postgres.port}", f"{host.gateway}:{host.forward(private_postgres.port)}"
            ),
            "MLFLOW_TRACKING_URI": f"http://{host.gateway}:{host.forward(server.port)}",
        }
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
