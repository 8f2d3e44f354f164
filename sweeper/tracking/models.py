"""A finished cell's MLflow logged model: created PENDING with its params, filled by
``log_model``, looked up again by ``logged_model``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sweeper import settings
from sweeper.tracking.connection import create_once, is_transport_error, outage_or_raise, retry_while_unreachable

log = logging.getLogger("sweeper.tracking")

MODEL_NAME = "model"  # what cells finished by older sweepers named their model; see model_name()


def model_name(key: str) -> str:
    """A cell's model name: its key with dashes for what MLflow refuses in a name
    (``short4/digits/s1`` -> ``short4-digits-s1``, a search trial's ``#3`` -> ``-3``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-")


def create_model(
    mlflow_client,
    experiment_id: str,
    run_id: str,
    name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    deadline=None,
    should_stop=None,
):
    """A cell's logged model (MLflow's LoggedModel: its ``model_id``, its ``artifact_location``) in
    its run's experiment, PENDING until ``log_model`` fills it: named after the cell, with its
    params and tags (the cell's metrics are linked as they are logged with its id)."""

    params_ = {k: str(v) for k, v in params.items()}
    tries = 0

    def made() -> list:
        return mlflow_client.search_logged_models(
            [experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": True}],
        )

    def attempt():
        nonlocal tries
        tries += 1
        return create_once(  # made once, though the POST be sent again; an earlier try's copy found too
            lambda: mlflow_client.create_logged_model(
                experiment_id, name=name, source_run_id=run_id, params=params_, tags=tags
            ),
            made,
            ident=lambda m: m.model_id,
            droppable=lambda m: m.status.name == "PENDING",
            drop=mlflow_client.delete_logged_model,
            look=tries > 1,
        )

    return retry_while_unreachable(attempt, deadline, should_stop, outage_or_raise(mlflow_client, "create the model"))


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
    metrics_linked: bool = False,
    artifact_location: str | None = None,
) -> str:
    """Log a cell's trained model (on the CPU, in eval mode) into the logged model ``model_id``
    (default: a new one named ``MODEL_NAME``), with a signature and ``example`` (a few input
    images, float32 numpy) as its input example; returns the model's id. The model is exported
    with torch.export ("pt2"): loading it needs torch and mlflow, not sweeper. ``weights`` (a file
    of ``cellmodel.save_weights``) goes with it as ``extra_files/weights.pt``: the trainable nn.Module
    (``sweeper.api.load_model``). The model is the run's output at ``step``, and the run's metrics
    at ``step`` are linked to it: by MLflow, which reads the whole history of each of the run's
    metrics for it (a request per metric), unless ``metrics_linked`` says the caller logged them
    with the model's id already. Given the model's ``artifact_location`` too (a model created by
    ``create_model``), its files go straight to it and the model is marked READY: what MLflow's
    log_model does, less its two reads of the logged model.

    While the store is unreachable it retries until ``deadline`` (or ``should_stop()``), then
    raises TrackingUnreachable, like ``RunLogger.flush``; any other failure is raised as it is."""
    import mlflow
    import numpy
    import torch
    from mlflow.entities import LoggedModelOutput
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
        if metrics_linked:  # what MLflow's log_model does with a run_id, less its metric reads
            _log_output_once(mlflow_client, run_id, LoggedModelOutput(model_id, step))
        saved = {
            "signature": signature,
            "input_example": example,
            "serialization_format": "pt2",
            "pip_requirements": requirements,
            "extra_files": [str(weights)] if weights is not None else None,
        }
        with fluent_uri(mlflow_client.tracking_uri):
            if metrics_linked and artifact_location is not None:
                _save_and_upload(mlflow_client, model, model_id, artifact_location, saved)
                return model_id
            mlflow.pytorch.log_model(
                model,
                name=MODEL_NAME,
                model_id=model_id,
                run_id=None if metrics_linked else run_id,
                step=step,  # the run's output at that step, its metrics at that step linked
                # MLflow would load the saved model back and run the example through it: as
                # long again as the export for a big model. Loading is tested, not re-checked.
                validate_serving_input=False,
                **saved,
            )
        return model_id

    return retry_while_unreachable(attempt, deadline, should_stop, outage_or_raise(mlflow_client, "log the model"))


def _log_output_once(mlflow_client, run_id: str, output) -> None:
    """``log_outputs`` for one model, once: a copy sent again after its answer was lost (by MLflow's
    HTTP session, which re-sends a POST after a read timeout, or by a retry after a transport
    error) is refused by the store's unique key; then the run's outputs say whether it is there."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.log_outputs(run_id, [output])
    except MlflowException as e:
        if is_transport_error(e):
            raise
        logged = mlflow_client.get_run(run_id).outputs.model_outputs or []
        if not any((o.model_id, o.step) == (output.model_id, output.step) for o in logged):
            raise


def _save_and_upload(mlflow_client, model, model_id: str, artifact_location: str, saved: dict[str, Any]) -> None:
    """The model saved in MLflow's format (its MLmodel names the logged model, as log_model's
    does), its files uploaded to the model's artifact location, the model marked READY."""
    import tempfile

    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with tempfile.TemporaryDirectory(prefix="sweeper-mlmodel-") as tmp:
        path = os.path.join(tmp, "model")
        described = Model(artifact_path=artifact_location, model_uuid=model_id, model_id=model_id)
        mlflow.pytorch.save_model(model, path, mlflow_model=described, **saved)
        get_artifact_repository(artifact_location).log_artifacts(path)
    mlflow_client.finalize_logged_model(model_id, LoggedModelStatus.READY)


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
