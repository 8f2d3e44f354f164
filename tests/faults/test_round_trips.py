"""What one trial asks of the shared servers (issue #26, "Fewer round trips"): a real worker,
PostgreSQL and a real `mlflow server`, counted where they arrive (the worker's SQLAlchemy
transactions, the server's access log)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from fault_helpers import enqueue
from helpers import MlflowServer, write_spec
from sqlalchemy import event
from sqlalchemy.engine import Engine

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's

REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+"')


def test_a_trial_costs_at_most_15_transactions_and_10_requests_and_an_epoch_2_and_none(tmp_path, pg_database):
    """Per trial that ends well: at most 15 Optuna transactions and 10 requests to the MLflow
    server besides the model's files (which an object store takes off the server: docs/DEPLOY.md);
    per epoch at most 2 transactions and no request (no checkpoint inside these trials). Measured
    as differences between three workers' whole lives (1 cell x 1 epoch, 3 x 1, 3 x 3), so what a
    worker pays once (its start, the study's MLflow set-up, its last look at the queue) cancels."""
    from sweeper import worker

    server = MlflowServer(tmp_path).start()
    url = pg_database()
    transactions = Counter()

    def begin(conn) -> None:
        transactions["all"] += 1

    event.listen(Engine, "begin", begin)
    try:
        cost = {}
        for cells, epochs in ((1, 1), (3, 1), (3, 3)):
            name = f"trips{cells}x{epochs}"
            spec = write_spec(
                tmp_path / f"{name}.toml", seeds=tuple(range(1, cells + 1)), epochs=epochs, checkpoint_every=600
            )
            spec.write_text(spec.read_text().replace("limit_train = 256", "limit_train = 64"))
            enqueue(spec, url)
            log_at, before = (tmp_path / "mlflow-server.log").stat().st_size, transactions["all"]
            config = worker.WorkerConfig(
                storage_url=url,
                tracking_uri=server.url,
                study_names=(name,),
                device="cpu",
                precision="fp32",
                threads=1,
                system_metrics=False,
                heartbeat_interval=600,  # no renewal inside these short trials: they are counted apart
            )
            assert worker.run(config) == cells
            with open(tmp_path / "mlflow-server.log", "rb") as f:
                f.seek(log_at)
                lines = f.read().decode(errors="replace")
            requests = [m[1] + " " + m[2] for m in REQUEST.finditer(lines)]
            model_files = [r for r in requests if r.startswith("PUT ") and "/mlflow-artifacts/artifacts/" in r]
            cost[cells, epochs] = transactions["all"] - before, len(requests) - len(model_files), requests
    finally:
        event.remove(Engine, "begin", begin)
        server.stop()

    per_trial_xacts = (cost[3, 1][0] - cost[1, 1][0]) / 2
    per_trial_requests = (cost[3, 1][1] - cost[1, 1][1]) / 2
    per_epoch_xacts = (cost[3, 3][0] - cost[3, 1][0]) / (3 * 2)
    per_epoch_requests = (cost[3, 3][1] - cost[3, 1][1]) / (3 * 2)
    said = f"{per_trial_xacts} transactions and {per_trial_requests} requests per trial; requests {cost[3, 1][2]}"
    assert per_trial_xacts <= 15 and per_trial_requests <= 10, said
    assert per_epoch_xacts <= 2 and per_epoch_requests == 0, f"{per_epoch_xacts}, {per_epoch_requests} per epoch"


def test_a_retry_finds_the_run_its_first_attempt_made_before_recording_it(tmp_path, tracking):
    """A first attempt creates its cell's MLflow run without searching for one (nothing can exist
    yet); its retry searches, so an attempt killed between creating the run and recording the run's
    id in Optuna leaves one run per cell, not two."""
    import optuna

    from sweeper import tracking as track
    from sweeper import worker
    from sweeper.names import RECIPE_DIGEST_ATTR
    from sweeper.storage import connect
    from sweeper.trials import claims

    url = f"sqlite:///{tmp_path}/optuna.db"
    enqueue(write_spec(tmp_path / "again.toml", epochs=1, limit_train=64, checkpoint_every=600), url)
    study = optuna.load_study(study_name="again", storage=connect.open_storage(url))
    first = claims.claim(study)  # the attempt that dies: its run made, its id never recorded
    digest = study._storage.get_trial(first).user_attrs[RECIPE_DIGEST_ATTR]
    client = track.client(tracking.url)
    experiment_id = track.ensure_experiment(client, "again")
    identity = {track.KEY_TAG: "short4/digits/s1", track.ROLE_TAG: "cell", track.RECIPE_TAG: digest}
    orphan = client.create_run(experiment_id, tags=identity).info.run_id
    claims.requeue(study, first, "killed", "worker_lost")

    config = worker.WorkerConfig(
        storage_url=url, tracking_uri=tracking.url, study_names=("again",), device="cpu", precision="fp32", threads=1
    )
    assert worker.run(config) == 1
    retry = optuna.load_study(study_name="again", storage=connect.open_storage(url)).get_trials(deepcopy=False)[-1]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["mlflow_run_id"] == orphan
    runs = client.search_runs([experiment_id], f"tags.`{track.ROLE_TAG}` = 'cell'")
    assert [r.info.run_id for r in runs] == [orphan]
