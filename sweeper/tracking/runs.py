"""The study's experiment and parent run, the cells' runs and their tags, links to them, and
``RunLogger``, which sends a run's params, metrics and tags in batches through an outage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeper import settings
from sweeper.errors import LeaseLapsed, TrialLost, first_line
from sweeper.redact import redact
from sweeper.tracking.connection import TrackingUnreachable, create_once, is_server, retry_while_unreachable

log = logging.getLogger("sweeper.tracking")

ROLE_TAG = "sweeper.role"  # "study" on the parent run, "cell" on a cell's run
KEY_TAG = "sweeper.key"
RECIPE_TAG = "sweeper.recipe_digest"  # with the key, a cell run's identity
CODE_DIGEST_TAG = "sweeper.code_digest"  # digest of the sweeper package's source that trained the run
DATASET_DIGEST_TAG = "sweeper.dataset_digest"  # digest of the arrays it trained and evaluated on
PARENT_TAG = "mlflow.parentRunId"


def ensure_experiment(mlflow_client, name: str) -> str:
    """The study's experiment id; creating it is race-safe (create, on 'exists' look it up)."""
    from mlflow.exceptions import MlflowException

    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(existing.experiment_id)
        return existing.experiment_id
    uri = mlflow_client.tracking_uri
    artifact_location = None
    if uri.startswith("sqlite:"):  # embedded store: artifacts beside the database, not in ./mlruns
        artifact_location = (settings.home() / "mlartifacts").as_uri()
    try:
        # The kind tag makes MLflow 3's UI open the runs table rather than its GenAI overview.
        return mlflow_client.create_experiment(
            name, artifact_location=artifact_location, tags={"mlflow.experimentKind": "custom_model_development"}
        )
    except MlflowException:
        existing = mlflow_client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def find_run(mlflow_client, experiment_id: str, tags: dict[str, str]):
    runs = find_runs(mlflow_client, experiment_id, tags, limit=1)
    return runs[0] if runs else None


def find_runs(mlflow_client, experiment_id: str, tags: dict[str, str], limit: int = 100) -> list:
    """The experiment's active runs that carry ``tags``, the first made first."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return mlflow_client.search_runs(
        [experiment_id], filter_string=query, max_results=limit, order_by=["attributes.start_time ASC"]
    )


def create_run_once(
    mlflow_client, experiment_id: str, run_name: str, tags: dict[str, str], identity: dict[str, str]
) -> str:
    """The id of a run created with ``tags``, made once (``create_once``): ``identity``, tags no
    other run has, finds the copies; those without metrics are deleted."""
    run = create_once(
        lambda: mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags),
        lambda: find_runs(mlflow_client, experiment_id, identity),
        ident=lambda r: r.info.run_id,
        droppable=lambda r: not r.data.metrics,
        drop=mlflow_client.delete_run,
    )
    return run.info.run_id


def find_study_run(mlflow_client, study_name: str) -> tuple[str, str] | None:
    """(experiment id, parent run id) of a study whose experiment (not deleted) and parent run
    exist; None otherwise (``ensure_experiment`` and ``ensure_study_run`` make them)."""
    experiment = mlflow_client.get_experiment_by_name(study_name)
    if experiment is None or experiment.lifecycle_stage != "active":
        return None
    run = find_run(mlflow_client, experiment.experiment_id, {ROLE_TAG: "study"})
    return (experiment.experiment_id, run.info.run_id) if run is not None else None


def ensure_study_run(mlflow_client, experiment_id: str, spec: dict[str, Any]) -> str:
    """The parent run that holds the study's spec, report tables and plots."""
    run = find_run(mlflow_client, experiment_id, {ROLE_TAG: "study"})
    if run is not None:
        return run.info.run_id
    tags = {
        ROLE_TAG: "study",
        "optuna.study": spec["name"],
        "mlflow.note.content": spec.get("description") or f"sweeper study {spec['name']}",
    }
    run_id = create_run_once(mlflow_client, experiment_id, spec["name"], tags, identity={ROLE_TAG: "study"})
    mlflow_client.log_dict(run_id, spec, "spec.json")
    return run_id


STUDY_RUN_STATUS = {"running": "RUNNING", "finished": "FINISHED", "failed": "FAILED"}


def set_study_run_status(mlflow_client, study_name: str, outcome: str) -> None:
    """The study's parent run follows the study: RUNNING while cells wait or run, FINISHED when
    every cell is done, FAILED when cells failed for good. MLflow down: logged, not raised."""
    try:
        experiment = mlflow_client.get_experiment_by_name(study_name)
        run = experiment and find_run(mlflow_client, experiment.experiment_id, {ROLE_TAG: "study"})
        if not run:
            return
        status = STUDY_RUN_STATUS[outcome]
        if status == "RUNNING":
            mlflow_client.update_run(run.info.run_id, status="RUNNING")
        else:
            mlflow_client.set_terminated(run.info.run_id, status)
    except Exception as e:
        log.warning("could not mark the MLflow run of study %s %s: %s", study_name, outcome, redact(first_line(e)))


def run_link(uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    """Where a person opens the run: the server's UI page, else the run's URI."""
    if not run_id:
        return None
    if uri and is_server(uri) and experiment_id:
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


UI_DEFAULT = "http://127.0.0.1:5000"  # where `sweeper ui` serves an embedded store's MLflow UI by default


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server, or, for an embedded store, where
    `sweeper ui` serves it with its default --port."""
    from sweeper.redact import strip_credentials

    base = strip_credentials(uri).rstrip("/") if is_server(uri) else UI_DEFAULT
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


class RunLogger:
    """Sends params, metrics and tags of one run in batches, in order, surviving an outage.

    What cannot be sent stays queued and goes with the next flush; ``flush(deadline=...)``
    keeps trying until the deadline, then raises SweeperError.

    ``fence()``, when given, runs before each request: a worker's lease on its trial
    (``claims.Heartbeat.check``). LeaseLapsed keeps what is queued for a later flush; TrialLost
    is raised, and nothing more goes to the run.
    """

    def __init__(self, mlflow_client, run_id: str, fence: Callable[[], None] | None = None):
        self.client, self.run_id = mlflow_client, run_id
        self.fence = fence or (lambda: None)
        self.metrics: list[Any] = []
        self.params: list[Any] = []
        self.tags: list[Any] = []
        self.artifacts: list[tuple[str, str]] = []  # (local path, artifact dir)
        self.inputs: list[Any] = []  # mlflow DatasetInput
        self.down_since: float | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.params += [Param(k, str(v)) for k, v in params.items()]

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.tags += [RunTag(k, str(v)) for k, v in tags.items()]

    def log_input(self, dataset_input) -> None:
        self.inputs.append(dataset_input)

    def log_metrics(self, metrics: dict[str, float], step: int = 0, model_id: str | None = None) -> None:
        """``model_id``: the metrics also belong to that logged model (MLflow 3 links them)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.metrics += [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()]

    def link_step(self, step: int, model_id: str) -> bool:
        """The queued metrics of ``step`` also belong to the logged model ``model_id``; False when
        none of that step is queued (sent already, or never logged)."""
        from mlflow.entities import Metric

        linked = False
        for i, m in enumerate(self.metrics):
            if m.step == step and m.model_id is None:
                self.metrics[i] = Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id)
                linked = True
        return linked

    def log_artifact(self, local_path: str | Path, artifact_path: str) -> None:
        self.artifacts = [a for a in self.artifacts if a[0] != str(local_path)] + [(str(local_path), artifact_path)]

    def flush(self, deadline: float | None = None, should_stop=None) -> bool:
        """Send what is queued; True when everything went. With a deadline, retry until then
        (or until ``should_stop()``), then raise TrackingUnreachable."""
        pending = self.pending()
        try:
            retry_while_unreachable(self._send, deadline, should_stop, self._failed)
        except TrackingUnreachable:
            if deadline is None:
                return False  # what is queued goes with the next flush
            raise
        if self.down_since is not None:
            log.info(
                "MLflow is reachable again after %.0fs; sent %d buffered item(s)",
                time.monotonic() - self.down_since,
                pending,
            )
        self.down_since = None
        return True

    def _failed(self, error: Exception) -> None:
        if isinstance(error, TrialLost):
            raise error
        if isinstance(error, LeaseLapsed):
            log.info("%s; holding %d item(s) for MLflow until it is", error, self.pending())
            return
        if self.down_since is None:  # one warning per outage, however many flushes it lasts
            self.down_since = time.monotonic()
            log.warning("MLflow is unreachable (%s); buffering and retrying", redact(first_line(error)))

    def pending(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags) + len(self.artifacts) + len(self.inputs)

    def _send(self) -> None:
        # Artifacts (the checkpoint) go before the epoch's metrics: a metric logged means its
        # epoch can be resumed, so a retried trial never trains and logs an epoch twice.
        # Sent items leave the queue as they go, so a retry after a failure sends nothing twice.
        while self.artifacts:
            local, path = self.artifacts[0]
            self.fence()
            self.client.log_artifact(self.run_id, local, path)
            self.artifacts.pop(0)
        if self.inputs:
            self.fence()
            self.client.log_inputs(self.run_id, datasets=self.inputs)
            self.inputs = []
        # One request for what fits in one batch (MLflow: 100 params, 100 tags, 1000 items in all).
        while self.params or self.tags or self.metrics:
            self.fence()
            params, tags = self.params[:100], self.tags[:100]
            metrics = self.metrics[: 1000 - len(params) - len(tags)]
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)
            del self.params[: len(params)], self.tags[: len(tags)], self.metrics[: len(metrics)]


def logged_steps(mlflow_client, run_id: str, metric: str = "top1_error") -> set[int]:
    return {m.step for m in mlflow_client.get_metric_history(run_id, metric)}
