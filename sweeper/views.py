"""MLflow UI links that open ready to compare, with no click: the study's cells as rows with the
seed's columns, best first, and two (or more) cells or variants side by side.

The MLflow UI restores a "shared view" from an experiment tag ``mlflow.sharedViewState.KEY`` when
its runs page is opened with ``?viewStateShareKey=KEY`` (and no search facet in the URL): the
search filter, the sort, the visible columns and their order. sweeper writes that tag, then
prints the link. Where the tag cannot be written (a read-only account on a server), the link
carries the filter and the sort in its query and the columns are the UI's defaults.

    >>> study_state({"train": {}, "metric": "top1_error"}, "6f23b34c975d")["orderByKey"]
    'metrics.`top1_error`'
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any
from urllib.parse import urlencode

from sweeper import tracking
from sweeper.errors import SweeperError, first_line
from sweeper.redact import redact
from sweeper.spec import decision_metric

log = logging.getLogger("sweeper.views")

SHARE_TAG = "mlflow.sharedViewState."  # MLflow UI: the tag a shared view is read from
STUDY_VIEW = "sweeper"  # the share key of a study's comparison
COMPARE_COLUMNS = ("top1_error", "top5_error", "num_params", "macs", "train_seconds")
PARAM_COLUMNS = ("variant", "dataset")
# Column widths in pixels: the five metrics stay in view beside MLflow's assistant panel on a
# 1,600-pixel screen.
METRIC_WIDTH, PARAM_WIDTH = 100, 80


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # MLflow UI's canonical column key


def study_state(spec: dict[str, Any], recipe_digest: str | None, run_ids: list[str] | None = None) -> dict[str, Any]:
    """The shared view of a study: its cell runs (of the current recipe, or exactly ``run_ids``),
    the study's metric, the seed's columns and the variant, sorted best first."""
    metric = decision_metric(spec.get("metric", "top1_error"), (spec.get("train") or {}).get("val_fraction", 0))
    metrics = list(dict.fromkeys([metric, *COMPARE_COLUMNS]))
    columns = [_column("metrics", m) for m in metrics] + [_column("params", p) for p in PARAM_COLUMNS]
    if run_ids:
        search = "attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")"
    else:
        search = f"tags.`{tracking.ROLE_TAG}` = 'cell'"
        if recipe_digest:
            search += f" and tags.`{tracking.RECIPE_TAG}` = '{recipe_digest}'"
    return {
        "searchFilter": search,
        "orderByKey": _column("metrics", metric),
        "orderByAsc": spec.get("direction", "minimize") != "maximize",
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {c: METRIC_WIDTH if c.startswith("metrics") else PARAM_WIDTH for c in columns},
    }


def share(client, experiment_id: str, key: str, state: dict[str, Any]) -> bool:
    """Write the shared view ``key`` of the experiment (unless it holds it already); False when
    it could not be written."""
    value = json.dumps(state, sort_keys=True)
    try:
        experiment = client.get_experiment(experiment_id)
        if experiment.tags.get(SHARE_TAG + key) != value:
            client.set_experiment_tag(experiment_id, SHARE_TAG + key, value)
        return True
    except Exception as e:  # a read-only account: the link still filters and sorts
        log.warning(
            "could not save the MLflow view %s (%s); the link opens with MLflow's columns", key, redact(first_line(e))
        )
        return False


def link(base: str, experiment_id: str, key: str, state: dict[str, Any], shared: bool) -> str:
    """The runs page of the experiment in the shared view ``key``, or, when it is not ``shared``,
    with the filter and sort of ``state`` in the query."""
    query: dict[str, Any] = {"workflowType": "machine_learning"}
    if shared:
        query["viewStateShareKey"] = key
    else:
        query.update(
            searchFilter=state["searchFilter"],
            orderByKey=state["orderByKey"],
            orderByAsc=str(state["orderByAsc"]).lower(),
        )
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def study_link(client, base: str, experiment, spec: dict[str, Any], recipe_digest: str | None) -> str:
    """The link that opens on every cell of the study, best first (see the module's doc)."""
    state = study_state(spec, recipe_digest)
    shared = share(client, experiment.experiment_id, STUDY_VIEW, state)
    return link(base, experiment.experiment_id, STUDY_VIEW, state, shared)


def compare_link(client, base: str, experiment, spec: dict[str, Any], run_ids: list[str]) -> str:
    """The link that opens on exactly ``run_ids``, side by side with the seed's columns."""
    state = study_state(spec, None, sorted(run_ids))
    key = "sweeper-compare-" + hashlib.sha256(" ".join(sorted(run_ids)).encode()).hexdigest()[:12]
    shared = share(client, experiment.experiment_id, key, state)
    return link(base, experiment.experiment_id, key, state, shared)


def compare_runs_page(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page (every param and metric, one column per run)."""
    runs = json.dumps(sorted(run_ids), separators=(",", ":"))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={json.dumps([experiment_id])}"


def pick_runs(frame, wanted: str) -> list[str]:
    """The run ids of ``wanted`` ("A,B": variants, or cells as variant/dataset/sSEED) among the
    report's rows ``frame``; a name the study does not hold is a SweeperError."""
    names = [part.strip() for part in wanted.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise SweeperError(f"--compare takes two or more different variants or cells as A,B, got {wanted!r}")
    keys = frame["variant"].astype(str) + "/" + frame["dataset"].astype(str) + "/s" + frame["seed"].astype(str)
    run_ids: list[str] = []
    for name in names:
        rows = frame[(keys == name) if "/" in name else (frame["variant"] == name)]
        found = [r for r in rows["mlflow_run_id"] if isinstance(r, str)]
        if not found:
            known = ", ".join(sorted(set(frame["variant"].dropna())))
            raise SweeperError(
                f"--compare: {name!r} is not a variant or cell of this study with an MLflow run; its variants: "
                f"{known or 'none yet'} (a cell is variant/dataset/sSEED, e.g. {keys.iloc[0] if len(keys) else 'short4/digits/s1'})"
            )
        run_ids += found
    return list(dict.fromkeys(run_ids))
