"""The links that open MLflow ready to compare (sweeper.views) and the cells as Optuna params,
without servers: tests/test_ui_browser.py opens the links in Chromium."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import optuna
import pandas as pd
import pytest

from sweeper import views
from sweeper.errors import SweeperError
from sweeper.storage import connect, internals
from sweeper.trials import claims

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPEC = {"metric": "top1_error", "direction": "minimize", "train": {}, "grid": {}}


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(urlsplit(url).fragment).query)


def test_study_view_filters_the_cells_of_the_recipe_and_sorts_best_first():
    state = views.study_state(SPEC, "abc123")
    assert state["searchFilter"] == "tags.`sweeper.role` = 'cell' and tags.`sweeper.recipe_digest` = 'abc123'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`top1_error`", True)
    metrics = ["top1_error", "top5_error", "num_params", "macs", "train_seconds"]
    assert (
        state["selectedColumns"]
        == state["columnOrder"]
        == [f"metrics.`{m}`" for m in metrics]
        + [
            "params.`variant`",
            "params.`dataset`",
        ]
    )
    decided = views.study_state({**SPEC, "direction": "maximize", "train": {"val_fraction": 0.1}}, None)
    assert decided["searchFilter"] == "tags.`sweeper.role` = 'cell'"
    assert (decided["orderByKey"], decided["orderByAsc"]) == ("metrics.`val_top1_error`", False)
    assert decided["columnOrder"][:2] == ["metrics.`val_top1_error`", "metrics.`top1_error`"]
    exact = views.study_state(SPEC, "abc123", ["r2", "r1"])
    assert exact["searchFilter"] == "attributes.run_id IN ('r2', 'r1')"


def test_link_names_the_shared_view_else_carries_the_filter_and_sort():
    state = views.study_state(SPEC, None)
    shared = views.link("http://127.0.0.1:5000/", "7", "sweeper", state, shared=True)
    assert shared.startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    # MLflow ignores a shared view when the URL holds any search facet: the key comes alone.
    assert _query(shared) == {"workflowType": ["machine_learning"], "viewStateShareKey": ["sweeper"]}
    plain = _query(views.link("http://127.0.0.1:5000", "7", "sweeper", state, shared=False))
    assert plain["searchFilter"] == [state["searchFilter"]] and plain["orderByAsc"] == ["true"]
    assert "viewStateShareKey" not in plain


class Experiments:
    """The two calls views.share makes, on an experiment's tags."""

    def __init__(self, refuse: bool = False):
        self.tags: dict[str, str] = {}
        self.writes = 0
        self.refuse = refuse

    def get_experiment(self, experiment_id):
        return type("Experiment", (), {"tags": dict(self.tags)})()

    def set_experiment_tag(self, experiment_id, key, value):
        if self.refuse:
            raise PermissionError("403 Forbidden")
        self.writes += 1
        self.tags[key] = value


def test_share_writes_the_view_once_and_a_refusal_is_no_failure():
    state = views.study_state(SPEC, None)
    client = Experiments()
    assert views.share(client, "1", "sweeper", state) and views.share(client, "1", "sweeper", state)
    assert client.writes == 1 and json.loads(client.tags["mlflow.sharedViewState.sweeper"]) == state
    assert views.share(Experiments(refuse=True), "1", "sweeper", state) is False


def test_pick_runs_takes_variants_or_cells_and_names_what_is_missing():
    frame = pd.DataFrame(
        {
            "variant": ["short4", "short4", "short3", "naive"],
            "dataset": ["digits"] * 4,
            "seed": [1, 2, 1, 1],
            "mlflow_run_id": ["a", "b", "c", None],
        }
    )
    assert views.pick_runs(frame, "short4,short3") == ["a", "b", "c"]
    assert views.pick_runs(frame, "short4/digits/s2, short3/digits/s1") == ["b", "c"]
    with pytest.raises(SweeperError, match="'naive' is not a variant or cell of this study with an MLflow run"):
        views.pick_runs(frame, "short4,naive")
    with pytest.raises(SweeperError, match="two or more different"):
        views.pick_runs(frame, "short4")


def test_cell_params_are_written_as_they_are_never_sampled(tmp_path):
    """A cell's variant, dataset and seed become categorical params over the grid, whatever the
    sampler; a value the study's earlier distribution cannot hold is left out, without an error."""
    storage = connect.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name="s", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    spec = {"grid": {"variant": ["short4", "short3", "short2"], "dataset": ["digits"], "seed": [1, 2]}}
    cells = [{"variant": v, "dataset": "digits", "seed": s} for v in ("short2", "short3") for s in (2, 1)]
    internals.enqueue_many(study, cells)
    for attrs in cells:
        trial_id = claims.claim(study)
        internals.set_cell_params(study, trial_id, spec, attrs)
        internals.set_cell_params(study, trial_id, spec, attrs)  # a second time changes nothing
        study.tell(optuna.Trial(study, trial_id), 0.5)
    assert [t.params for t in study.trials] == cells
    assert study.trials[0].distributions["variant"].choices == ("short4", "short3", "short2")

    grown = {"grid": {**spec["grid"], "variant": ["short4", "short3", "short2", "long"]}}
    internals.enqueue_many(study, [{"variant": "long", "dataset": "digits", "seed": 1}])
    trial_id = claims.claim(study)
    internals.set_cell_params(study, trial_id, grown, {"variant": "long", "dataset": "digits", "seed": 1})
    assert storage.get_trial(trial_id).params == {"dataset": "digits", "seed": 1}
