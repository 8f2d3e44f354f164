"""MLflow: one experiment per study, a parent run for the study, one run per grid cell.

Everything goes through ``MlflowClient`` with explicit run ids: the fluent API keeps one
global active run per process, which breaks as soon as two things log at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from sweeper import settings
from sweeper.errors import SweeperError, first_line
from sweeper.redact import quote_password, redact, redact_url, remember

log = logging.getLogger("sweeper.tracking")
T = TypeVar("T")

ROLE_TAG = "sweeper.role"  # "study" on the parent run, "cell" on a cell's run
KEY_TAG = "sweeper.key"
RECIPE_TAG = "sweeper.recipe_digest"  # with the key, a cell run's identity
CODE_DIGEST_TAG = "sweeper.code_digest"  # digest of the sweeper package's source that trained the run
DATASET_DIGEST_TAG = "sweeper.dataset_digest"  # digest of the arrays it trained and evaluated on
PARENT_TAG = "mlflow.parentRunId"
MODEL_NAME = "model"  # what cells finished by older sweepers named their model; see model_name()


def default_tracking_uri() -> str:
    return f"sqlite:///{settings.home() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to give MLflow. Credentials written into an http(s) URI move to
    MLFLOW_TRACKING_USERNAME/PASSWORD (what MLflow sends as basic auth), because MLflow prints
    the URI it was given ("View run ... at: URI") on stdout, where no logging filter reaches."""
    uri = remember(uri or settings.tracking_uri() or default_tracking_uri())
    if not is_server(uri):
        return quote_password(uri)  # a database URL, read by SQLAlchemy
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def configure_http(request_timeout: int = 20, max_retries: int = 2) -> None:
    """Fail an HTTP call in seconds, not minutes (MLflow's default retries back off for ~2
    minutes); sweeper buffers what could not be sent and retries it itself."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def client(uri: str | None = None, create: bool = True):
    """An MlflowClient whose HTTP calls give up in seconds (every command gets bounded waits).

    An embedded (SQLite) store is created here, one process at a time (a file lock next to the
    database: MLflow's schema creation fails when two processes run it at once), or, with
    ``create=False`` (commands that only read), refused when its file does not exist."""
    from mlflow.tracking import MlflowClient

    from sweeper.study import check_sqlite_file, file_lock, sqlite_path

    configure_http()
    uri = resolve_tracking_uri(uri)
    path = sqlite_path(uri) if uri.startswith("sqlite") else None
    check_sqlite_file(path, "MLflow tracking store", "--tracking-uri / MLFLOW_TRACKING_URI", create)
    if path is None or not create:
        return MlflowClient(tracking_uri=uri)
    with file_lock(Path(f"{path}.lock")):  # the client creates (or checks) the store's schema
        return _create_embedded(uri)


STORE_CREATE_WAIT = 60.0  # seconds another process may take to create the embedded store
SCHEMA_QUIET = 1.0  # seconds a store's schema must stay unchanged before it counts as created


def _wait_while_migrating(path: Path) -> None:
    """An embedded store written in the last seconds may be one that another MLflow client is
    creating right now: opening it then would start a second schema migration beside the first
    (both fail, or leave the schema half made). Wait until its tables and alembic revision stay
    unchanged for SCHEMA_QUIET seconds."""
    import sqlite3

    if not path.exists() or time.time() - path.stat().st_mtime > 5:
        return
    deadline = time.monotonic() + STORE_CREATE_WAIT
    last, quiet_since = None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
                now = db.execute("SELECT group_concat(name) FROM sqlite_master").fetchone()
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone():
                    now += tuple(db.execute("SELECT version_num FROM alembic_version").fetchall())
        except sqlite3.Error as e:
            now = ("error", str(e))
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= SCHEMA_QUIET:
            return
        time.sleep(0.1)


def _create_embedded(uri: str):
    """The client of an embedded store, created or checked. Another MLflow client (a notebook, a
    script) may be creating the same store at this moment without sweeper's lock: its half-made
    schema fails ours (alembic's "Online migration expected to match one row", SQLAlchemy's
    "Circular dependency detected"). It finishes in seconds: wait for it and try again."""
    from mlflow.tracking import MlflowClient

    from sweeper.study import sqlite_path

    _wait_while_migrating(sqlite_path(uri))
    deadline = time.monotonic() + STORE_CREATE_WAIT
    while True:
        try:
            mlflow_client = MlflowClient(tracking_uri=uri)
            mlflow_client.search_experiments(max_results=1)  # the schema is whole
            return mlflow_client
        except Exception as e:
            if time.monotonic() > deadline:
                raise SweeperError(
                    f"cannot create the MLflow tracking store {redact_url(uri)}: {redact(first_line(e))}; another "
                    f"process kept changing its schema for over {STORE_CREATE_WAIT:.0f}s"
                ) from None
            log.info("the MLflow tracking store is being created by another process (%s); waiting", first_line(e))
            time.sleep(1.0)


class TrackingUnreachable(SweeperError):
    """The tracking store did not answer (down, network); it may come back."""


class TrackingAuthError(SweeperError):
    """The tracking server refused the credentials (401/403); waiting will not help."""


RETRY_SECONDS = 2  # between attempts while MLflow is unreachable


def retry_while_unreachable(attempt: Callable[[], T], deadline: float | None, should_stop, failed) -> T:
    """``attempt()`` until it returns, for the writes that outlive an outage (RunLogger.flush,
    log_model). After each failure ``failed(error)`` runs: it warns, or raises when the failure is
    not an outage. Past ``deadline`` (at once without one) or once ``should_stop()`` is true, the
    outage becomes TrackingUnreachable; until then the attempt is repeated every RETRY_SECONDS."""
    while True:
        try:
            return attempt()
        except Exception as e:
            failed(e)
            if deadline is None or time.monotonic() >= deadline or (should_stop is not None and should_stop()):
                raise TrackingUnreachable(f"MLflow stayed unreachable: {redact(first_line(e))}") from None
            time.sleep(RETRY_SECONDS)


def check_reachable(mlflow_client) -> None:
    """Raise a clear SweeperError when the tracking store cannot be used (down, 401/403)."""
    from mlflow.exceptions import MlflowException

    uri = (
        mlflow_client.tracking_uri
        if hasattr(mlflow_client, "tracking_uri")
        else mlflow_client._tracking_client.tracking_uri
    )
    try:
        mlflow_client.search_experiments(max_results=1)
    except Exception as e:
        if isinstance(e, MlflowException):
            text = str(e)
            code = getattr(e, "get_http_status_code", lambda: None)()
            if code not in (401, 403):
                code = next((c for c in (401, 403) if f"error code {c}" in text or f" {c} " in text), None)
            if code is not None:
                raise TrackingAuthError(
                    f"the MLflow tracking server {redact_url(uri)} refused the credentials (HTTP {code}); "
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a valid account "
                    "(MLFLOW_TRACKING_TOKEN for a bearer token)"
                ) from None
        raise TrackingUnreachable(
            f"cannot reach the MLflow tracking store {redact_url(uri)}: {redact(first_line(e))}"
        ) from None


@contextlib.contextmanager
def read_errors(uri: str, what: str) -> Iterator[None]:
    """MLflow failing in the middle of a command's reads (a server that went away, a dropped
    connection) becomes one clear TrackingUnreachable, never a traceback with the URL in it."""
    try:
        yield
    except SweeperError:
        raise
    except Exception as e:
        module = type(e).__module__.split(".")[0]
        if module not in ("mlflow", "requests", "urllib3") and not isinstance(e, OSError):
            raise
        raise TrackingUnreachable(
            f"cannot reach the MLflow tracking store {redact_url(uri)} while reading {what}: {redact(first_line(e))}"
        ) from None


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
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time ASC"]
    )
    return runs[0] if runs else None


def ensure_study_run(mlflow_client, experiment_id: str, spec: dict[str, Any]) -> str:
    """The parent run that holds the study's spec, report tables and plots."""
    run = find_run(mlflow_client, experiment_id, {ROLE_TAG: "study"})
    if run is not None:
        return run.info.run_id
    run = mlflow_client.create_run(
        experiment_id,
        run_name=spec["name"],
        tags={
            ROLE_TAG: "study",
            "optuna.study": spec["name"],
            "mlflow.note.content": spec.get("description") or f"sweeper study {spec['name']}",
        },
    )
    mlflow_client.log_dict(run.info.run_id, spec, "spec.json")
    return run.info.run_id


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
    """

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
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

    def log_artifact(self, local_path: str | Path, artifact_path: str) -> None:
        self.artifacts = [a for a in self.artifacts if a[0] != str(local_path)] + [(str(local_path), artifact_path)]

    def flush(self, deadline: float | None = None, should_stop=None) -> bool:
        """Send what is queued; True when everything went. With a deadline, retry until then
        (or until ``should_stop()``), then raise TrackingUnreachable."""
        pending = self.pending()
        try:
            retry_while_unreachable(self._send, deadline, should_stop, self._went_down)
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

    def _went_down(self, error: Exception) -> None:
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
            self.client.log_artifact(self.run_id, local, path)
            self.artifacts.pop(0)
        if self.inputs:
            self.client.log_inputs(self.run_id, datasets=self.inputs)
            self.inputs = []
        # One request for what fits in one batch (MLflow: 100 params, 100 tags, 1000 items in all).
        while self.params or self.tags or self.metrics:
            params, tags = self.params[:100], self.tags[:100]
            metrics = self.metrics[: 1000 - len(params) - len(tags)]
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)
            del self.params[: len(params)], self.tags[: len(tags)], self.metrics[: len(metrics)]


def model_name(key: str) -> str:
    """A cell's model name: its key with dashes for what MLflow refuses in a name
    (``short4/digits/s1`` -> ``short4-digits-s1``, a search trial's ``#3`` -> ``-3``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-")


def is_transport_error(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from: MLflow wraps the requests error it caught)
    is a failure to reach the server at all: refused, reset, timed out, no route."""
    import requests

    transport = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, transport):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _outage_or_raise(mlflow_client, what: str):
    """A ``failed`` callback for retry_while_unreachable: warns once while the store is
    unreachable, raises the error as it is when the store answers (not an outage)."""
    warned = False

    def failed(error: Exception) -> None:
        nonlocal warned
        try:
            if is_transport_error(error):  # whatever the store says now: it may have just come back
                raise TrackingUnreachable(str(error))
            check_reachable(mlflow_client)
        except TrackingUnreachable:
            if not warned:
                warned = True
                log.warning("MLflow is unreachable (%s); retrying to %s", redact(first_line(error)), what)
            return
        raise error

    return failed


def create_model(
    mlflow_client, run_id: str, name: str, params: dict[str, Any], tags: dict[str, str], deadline=None, should_stop=None
) -> str:
    """A cell's logged model, PENDING until ``log_model`` fills it: named after the cell, with its
    params and tags (the cell's metrics are linked as they are logged with its id)."""

    def attempt() -> str:
        experiment_id = mlflow_client.get_run(run_id).info.experiment_id
        params_ = {k: str(v) for k, v in params.items()}
        return mlflow_client.create_logged_model(
            experiment_id, name=name, source_run_id=run_id, params=params_, tags=tags
        ).model_id

    return retry_while_unreachable(attempt, deadline, should_stop, _outage_or_raise(mlflow_client, "create the model"))


def log_model(
    mlflow_client,
    run_id: str,
    model,
    example,
    step: int = 0,
    deadline=None,
    should_stop=None,
    model_id: str | None = None,
    weights: Path | None = None,
) -> str:
    """Log a cell's trained model (on the CPU, in eval mode) into the logged model ``model_id``
    (default: a new one named ``MODEL_NAME``), with a signature and ``example`` (a few input
    images, float32 numpy) as its input example; returns the model's id. The model is exported
    with torch.export ("pt2"): loading it needs torch and mlflow, not sweeper. ``weights`` (a file
    of ``cellmodel.save_weights``) goes with it as ``extra_files/weights.pt``: the trainable nn.Module
    (``sweeper.api.load_model``). The run's metrics at ``step`` are linked to the model.

    While the store is unreachable it retries until ``deadline`` (or ``should_stop()``), then
    raises TrackingUnreachable, like ``RunLogger.flush``; any other failure is raised as it is."""
    import mlflow
    import numpy
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    # Listed, not inferred: inference loads the model again in a subprocess (seconds per cell).
    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
    ]

    def attempt() -> str:
        nonlocal model_id
        if model_id is None:  # created once, in the run's experiment: a retry fills the same model
            experiment_id = mlflow_client.get_run(run_id).info.experiment_id
            model_id = mlflow_client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id).model_id
        with fluent_uri(mlflow_client.tracking_uri):
            mlflow.pytorch.log_model(
                model,
                name=MODEL_NAME,
                model_id=model_id,
                run_id=run_id,
                step=step,  # links the metrics of that epoch to the model
                signature=signature,
                input_example=example,
                serialization_format="pt2",
                pip_requirements=requirements,
                extra_files=[str(weights)] if weights is not None else None,
                # MLflow would load the saved model back and run the example through it: as
                # long again as the export for a big model. Loading is tested, not re-checked.
                validate_serving_input=False,
            )
        return model_id

    return retry_while_unreachable(attempt, deadline, should_stop, _outage_or_raise(mlflow_client, "log the model"))


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent functions (log_model, register_model) work through the process's tracking
    URI: point it at ``uri`` for the call, then leave the process as it was."""
    import mlflow

    before = settings.tracking_uri_variable()
    mlflow.set_tracking_uri(uri)  # sets the variable too
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # forgets it and unsets the variable
        if before is not None:
            os.environ[settings.ENV_TRACKING_URI] = before


def logged_model(mlflow_client, experiment_id: str, run_id: str):
    """A cell run's model: the newest READY one it logged, else its newest (None: none). Loads
    with ``mlflow.pytorch.load_model(f"models:/{model.model_id}")``."""
    found = mlflow_client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    return next((m for m in found if m.status.name == "READY"), found[0] if found else None)


def is_usable_model(model) -> bool:
    """Whether a logged model (``logged_model``'s answer) can be loaded: it exists and its upload
    finished (MLflow marks it READY)."""
    return model is not None and model.status.name == "READY"


def logged_steps(mlflow_client, run_id: str, metric: str = "top1_error") -> set[int]:
    return {m.step for m in mlflow_client.get_metric_history(run_id, metric)}
