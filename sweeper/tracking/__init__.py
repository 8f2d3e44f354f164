"""MLflow: one experiment per study, a parent run for the study, one run per grid cell.

Everything goes through ``MlflowClient`` with explicit run ids: the fluent API keeps one
global active run per process, which breaks as soon as two things log at once.

``connection``: the tracking URI, the client, reachability and the outage retry loop;
``runs``: experiments, runs, their tags and links, ``RunLogger``; ``models``: a cell's logged
model. The rest of sweeper uses the names below as ``tracking.NAME``.
"""

from sweeper.tracking.connection import (
    RETRY_SECONDS,
    SCHEMA_QUIET,
    STORE_CREATE_WAIT,
    TrackingAuthError,
    TrackingUnreachable,
    check_reachable,
    client,
    configure_http,
    default_tracking_uri,
    is_server,
    is_transport_error,
    outage_or_raise,
    read_errors,
    resolve_tracking_uri,
    retry_while_unreachable,
    unacknowledged_timeout,
)
from sweeper.tracking.models import (
    MODEL_NAME,
    create_model,
    fluent_uri,
    is_usable_model,
    log_model,
    logged_model,
    model_name,
)
from sweeper.tracking.runs import (
    CODE_DIGEST_TAG,
    DATASET_DIGEST_TAG,
    KEY_TAG,
    PARENT_TAG,
    RECIPE_TAG,
    ROLE_TAG,
    STUDY_RUN_STATUS,
    UI_DEFAULT,
    RunLogger,
    ensure_experiment,
    ensure_study_run,
    find_run,
    find_study_run,
    logged_steps,
    run_link,
    run_url,
    set_study_run_status,
)

__all__ = [
    "CODE_DIGEST_TAG",
    "DATASET_DIGEST_TAG",
    "KEY_TAG",
    "MODEL_NAME",
    "PARENT_TAG",
    "RECIPE_TAG",
    "RETRY_SECONDS",
    "ROLE_TAG",
    "RunLogger",
    "SCHEMA_QUIET",
    "STORE_CREATE_WAIT",
    "STUDY_RUN_STATUS",
    "TrackingAuthError",
    "TrackingUnreachable",
    "UI_DEFAULT",
    "check_reachable",
    "client",
    "configure_http",
    "create_model",
    "default_tracking_uri",
    "ensure_experiment",
    "ensure_study_run",
    "find_study_run",
    "find_run",
    "fluent_uri",
    "is_server",
    "is_transport_error",
    "is_usable_model",
    "log_model",
    "logged_model",
    "logged_steps",
    "model_name",
    "outage_or_raise",
    "read_errors",
    "resolve_tracking_uri",
    "retry_while_unreachable",
    "unacknowledged_timeout",
    "run_link",
    "run_url",
    "set_study_run_status",
]
