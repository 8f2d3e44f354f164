"""A dead worker's trial: Optuna fails it once its heartbeat is stale, and this retries it.

Here, beside the storage that installs it, because it sets a private attribute of Optuna's
callback (the retry limit, per study)."""

from __future__ import annotations

import copy
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from sweeper.names import SPEC_ATTR

MAX_RETRY = 3  # retries of a trial whose worker died


def policy(spec: dict[str, Any], default_max_retries: int = MAX_RETRY) -> dict[str, Any]:
    """The study's ``[policy]`` with defaults filled in."""
    given = spec.get("policy") or {}
    return {
        "max_retries": given.get("max_retries", default_max_retries),
        "max_failed_cells": given.get("max_failed_cells"),
        "trial_timeout": given.get("trial_timeout"),
    }


class RetryCallback(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial (a copy in WAITING with the same params and user attrs,
    ``mlflow_run_id`` included, so the retry continues the cell's run), minus the failed
    attempt's own ``sweeper.*`` system attrs (its fail reason is not the retry's)."""

    def __init__(self, max_retry: int = MAX_RETRY):
        super().__init__(max_retry=max_retry)
        self.default_max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("sweeper.")}
        # The study's own [policy] max_retries; one storage (and callback) serves many studies.
        self._max_retry = policy(study.user_attrs.get(SPEC_ATTR) or {}, self.default_max_retry)["max_retries"]
        super().__call__(study, trial)
