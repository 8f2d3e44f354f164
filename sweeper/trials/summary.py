"""A study's trials summed up for `sweeper status`, the launch board and the API: counts by
state, one row per trial, and the failures grouped by cause."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

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
from sweeper.trials.outcomes import by_key, failed_for_good, latest_trials

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


# Known causes of failure: (pattern in the recorded reason, cause, fix).
FAILURE_CAUSES = (
    (r"loss became (nan|inf)", "non-finite loss", "lower [train] lr (or use another optimizer), then `sweeper retry`"),
    (r"out of memory", "out of memory", "lower [train] batch_size or use a larger GPU, then `sweeper retry`"),
    (
        r"no heartbeat",
        "worker lost",
        "a worker was killed or lost its host (look for the OOM killer in `dmesg`); the trial is retried by itself",
    ),
    (r"MLflow .* unreachable", "tracking outage", "check the MLflow server (`sweeper doctor`); the trial is retried"),
    (r"trial_timeout", "trial timeout", "raise [policy] trial_timeout or lower [train] epochs"),
    (r"stopped by a signal", "worker stopped", None),
    (r"study cancelled", "study cancelled", "`sweeper resume` continues the handed-back trials"),
)


def failure_cause(reason: str | None) -> tuple[str, str | None]:
    """(cause, fix) of a recorded fail reason; an unknown one is named by its first words."""
    import re

    text = reason or "no reason recorded"
    for pattern, cause, fix in FAILURE_CAUSES:
        if re.search(pattern, text):
            return cause, fix
    head = re.split(r"[:;(]", text, maxsplit=1)[0].strip()
    return re.sub(r"\d+", "N", head)[:80], None


def failure_groups(trials: list[optuna.trial.FrozenTrial], max_retries: int) -> list[dict[str, Any]]:
    """FAILed trials grouped by cause: how many trials, how many cells failed for good, the fix."""
    for_good = {t.number for t in latest_trials(trials, by_key).values() if failed_for_good(t, max_retries)}
    groups: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        reason = t.system_attrs.get(FAIL_REASON_ATTR)
        cause, fix = failure_cause(reason)
        if cause == "study cancelled":  # handed back, continued by its copy: nothing failed
            continue
        group = groups.setdefault(
            cause, {"cause": cause, "trials": 0, "cells_failed_for_good": 0, "fix": fix, "example": reason}
        )
        group["trials"] += 1
        group["cells_failed_for_good"] += t.number in for_good
    return sorted(groups.values(), key=lambda g: (-g["cells_failed_for_good"], -g["trials"]))
