"""A study's trials summed up for `sweeper status`, the launch board and the API: counts by
state, one row per trial, and the failures grouped by cause."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

from sweeper import causes
from sweeper.names import (
    EPOCHS_ATTR,
    FAIL_REASON_ATTR,
    FAILED_TRIAL_ATTR,
    HOST_ATTR,
    KEY_ATTR,
    RETRY_HISTORY_ATTR,
    RUN_ID_ATTR,
    TOP1_ERROR_ATTR,
)
from sweeper.trials.outcomes import by_key, latest_trials

STATES = ("WAITING", "RUNNING", "COMPLETE", "PRUNED", "FAIL")


def counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    c = Counter(t.state.name for t in trials)
    return {state: c.get(state, 0) for state in STATES}


def last_epoch(trial: optuna.trial.FrozenTrial) -> int | None:
    """The latest epoch the trial reported to Optuna (the worker reports every epoch)."""
    return max(trial.intermediate_values, default=None)


def trial_rows(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    """One row per trial for `sweeper status` and the launch board."""
    rows = []
    now = time.time()
    for t in trials:
        ua, sa = t.user_attrs, t.system_attrs
        start = t.datetime_start.timestamp() if t.datetime_start else None
        end = t.datetime_complete.timestamp() if t.datetime_complete else None
        epoch = last_epoch(t)
        rows.append(
            {
                "number": t.number,
                "cell": ua.get(KEY_ATTR),
                "state": t.state.name,
                "epoch": epoch,
                "epochs": ua.get(EPOCHS_ATTR),
                "top1_error": ua.get(TOP1_ERROR_ATTR, t.intermediate_values.get(epoch)),
                "value": t.value if t.state == TrialState.COMPLETE else None,
                "host": ua.get(HOST_ATTR),
                "elapsed_s": round((end or now) - start, 1) if start else None,
                "retry_of": sa.get(FAILED_TRIAL_ATTR),
                "retry_history": sa.get(RETRY_HISTORY_ATTR, []),
                "fail_reason": sa.get(FAIL_REASON_ATTR),
                "mlflow_run_id": ua.get(RUN_ID_ATTR),
            }
        )
    return rows


def failure_cause(reason: str | None, code: str | None = None) -> tuple[str, str | None]:
    """(cause, fix) of a failed trial's stored cause code and reason (sweeper.causes)."""
    return causes.name(code, reason)


def failure_groups(trials: list[optuna.trial.FrozenTrial], max_retries: int) -> list[dict[str, Any]]:
    """FAILed trials grouped by cause: how many trials, how many cells failed for good, the fix."""
    return causes.groups(trials, list(latest_trials(trials, by_key).values()), max_retries)
