"""Reading a study into the report's frame: one row per grid cell (variant x dataset x seed).

The cell's state comes from Optuna (its latest trial), its numbers from the cell's MLflow run.
Runs are read with paged ``search_runs`` calls (a thousand per page, latest metric values
included), never one request per run; the per-epoch history (``epoch_histories``) is read only
when the per-epoch plot is asked for.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sweeper import tracking
from sweeper.contract import VARIANTS
from sweeper.errors import SweeperError
from sweeper.names import KEY_ATTR, RECIPE_DIGEST_ATTR, SPEC_ATTR
from sweeper.redact import redact, redact_url
from sweeper.spec import decision_metric
from sweeper.storage import connect
from sweeper.trials import outcomes

VARIANT_ORDER = tuple(VARIANTS)  # the seed post's row order
DATASET_ORDER = ("cifar100", "cifar10", "digits", "synthetic")  # the seed's table order, then ours
FRAME_COLUMNS = [
    "variant",
    "dataset",
    "seed",
    "state",
    "top1_error",
    "top5_error",
    "val_top1_error",
    "val_top5_error",
    "params",
    "macs",
    "train_seconds",
    "images_per_s",
    "mlflow_run_id",
    "n_seeds",
    "top1_error_mean",
    "top1_error_std",
    "recipe",
    "code_digest",
    "dataset_digest",
]
DEFAULT_EPOCHS = 14
CELL_FILTER = f"tags.`{tracking.ROLE_TAG}` = 'cell'"
PAGE_SIZE = 1000
DONE = "COMPLETE"


@dataclass
class Collected:
    """A study's cells and where they came from."""

    study: str
    frame: pd.DataFrame
    epochs: int
    tracking_uri: str
    experiment_id: str | None = None
    parent_run_id: str | None = None
    datasets: list[str] = field(default_factory=list)
    client: Any = None
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)  # run id -> (cell key, Optuna value)
    spec: dict[str, Any] = field(default_factory=dict)  # the study's stored spec


def build_frame(study_name: str, storage_url: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per grid cell of the study, columns ``FRAME_COLUMNS``.

    ``frame.attrs`` carries ``study``, ``epochs`` (from the stored spec, default 14),
    ``experiment_id`` and ``parent_run_id``. Raises SweeperError for an unknown study.
    """
    return collect(study_name, storage_url, tracking_uri).frame


@contextlib.contextmanager
def _gc_paused():
    """Reading thousands of runs builds hundreds of thousands of short-lived ORM objects; the
    cyclic collector's passes over them cost more than the read itself (2-3x on 1,000 runs)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect(
    study_name: str, storage_url: str | None = None, tracking_uri: str | None = None, recipe: str = "current"
) -> Collected:
    """The study's cells (see build_frame) plus the MLflow client and ids the plots need.

    ``recipe``: "current" (the rows of the recipe the study was last launched with), "all" (a
    row per cell and recipe), or a recipe digest (or its first characters)."""
    with _gc_paused():
        return _collect(study_name, storage_url, tracking_uri, recipe)


def _collect(study_name: str, storage_url: str | None, tracking_uri: str | None, recipe: str = "current") -> Collected:
    url = connect.resolve_storage_url(storage_url)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.configure_http()
    study = connect.open_study(study_name, url)
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    epochs = int((spec.get("train") or {}).get("epochs") or DEFAULT_EPOCHS)
    trials = _cell_trials(study.get_trials(deepcopy=False), spec)
    trials = _of_recipe(trials, recipe, study.user_attrs.get(RECIPE_DIGEST_ATTR))

    client = tracking.client(uri, create=False)
    experiment = _experiment(client, study_name, uri)
    runs_by_id: dict[str, Any] = {}
    runs_by_key: dict[str, Any] = {}
    parent_run_id = None
    if experiment is not None:
        for run in search_cell_runs(client, experiment.experiment_id):
            runs_by_id[run.info.run_id] = run
            tags = run.data.tags
            runs_by_key.setdefault((tags.get(tracking.KEY_TAG), tags.get(tracking.RECIPE_TAG)), run)
        parent = tracking.find_run(client, experiment.experiment_id, {tracking.ROLE_TAG: "study"})
        parent_run_id = parent.info.run_id if parent else None
    elif trials:
        note(f"no MLflow experiment named {study_name!r} in {redact_url(uri)}: no cell has logged anything yet")

    rows = []
    finished = {}
    for trial in trials:
        ua = trial.user_attrs
        digest = ua.get(RECIPE_DIGEST_ATTR)
        run = runs_by_id.get(ua.get("mlflow_run_id")) or runs_by_key.get((ua.get(KEY_ATTR), digest))
        if run is not None and trial.state.name == DONE and trial.value is not None:
            finished[run.info.run_id] = (ua.get(KEY_ATTR), trial.value)
        metrics = run.data.metrics if run is not None else {}
        tags = run.data.tags if run is not None else {}
        rows.append(
            {
                "variant": ua.get("variant"),
                "dataset": ua.get("dataset"),
                "seed": _int(ua.get("seed")),
                "state": trial.state.name,
                "top1_error": metrics.get("top1_error"),
                "top5_error": metrics.get("top5_error"),
                "val_top1_error": metrics.get("val_top1_error"),
                "val_top5_error": metrics.get("val_top5_error"),
                "params": _int(metrics.get("num_params")),
                "macs": _int(metrics.get("macs")),
                "train_seconds": metrics.get("train_seconds"),
                "images_per_s": metrics.get("images_per_s"),
                "mlflow_run_id": run.info.run_id if run is not None else ua.get("mlflow_run_id"),
                "recipe": digest,
                "code_digest": tags.get(tracking.CODE_DIGEST_TAG),
                "dataset_digest": tags.get(tracking.DATASET_DIGEST_TAG),
            }
        )
    frame = with_seed_stats(_typed(pd.DataFrame(rows, columns=FRAME_COLUMNS)))
    datasets = list((spec.get("grid") or {}).get("dataset") or [])
    frame = sort_frame(frame, datasets)
    frame.attrs.update(
        study=study_name,
        epochs=epochs,
        decided_by=decision_metric(spec.get("metric", "top1_error"), (spec.get("train") or {}).get("val_fraction", 0)),
        direction=spec.get("direction", "minimize"),
        experiment_id=experiment.experiment_id if experiment else None,
        parent_run_id=parent_run_id,
    )
    return Collected(
        study_name,
        frame,
        epochs,
        uri,
        experiment.experiment_id if experiment else None,
        parent_run_id,
        datasets,
        client,
        finished,
        spec,
    )


def search_cell_runs(client, experiment_id: str) -> list[Any]:
    """Every cell run of an experiment, a page of ``PAGE_SIZE`` at a time (latest metrics included)."""
    from mlflow.entities import ViewType

    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=CELL_FILTER,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=PAGE_SIZE,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(client, name: str, uri: str):
    try:
        return client.get_experiment_by_name(name)
    except Exception as e:  # a down server or bad credentials: say which store
        tracking.check_reachable(client)  # raises the clear message when the store is the problem
        raise SweeperError(f"cannot read the MLflow experiment {name!r} from {redact_url(uri)}: {redact(e)}") from None


def _of_recipe(trials: list, recipe: str, current: str | None) -> list:
    """The trials of one recipe ("current": the study's latest; "all": every recipe)."""
    if recipe == "all":
        return trials
    want = current if recipe == "current" else recipe
    if want is None:  # a study launched before recipes had digests
        return trials
    kept = [t for t in trials if (t.user_attrs.get(RECIPE_DIGEST_ATTR) or "").startswith(want)]
    if recipe != "current" and not kept:
        digests = sorted({t.user_attrs.get(RECIPE_DIGEST_ATTR) or "none" for t in trials})
        raise SweeperError(f"no trial with recipe {recipe!r}; this study's recipes: {', '.join(digests)}")
    hidden = {t.user_attrs.get(RECIPE_DIGEST_ATTR) for t in trials} - {want}
    if recipe == "current" and len(kept) < len(trials):
        note(
            f"{len(trials) - len(kept)} row(s) of {len(hidden)} earlier recipe(s) not shown "
            "(--recipe all shows every recipe as its own rows)"
        )
    return kept


def _cell_trials(trials, spec: dict[str, Any]) -> list:
    """The trial that speaks for each grid cell and recipe: the latest trial of each trial key
    (a retry replaces the trial it retries); in a search study, the best finished trial."""
    latest = outcomes.latest_trials(trials, outcomes.by_key_and_recipe)
    by_cell: dict[tuple, list] = {}
    for t in latest.values():
        ua = t.user_attrs
        cell = (ua.get("variant"), ua.get("dataset"), _int(ua.get("seed")), ua.get(RECIPE_DIGEST_ATTR))
        by_cell.setdefault(cell, []).append(t)
    maximize = spec.get("direction") == "maximize"
    chosen = []
    for group in by_cell.values():
        done = [t for t in group if t.state.name == DONE and t.value is not None]
        if len(group) == 1 or not done:
            chosen.append(max(group, key=lambda t: t.number))
        else:
            chosen.append((max if maximize else min)(done, key=lambda t: t.value))
    return chosen


def _int(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for col in ("seed", "params", "macs"):
        frame[col] = frame[col].astype("Int64")
    for col in ("top1_error", "top5_error", "val_top1_error", "val_top5_error", "train_seconds", "images_per_s"):
        frame[col] = frame[col].astype("float64")
    for col in ("variant", "dataset", "state", "mlflow_run_id", "recipe", "code_digest", "dataset_digest"):
        frame[col] = frame[col].astype(object)
    return frame


def with_seed_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row gets its cell's statistics over the finished seeds of the same variant, dataset
    and recipe: ``n_seeds``, ``top1_error_mean`` and ``top1_error_std`` (sample std; None for one seed)."""
    frame = frame.copy()
    frame["n_seeds"], frame["top1_error_mean"], frame["top1_error_std"] = 0, math.nan, math.nan
    keys = [frame["dataset"], frame["variant"], frame["recipe"].fillna("")]
    for _, index in frame.groupby(keys, sort=False).groups.items():
        group = frame.loc[index]
        done = group.loc[group["state"] == DONE, "top1_error"].dropna()
        frame.loc[index, "n_seeds"] = len(done)
        if len(done):
            frame.loc[index, "top1_error_mean"] = done.mean()
        if len(done) > 1:
            frame.loc[index, "top1_error_std"] = done.std(ddof=1)
    frame["n_seeds"] = frame["n_seeds"].astype("Int64")
    return frame


def _rank(values, order) -> dict[str, int]:
    ranks = {v: i for i, v in enumerate(order)}
    return {v: ranks.get(v, len(ranks)) for v in values}


def sort_frame(frame: pd.DataFrame, datasets: list[str] | None = None) -> pd.DataFrame:
    """Datasets in spec order (else the seed's), variants in the seed's order, then seeds."""
    if frame.empty:
        return frame.reset_index(drop=True)
    dataset_order = list(datasets or []) + [d for d in DATASET_ORDER if d not in (datasets or [])]
    d_rank = _rank(frame["dataset"].unique(), dataset_order)
    v_rank = _rank(frame["variant"].unique(), VARIANT_ORDER)
    keys = pd.DataFrame(
        {
            "d": frame["dataset"].map(d_rank),
            "dn": frame["dataset"].astype(str),
            "v": frame["variant"].map(v_rank),
            "vn": frame["variant"].astype(str),
            "s": frame["seed"].fillna(-1).astype("int64"),
            "r": frame["recipe"].fillna("").astype(str) if "recipe" in frame.columns else "",
        }
    )
    order = keys.sort_values(["d", "dn", "v", "vn", "r", "s"], kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def epoch_histories(client, frame: pd.DataFrame, metric: str = "top1_error") -> dict[str, list[tuple[int, float]]]:
    """run id -> [(epoch, value)] for the per-epoch plot (one history request per run)."""
    out = {}
    for run_id in frame["mlflow_run_id"].dropna().unique():
        try:
            history = client.get_metric_history(run_id, metric)
        except Exception as e:  # a run deleted meanwhile: leave it out of the plot
            note(f"no {metric} history for run {run_id}: {redact(e)}")
            continue
        latest: dict[int, tuple[int, float]] = {}
        for m in history:  # a retried epoch may be logged twice: keep its latest value
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        out[run_id] = sorted((step, v) for step, (_, v) in latest.items())
    return out


def note(message: str) -> None:
    """A line for the person running the command, on stderr (stdout holds the report)."""
    print(message, file=sys.stderr, flush=True)
