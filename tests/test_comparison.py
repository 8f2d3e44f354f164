"""A comparison researchers can trust: held-out validation, per-cell search, one recipe per row,
lineage, seed statistics and `sweeper verify`, each with real workers on digits."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import torch
from helpers import sweeper, write_spec
from mlflow.tracking import MlflowClient

from sweeper.data import load
from sweeper.names import KEY_ATTR, RECIPE_DIGEST_ATTR
from sweeper.storage import connect
from sweeper.trials import cellsearch, enqueue

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

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
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert sorted(inputs) == ["evaluation", "training", "validation"]
        train, val, test = (
            json.loads(inputs[c].profile)["targets_shape"][0] for c in ("training", "validation", "evaluation")
        )
        assert train + val == 160 and val > 0 and test == 64, "the 160 training images, a slice held out"
        assert t.params["variant"] == "short4" and t.params["lr"] == float(run.data.params["lr"]), "search params too"
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
            user_attrs={KEY_ATTR: key, RECIPE_DIGEST_ATTR: digest},
        )
    )


def test_pruning_compares_a_trial_with_its_own_cell_only(tmp_path):
    storage = connect.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="cells", storage=storage)
    for k in range(1, 6):  # a hard cell: errors near 0.9
        _finished(study, f"long/cifar100/s1#{k}", "r1", [0.95, 0.92, 0.9])
    for k in range(1, 11):  # an easy cell: errors near 0.05, twice as many trials
        _finished(study, f"short4/digits/s1#{k}", "r1", [0.2, 0.1, 0.05])
    for k in range(1, 11):  # the hard cell under an earlier recipe: a different search
        _finished(study, f"long/cifar100/s1#{k}", "r0", [0.5, 0.3, 0.2])

    def running(key: str, curve: list[float]):
        trial = study.ask()
        trial.set_user_attr(KEY_ATTR, key)
        trial.set_user_attr(RECIPE_DIGEST_ATTR, "r1")
        for step, value in enumerate(curve, start=1):
            trial.report(value, step)
        return storage.get_trial(trial._trial_id)

    median = dict(n_startup_trials=5, n_warmup_steps=2)
    per_cell = cellsearch.CellPruner(optuna.pruners.MedianPruner(**median))
    pooled = optuna.pruners.MedianPruner(**median)
    good_hard = running("long/cifar100/s1#6", [0.9, 0.88, 0.85])  # better than its own cell's median
    assert pooled.prune(study, good_hard), "pooled, the easy cell's curves would prune it"
    assert not per_cell.prune(study, good_hard), "against its own cell it is a good trial"
    bad_easy = running("short4/digits/s1#11", [0.4, 0.3, 0.3])  # worse than its own cell's median
    assert per_cell.prune(study, bad_easy)
    assert not cellsearch.make_pruner({"search": {"pruner": "median"}}).prune(study, good_hard)
    view = cellsearch.CellStudy(study, ("long/cifar100/s1", "r1"))
    assert {t.user_attrs[KEY_ATTR] for t in view.get_trials()} == {*(f"long/cifar100/s1#{k}" for k in range(1, 7))}, (
        "the sampler's and pruner's view: this cell and recipe only"
    )


def test_changed_recipe_is_new_rows_and_each_trial_keeps_its_own(sweeper_env, tmp_path):
    spec = write_spec(tmp_path / "recipes.toml", epochs=1, limit_train=128, limit_test=64)
    sweeper("launch", "--study", str(spec), env=sweeper_env)  # enqueued, not run yet
    write_spec(spec, epochs=1, limit_train=128, limit_test=64, extra="lr = 0.5\n")
    done = sweeper("launch", "--study", str(spec), "--force-update", "--workers", "1", env=sweeper_env, timeout=900)
    assert "enqueued 1 trial" in done.stderr
    storage, client = stores(sweeper_env)
    trials = optuna.load_study(study_name="recipes", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[0].user_attrs[RECIPE_DIGEST_ATTR] != trials[1].user_attrs[RECIPE_DIGEST_ATTR]
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    assert runs[0].info.run_id != runs[1].info.run_id, "a new recipe is a new run, not the old cell's"
    assert [r.data.params["lr"] for r in runs] == ["1.0", "0.5"], (
        "the waiting trial kept the recipe it was enqueued with"
    )

    current = sweeper("report", "--study", "recipes", "--format", "json", env=sweeper_env)
    rows = json.loads(current.stdout)
    assert [r["mlflow_run_id"] for r in rows] == [runs[1].info.run_id]
    assert "1 row(s) of 1 earlier recipe(s) not shown" in current.stderr
    every = json.loads(
        sweeper("report", "--study", "recipes", "--recipe", "all", "--format", "json", env=sweeper_env).stdout
    )
    assert sorted(r["mlflow_run_id"] for r in every) == sorted(r.info.run_id for r in runs)
    assert len({r["recipe"] for r in every}) == 2
    table = sweeper("report", "--study", "recipes", "--recipe", "all", "--format", "markdown", env=sweeper_env).stdout
    assert table.count("short4 (recipe ") == 2


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A finished grid study: short3 and short4 on digits, three seeds each, one epoch."""
    import os

    root = tmp_path_factory.mktemp("seeded")
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI")}
    env.update(SWEEPER_HOME=str(root / "home"), OMP_NUM_THREADS="1")
    spec = write_spec(
        root / "seeded.toml", variants=("short4", "short3"), seeds=(1, 2, 3), epochs=1, limit_train=128, limit_test=64
    )
    sweeper("launch", "--study", str(spec), "--workers", "1", env=env, timeout=1500)
    return env


def test_every_run_carries_code_and_dataset_lineage(seeded):
    from sweeper import lineage

    splits = load("digits", None).limit(128, 64)
    storage, client = stores(seeded)
    for t in optuna.load_study(study_name="seeded", storage=storage).trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["sweeper.code_digest"] == lineage.code_digest()
        assert run.data.tags.get("mlflow.source.git.commit") == lineage.git_commit()
        logged = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert sorted(logged) == ["evaluation", "training"], "both splits, no validation split without one"
        train, test = logged["training"], logged["evaluation"]
        assert (train.name, test.name) == ("digits-train", "digits-test")
        assert json.loads(train.profile)["features_shape"] == [128, 1, 8, 8]
        assert json.loads(test.profile)["features_shape"] == [64, 1, 8, 8]
        assert train.digest == lineage.dataset_digest(splits, ("train_x", "train_y"))
        assert test.digest == lineage.dataset_digest(splits, ("test_x", "test_y"))
    digests = {
        client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["sweeper.dataset_digest"]
        for t in optuna.load_study(study_name="seeded", storage=storage).trials
    }
    assert len(digests) == 1, "every cell saw the same arrays"


def test_study_run_holds_the_report_page_recipe_and_summary(seeded):
    """The study's parent run: the report as one HTML page (table and plots inline), refreshed by
    the worker as cells finished; the recipe as params; cells complete and the best error."""
    from pathlib import Path

    storage, client = stores(seeded)
    experiment = client.get_experiment_by_name("seeded")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`sweeper.role` = 'study'")
    assert "report/report.html" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    page = Path(client.download_artifacts(parent.info.run_id, "report/report.html")).read_text()
    assert "Top 1 Error" in page and "short3" in page and "short4" in page
    assert page.count('src="data:image/png;base64,') == 3, "the three plots inline"
    assert {k: parent.data.params[k] for k in ("epochs", "limit_train", "limit_test", "lr", "metric")} == {
        "epochs": "1",
        "limit_train": "128",
        "limit_test": "64",
        "lr": "1.0",
        "metric": "top1_error",
    }
    trials = optuna.load_study(study_name="seeded", storage=storage).trials
    assert parent.data.metrics["cells_complete"] == parent.data.metrics["cells_total"] == 6
    assert parent.data.metrics["best_top1_error"] == min(t.value for t in trials)
    worker_log = (Path(seeded["SWEEPER_HOME"]) / "logs" / "worker-1.log").read_text()
    assert "study seeded: report updated in MLflow" in worker_log, "the worker refreshed it, not only `report`"


def test_seed_statistics_and_paired_compare(seeded):
    rows = json.loads(sweeper("report", "--study", "seeded", "--format", "json", env=seeded).stdout)
    errors = {(r["variant"], r["seed"]): r["top1_error"] for r in rows}
    for r in rows:
        mine = [errors[(r["variant"], s)] for s in (1, 2, 3)]
        assert r["n_seeds"] == 3
        assert r["top1_error_mean"] == pytest.approx(sum(mine) / 3)
        assert r["top1_error_std"] == pytest.approx(float(torch.tensor(mine, dtype=torch.float64).std()))
    (result,) = json.loads(
        sweeper("report", "--study", "seeded", "--compare", "short3,short4", "--format", "json", env=seeded).stdout
    )
    diffs = [errors[("short3", s)] - errors[("short4", s)] for s in (1, 2, 3)]
    assert result["n_pairs"] == 3 and result["diff_mean"] == pytest.approx(sum(diffs) / 3)
    assert result["ci_low"] <= result["diff_mean"] <= result["ci_high"]
    covers = result["ci_low"] <= 0 <= result["ci_high"]
    assert result["verdict"] == ("indistinguishable" if covers else result["verdict"]) and result["verdict"]
    if not covers:
        assert "lower top1_error" in result["verdict"]
    table = sweeper("report", "--study", "seeded", "--compare", "short3,short4", env=seeded).stdout
    assert "95% CI" in table and result["verdict"] in table
    csv = sweeper("report", "--study", "seeded", "--compare", "short3,short4", "--format", "csv", env=seeded).stdout
    assert csv.splitlines()[0].startswith("dataset,") and f",{result['n_pairs']}," in csv.splitlines()[1]
    bad = sweeper("report", "--study", "seeded", "--compare", "short3,naive", env=seeded, check=False)
    assert bad.returncode == 2 and "'naive' is not in this study" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stdout == ""


def test_verify_passes_clean_and_names_each_drift(seeded):
    import os

    ok = sweeper("verify", "--study", "seeded", "--format", "json", env=seeded)
    assert json.loads(ok.stdout)["ok"] is True and json.loads(ok.stdout)["trials_checked"] == 6
    storage, client = stores(seeded)
    trials = {t.user_attrs["sweeper.key"]: t for t in optuna.load_study(study_name="seeded", storage=storage).trials}
    doubled, deleted = (
        trials["short4/digits/s1"].user_attrs["mlflow_run_id"],
        trials["short3/digits/s2"].user_attrs["mlflow_run_id"],
    )
    client.log_metric(doubled, "top1_error", 0.5, step=1)
    client.delete_run(deleted)
    client.set_tag(trials["short3/digits/s3"].user_attrs["mlflow_run_id"], "sweeper.code_digest", "0123456789abcdef")

    drift = sweeper("verify", "--study", "seeded", "--format", "json", env=seeded, check=False)
    assert drift.returncode == 1
    problems = {(p["check"], p["cell"]): p for p in json.loads(drift.stdout)["problems"]}
    # The second value at step 1 is also the latest, which the report reads: Optuna's differs from it.
    assert set(problems) == {
        ("metric_duplicated", "short4/digits/s1"),
        ("value_differs", "short4/digits/s1"),
        ("run_deleted", "short3/digits/s2"),
    }
    assert "top1_error" in problems[("metric_duplicated", "short4/digits/s1")]["message"]
    repair = problems[("run_deleted", "short3/digits/s2")]["repair"]
    assert f"mlflow runs restore --run-id {deleted}" in repair
    text = sweeper("verify", "--study", "seeded", env=seeded, check=False)
    assert text.returncode == 1 and "run_deleted" in text.stdout and "repair:" in text.stdout

    bin_dir = os.path.dirname(sys.executable)
    fixed = subprocess.run(
        repair,
        shell=True,
        env={**seeded, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fixed.returncode == 0, fixed.stderr
    after = json.loads(sweeper("verify", "--study", "seeded", "--format", "json", env=seeded, check=False).stdout)
    assert sorted(p["check"] for p in after["problems"]) == ["metric_duplicated", "value_differs"], (
        "the printed repair worked"
    )

    warned = sweeper("report", "--study", "seeded", env=seeded)
    assert "warning: the digits rows were trained with 2 different sweeper code" in warned.stderr


TINY = """
[variants.tiny]
stages = [["a3"], ["b5"]]
description = "two modules, declared in the spec"
"""


def test_spec_declared_variant_is_validated_listed_hashed_and_trained(sweeper_env, tmp_path):
    from sweeper import spec as specs

    path = tmp_path / "mine.toml"
    path.write_text(
        '[grid]\nvariant = ["tiny"]\ndataset = ["digits"]\n[train]\nepochs = 1\nlimit_train = 128\nlimit_test = 64\n'
        + TINY
    )
    listed = json.loads(sweeper("models", "--study", str(path), "--format", "json", env=sweeper_env).stdout)
    tiny = next(r for r in listed if r["variant"] == "tiny")
    assert tiny["declared_in"] == "spec" and tiny["inception_modules"] == 2 and tiny["dataset"] == "digits"
    assert {r["dataset"] for r in listed} == {"digits"} and "standard" in {r["variant"] for r in listed}

    changed = specs.parse(specs.tomllib.loads(path.read_text().replace('["b5"]', '["b4"]')), name="mine")
    assert changed.hash != specs.load(str(path)).hash, "the variant's modules are part of the spec digest"
    for bad, message in (
        ('stages = [["a3"], ["zz"]]', "unknown module 'zz'"),
        ("stages = []", "non-empty list"),
        ('stages = [["a3"]]\nblock = "wide"', "must be one of: bottleneck, naive"),
    ):
        broken = tmp_path / "broken.toml"
        broken.write_text(path.read_text().replace('stages = [["a3"], ["b5"]]', bad))
        proc = sweeper("models", "--study", str(broken), env=sweeper_env, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "variants.tiny" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    clash = tmp_path / "clash.toml"
    clash.write_text(path.read_text().replace("[variants.tiny]", "[variants.standard]"))
    proc = sweeper("models", "--study", str(clash), env=sweeper_env, check=False)
    assert proc.returncode == 2 and "built-in variant" in proc.stderr

    sweeper("launch", "--study", str(path), "--workers", "1", env=sweeper_env, timeout=900)
    storage, client = stores(sweeper_env)
    (trial,) = optuna.load_study(study_name="mine", storage=storage).trials
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert trial.state.name == "COMPLETE" and run.data.params["variant"] == "tiny"
    assert run.data.metrics["num_params"] == tiny["params"]


@pytest.mark.timeout(1800)
def test_quickstart_table_converges(sweeper_env, tmp_path):
    """The shipped quickstart, as a newcomer runs it: every variant ends at top-1 error <= 0.10."""
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
    sweeper("launch", "--study", str(spec), "--workers", "2", env=sweeper_env, timeout=1800)
    rows = json.loads(sweeper("report", "--study", "quickstart", "--format", "json", env=sweeper_env).stdout)
    assert len(rows) == 7 and all(r["state"] == "COMPLETE" for r in rows)
    errors = {r["variant"]: r["top1_error"] for r in rows}
    assert max(errors.values()) <= 0.10, errors

    # sweeper.api reads the same table: results() is the report's CSV, row for row.
    import sweeper.api as api

    csv = sweeper("report", "--study", "quickstart", "--format", "csv", env=sweeper_env).stdout
    assert api.results("quickstart").to_csv(index=False) == csv


def test_a_study_launched_before_cells_were_params_keeps_working(sweeper_env, tmp_path, monkeypatch):
    """A study whose trials were enqueued with no params and no metric name (what sweeper did
    before): `launch` enqueues nothing, the worker runs the waiting cell under the same key and
    gives it the params and the study its metric's name."""
    from sweeper import spec as specs

    path = write_spec(tmp_path / "older.toml", variants=("short4", "short3"), epochs=1, limit_train=64, limit_test=32)
    storage = connect.open_storage(f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db")
    monkeypatch.setattr(enqueue, "name_metric", lambda study, metric: None)  # the older launch
    enqueue.enqueue_study(storage, specs.load(str(path)))
    before = optuna.load_study(study_name="older", storage=storage)
    assert before.metric_names is None and [t.params for t in before.trials] == [{}, {}]
    keys = [t.user_attrs[KEY_ATTR] for t in before.trials]

    again = sweeper("launch", "--study", str(path), env=sweeper_env)
    assert "all 2 trial(s) already enqueued; nothing to add" in again.stderr
    sweeper("worker", "--study", "older", "--max-trials", "1", env=sweeper_env, timeout=600)
    after = optuna.load_study(study_name="older", storage=storage)
    assert after.metric_names == ["top1_error"]
    assert [t.user_attrs[KEY_ATTR] for t in after.trials] == keys, "no trial added, no key changed"
    done, waiting = after.trials
    assert done.state.name == "COMPLETE" and waiting.state.name == "WAITING"
    assert done.params == {"variant": done.user_attrs["variant"], "dataset": "digits", "seed": 1}
    assert waiting.params == {}
