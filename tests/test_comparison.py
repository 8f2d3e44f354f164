"""A comparison researchers can trust: held-out validation, per-cell search, one recipe per row,
lineage, seed statistics and `sweeper verify`, each with real workers on digits."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from conftest import sweeper, write_spec
from mlflow.tracking import MlflowClient

from sweeper import study as studies
from sweeper.data import load

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SEARCH = """
[search]
trials_per_cell = 2
sampler = "random"
[search.space]
lr = { low = 0.5, high = 1.5 }
"""


def stores(env) -> tuple[str, MlflowClient]:
    home = env["SWEEPER_HOME"]
    return f"sqlite:///{home}/optuna.db", MlflowClient(f"sqlite:///{home}/mlflow.db")


def history(client: MlflowClient, run_id: str, metric: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)}


def test_validation_slice_is_fixed_stratified_and_disjoint():
    digits = load("digits")
    a, b = digits.split_validation(0.1), digits.split_validation(0.1)
    assert torch.equal(a.val_y, b.val_y) and torch.equal(a.val_x, b.val_x), "the same slice every time"
    assert len(a.train_y) + len(a.val_y) == len(digits.train_y) and len(a.test_y) == len(digits.test_y)
    per_class = torch.bincount(a.val_y, minlength=10).float() / torch.bincount(digits.train_y, minlength=10)
    assert per_class.min() > 0.07 and per_class.max() < 0.13, "every class in proportion"
    train_rows = {bytes(x.numpy()) for x in a.train_x}
    overlap = sum(bytes(x.numpy()) in train_rows for x in a.val_x)
    assert overlap <= 2, "validation images are held out of training (digits has a few duplicate images)"


def test_search_decides_on_validation_never_on_test(sweeper_env, tmp_path):
    spec = write_spec(tmp_path / "valsearch.toml", epochs=2, limit_train=160, limit_test=64, extra=SEARCH)
    sweeper("launch", "--study", str(spec), "--workers", "1", env=sweeper_env, timeout=900)
    storage, client = stores(sweeper_env)
    trials = optuna.load_study(study_name="valsearch", storage=storage).trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.params["val_fraction"] == "0.1", "[search] holds out 10% by default"
        val, test = history(client, run.info.run_id, "val_top1_error"), history(client, run.info.run_id, "top1_error")
        assert sorted(val) == sorted(test) == [1, 2], "validation and test metrics every epoch"
        assert t.intermediate_values == val, "pruning saw the validation curve"
        assert t.value == val[2], "the Optuna value is the last validation error"
        assert set(history(client, run.info.run_id, "val_loss")) == {1, 2}
    assert any(t.value != history(client, t.user_attrs["mlflow_run_id"], "top1_error")[2] for t in trials)

    rows = json.loads(sweeper("report", "--study", "valsearch", "--format", "json", env=sweeper_env).stdout)
    assert len(rows) == 1 and rows[0]["val_top1_error"] == min(t.value for t in trials), "best by validation"
    table = sweeper("report", "--study", "valsearch", "--format", "markdown", env=sweeper_env).stdout
    assert "Val Top 1 Error" in table and "decided on val_top1_error" in table


def _finished(study, key: str, digest: str, curve: list[float]) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            value=curve[-1],
            intermediate_values=dict(enumerate(curve, start=1)),
            user_attrs={studies.KEY_ATTR: key, studies.RECIPE_DIGEST_ATTR: digest},
        )
    )


def test_pruning_compares_a_trial_with_its_own_cell_only(tmp_path):
    storage = studies.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="cells", storage=storage)
    for k in range(1, 6):  # a hard cell: errors near 0.9
        _finished(study, f"long/cifar100/s1#{k}", "r1", [0.95, 0.92, 0.9])
    for k in range(1, 11):  # an easy cell: errors near 0.05, twice as many trials
        _finished(study, f"short4/digits/s1#{k}", "r1", [0.2, 0.1, 0.05])
    for k in range(1, 11):  # the hard cell under an earlier recipe: a different search
        _finished(study, f"long/cifar100/s1#{k}", "r0", [0.5, 0.3, 0.2])

    def running(key: str, curve: list[float]):
        trial = study.ask()
        trial.set_user_attr(studies.KEY_ATTR, key)
        trial.set_user_attr(studies.RECIPE_DIGEST_ATTR, "r1")
        for step, value in enumerate(curve, start=1):
            trial.report(value, step)
        return storage.get_trial(trial._trial_id)

    median = dict(n_startup_trials=5, n_warmup_steps=2)
    per_cell = studies.CellPruner(optuna.pruners.MedianPruner(**median))
    pooled = optuna.pruners.MedianPruner(**median)
    good_hard = running("long/cifar100/s1#6", [0.9, 0.88, 0.85])  # better than its own cell's median
    assert pooled.prune(study, good_hard), "pooled, the easy cell's curves would prune it"
    assert not per_cell.prune(study, good_hard), "against its own cell it is a good trial"
    bad_easy = running("short4/digits/s1#11", [0.4, 0.3, 0.3])  # worse than its own cell's median
    assert per_cell.prune(study, bad_easy)
    assert not studies.make_pruner({"search": {"pruner": "median"}}).prune(study, good_hard)
    view = studies.CellStudy(study, ("long/cifar100/s1", "r1"))
    assert {t.user_attrs[studies.KEY_ATTR] for t in view.get_trials()} == {
        *(f"long/cifar100/s1#{k}" for k in range(1, 7))
    }, "the sampler's and pruner's view: this cell and recipe only"
