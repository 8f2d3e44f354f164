"""`sweeper verify`: does what MLflow holds match what Optuna says happened?

For every finished (COMPLETE) trial: its run exists, is active and FINISHED, is the only
finished run of its cell and recipe, logged each epoch's metrics exactly once and no step past
the last epoch, agrees with Optuna's value and intermediate values, has params equal to the
trial's recipe, and holds its MLflow model (READY, named after the cell). No cell's latest trial is
unfinished while its run is FINISHED, and no cell run lacks a trial.
Each problem names the cell, the trial and the run, and the command that repairs it when
one exists.

    >>> result = verify("quickstart")            # doctest: +SKIP
    >>> result["ok"], [p["check"] for p in result["problems"]]    # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from sweeper import tracking
from sweeper.names import KEY_ATTR, RECIPE_ATTR, SPEC_ATTR
from sweeper.redact import redact_url
from sweeper.spec import VAL_METRICS, decision_metric
from sweeper.storage import connect
from sweeper.trials import outcomes, summary

EPOCH_METRICS = ("train_loss", "test_loss", "top1_error", "top5_error")


def verify(study_name: str, storage_url: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.configure_http()
    study = connect.open_study(study_name, storage_url)
    client = tracking.client(uri, create=False)
    tracking.check_reachable(client)
    env = f"MLFLOW_TRACKING_URI={redact_url(uri)}"
    problems: list[dict[str, Any]] = []

    def problem(check: str, message: str, trial=None, run_id=None, repair=None, cell=None) -> None:
        problems.append(
            {
                "check": check,
                "cell": trial.user_attrs.get(KEY_ATTR) if trial is not None else cell,
                "trial": trial.number if trial is not None else None,
                "run_id": run_id,
                "message": message,
                "repair": repair,
            }
        )

    trials = study.get_trials(deepcopy=False)
    runs = _cell_runs(client, study_name)
    by_id = {r.info.run_id: r for r in runs}
    metric = (study.user_attrs.get(SPEC_ATTR) or {}).get("metric", "top1_error")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    for t in complete:
        _check_trial(client, t, by_id, metric, env, problem)
    latest = outcomes.latest_trials(trials, outcomes.by_key)
    for t in latest.values():  # the state each cell ended in, as Optuna and MLflow have it
        run = by_id.get(t.user_attrs.get("mlflow_run_id"))
        if run is not None and run.info.status == "FINISHED" and t.state.name != "COMPLETE":
            problem(
                "state_differs",
                f"trial {t.number} is {t.state.name} in Optuna but its run is FINISHED in MLflow (a worker "
                "finishing it right now would explain it: verify again)",
                t,
                run.info.run_id,
            )
    active = [r for r in runs if r.info.lifecycle_stage == "active"]
    claimed = {t.user_attrs.get("mlflow_run_id") for t in trials} - {None}
    _check_leftover_runs(active, claimed, study_name, env, problem)
    return {
        "study": study_name,
        "tracking_uri": redact_url(uri),
        "ok": not problems,
        "trials_checked": len(complete),
        "runs_checked": len(runs),
        "cells": summary.counts(list(latest.values())),  # by Optuna state
        "runs": dict(Counter(r.info.status for r in active)),  # by MLflow status
        "problems": problems,
    }


def _cell_runs(client, study_name: str) -> list:
    """Every cell run of the study's experiment, deleted ones too."""
    from mlflow.entities import ViewType

    experiment = client.get_experiment_by_name(study_name)
    runs: list = []
    token = None
    while experiment is not None:
        page = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{tracking.ROLE_TAG}` = 'cell'",
            run_view_type=ViewType.ALL,
            max_results=1000,
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            break
    return runs


def _check_trial(client, t, by_id: dict[str, Any], metric: str, env: str, problem) -> None:
    """One COMPLETE trial against its run."""
    from mlflow.exceptions import MlflowException

    run_id = t.user_attrs.get("mlflow_run_id")
    run = by_id.get(run_id)
    if run is None and run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
    if run is None:
        problem(
            "run_missing",
            f"trial {t.number} finished but its MLflow run {run_id or '(none recorded)'} does not exist "
            "(deleted for good, or logged to another tracking store)",
            t,
            run_id,
        )
        return
    if run.info.lifecycle_stage != "active":
        problem(
            "run_deleted",
            f"the run of trial {t.number} was deleted in MLflow",
            t,
            run_id,
            f"{env} mlflow runs restore --run-id {run_id}",
        )
    if run.info.status != "FINISHED":
        problem("run_not_finished", f"trial {t.number} is COMPLETE but its run is {run.info.status}", t, run_id)
    _check_epochs(client, t, run, problem)
    _check_value(client, t, run, decision_metric(metric, _recipe(t).get("val_fraction")), problem)
    _check_params(t, run, problem)
    model = tracking.logged_model(client, run.info.experiment_id, run_id)
    if not tracking.is_usable_model(model):
        state = "none" if model is None else f"{model.model_id} is {model.status.name}"
        problem(
            "model_missing",
            f"the run of trial {t.number} has no usable MLflow model ({state})",
            t,
            run_id,
        )


def _check_leftover_runs(active: list, claimed: set[str], study_name: str, env: str, problem) -> None:
    """Cells with several FINISHED runs, and runs that no trial claims."""

    def ident(r) -> tuple[str | None, str | None]:
        return r.data.tags.get(tracking.KEY_TAG), r.data.tags.get(tracking.RECIPE_TAG)

    identity = Counter(ident(r) for r in active if r.info.status == "FINISHED")
    for (key, digest), n in identity.items():
        if n > 1:
            extra = [
                r.info.run_id
                for r in active
                if ident(r) == (key, digest) and r.info.status == "FINISHED" and r.info.run_id not in claimed
            ]
            problem(
                "duplicate_runs",
                f"cell {key} (recipe {digest}) has {n} FINISHED runs, not one",
                repair=" && ".join(f"{env} mlflow runs delete --run-id {r}" for r in extra) or None,
                cell=key,
            )
    held = {ident(r) for r in active if r.info.run_id in claimed}
    for r in active:
        if r.info.run_id not in claimed:
            # A run whose cell another trial's run holds is a leftover; otherwise it may be the
            # only record of the cell's result (its trial was deleted): keep it, re-create the trial.
            repair = (
                f"{env} mlflow runs delete --run-id {r.info.run_id}"
                if ident(r) in held
                else f"sweeper launch --study SPEC (the spec of study {study_name}): it enqueues the cell again "
                "and its trial continues in this run; nothing is deleted"
            )
            problem(
                "run_without_trial",
                f"run {r.info.run_id} ({r.info.run_name}) belongs to no trial of study {study_name}",
                run_id=r.info.run_id,
                repair=repair,
                cell=r.data.tags.get(tracking.KEY_TAG),
            )


def _recipe(trial) -> dict[str, Any]:
    return {**(trial.user_attrs.get(RECIPE_ATTR) or {}), **trial.params}


def _check_epochs(client, trial, run, problem) -> None:
    recipe = _recipe(trial)
    epochs = int(recipe.get("epochs") or trial.user_attrs.get("sweeper.epochs") or 0)
    metrics = EPOCH_METRICS + (tuple(VAL_METRICS.values()) if recipe.get("val_fraction") else ())
    for name in metrics:
        steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, name))
        twice = sorted(s for s, n in steps.items() if n > 1)
        missing = sorted(set(range(1, epochs + 1)) - set(steps)) if epochs else []
        if twice:
            problem(
                "metric_duplicated",
                f"{name} is logged more than once for epoch(s) {', '.join(map(str, twice))}; the report and "
                "plots keep the latest value, MLflow's charts show both",
                trial,
                run.info.run_id,
            )
        extra = sorted(set(steps) - set(range(1, epochs + 1))) if epochs else []
        if extra:
            problem(
                "metric_extra_steps",
                f"{name} is logged for step(s) {', '.join(map(str, extra))}, past the trial's {epochs} epoch(s)",
                trial,
                run.info.run_id,
            )
        if missing:
            problem(
                "metric_missing",
                f"{name} is missing for epoch(s) {', '.join(map(str, missing))}",
                trial,
                run.info.run_id,
            )


def _check_value(client, trial, run, metric: str, problem) -> None:
    """The trial's Optuna value and intermediate values against the run's metric at each epoch
    (its latest value per step, as the report reads it): either store may have been edited."""
    logged: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.timestamp):
        logged[m.step] = m.value
    epochs = max(trial.intermediate_values, default=None)
    wrong = [
        f"epoch {step}: Optuna {value!r}, MLflow {logged.get(step)!r}"
        for step, value in sorted(trial.intermediate_values.items())
        if not _same(value, logged.get(step))
    ]
    if epochs is not None and not _same(trial.value, logged.get(epochs)):
        wrong.insert(0, f"value: Optuna {trial.value!r}, MLflow {logged.get(epochs)!r} at epoch {epochs}")
    if wrong:
        problem(
            "value_differs",
            f"trial {trial.number}'s {metric} in Optuna differs from its run's: {'; '.join(wrong)}",
            trial,
            run.info.run_id,
        )


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _check_params(trial, run, problem) -> None:
    ua = trial.user_attrs
    want = {k: str(v) for k, v in _recipe(trial).items()}
    want.update(variant=str(ua.get("variant")), dataset=str(ua.get("dataset")), seed=str(ua.get("seed")))
    have = run.data.params
    wrong = [f"{k}={have.get(k)!r} (trial: {v!r})" for k, v in sorted(want.items()) if have.get(k) != v]
    if wrong:
        problem(
            "params_differ",
            f"the run's params differ from trial {trial.number}'s recipe: {'; '.join(wrong)}",
            trial,
            run.info.run_id,
        )
