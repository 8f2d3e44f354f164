"""Everything before a trial's first epoch: its recipe, the cell's MLflow run, the checkpoint it
resumes from, the data, the model, and what the run records about them (``prepare``). The
functions take the trial's TrialRun and fill in its run, logger and model."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna
import torch

from sweeper import __version__, checkpoint, device, lineage, system_metrics, tracking
from sweeper.names import CHECKPOINT_ARTIFACT, FAILED_TRIAL_ATTR, RECIPE_ATTR
from sweeper.spec import check_stored, decision_metric, variant_cfgs
from sweeper.storage import internals, locks
from sweeper.train import EpochMetrics, Recipe, seed_everything
from sweeper.trials import enqueue
from sweeper.worker.epochs import epoch_metrics

log = logging.getLogger("sweeper.worker")


@dataclass
class Prepared:
    """A trial ready to train: what ``prepare`` gathered."""

    recipe: Recipe
    decide_on: str  # the metric reported to Optuna
    splits: Any
    resume: dict[str, Any] | None  # the checkpoint to resume from
    already_logged: set[int]  # epochs the cell's MLflow run holds already
    num_params: int
    macs: int
    prepare_seconds: float = 0.0  # from claim to ready: the run, the checkpoint, the data, the model


_datasets: dict[tuple[str, str], Any] = {}


def load_data(name: str, data_dir: Path | None):
    """Datasets stay in memory between a worker's trials."""
    from sweeper import data

    key = (name, str(data_dir))
    if key not in _datasets:
        _datasets[key] = data.load(name, data_dir)
    return _datasets[key]


def suggest(trial: optuna.Trial, name: str, dist: dict[str, Any]) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(name, dist["choices"])
    is_int = next(f for f in fields(Recipe) if f.name == name).type.startswith("int")
    suggest_fn = trial.suggest_int if is_int else trial.suggest_float
    kwargs = {"log": bool(dist.get("log", False))}
    if dist.get("step") is not None:
        kwargs["step"] = dist["step"]
    return suggest_fn(name, dist["low"], dist["high"], **kwargs)


def prepare(run) -> Prepared:
    """Everything before the first epoch: the recipe, the cell's MLflow run, the resume
    checkpoint, the data, the model, and what the run records about them."""
    from sweeper.contract import count_macs
    from sweeper.models import build_model, count_params

    recipe, decide_on = _recipe(run)
    fresh_run = open_run(run)
    _record_trial(run, recipe)
    if run.config.system_metrics:
        run.system_metrics = system_metrics.start(run.run_id, run.config.tracking_uri, run.engine.gpu_uuid)
    # Steps already in the run (an earlier attempt logged them): never logged again, whether
    # this attempt resumes from a checkpoint or, without a usable one, starts from epoch 1.
    already_logged = set() if fresh_run else tracking.logged_steps(run.client, run.run_id)
    resume = fetch_checkpoint(run, recipe, fresh_run)
    splits = load_data(run.dataset, run.config.data_dir).limit(recipe.limit_train, recipe.limit_test)
    splits = splits.split_validation(recipe.val_fraction)
    data_digest = lineage.dataset_digest(splits)
    seed_everything(run.seed)
    cfgs = variant_cfgs(run.spec)
    build = run.config.build_model or build_model
    run.model = build(run.variant, splits.num_classes, splits.in_channels, cfgs)
    ready = Prepared(
        recipe=recipe,
        decide_on=decide_on,
        splits=splits,
        resume=resume,
        already_logged=already_logged,
        num_params=count_params(run.model),
        # From the variant's table, not a forward pass (seconds for naive); tests check they agree.
        macs=count_macs(cfgs[run.variant], splits.info.shape, splits.num_classes),
    )
    _log_run_inputs(run, ready, fresh_run, data_digest)
    if resume:
        _replay_resumed(run, ready)
    run.logger.flush()
    return ready


def _recipe(run) -> tuple[Recipe, str]:
    """The trial's recipe with its searched values, and the metric the trial is decided on."""
    check_stored(run.spec, run.study.study_name)  # stored by an older sweeper, or by hand
    # The recipe stored on the trial at enqueue time: a spec updated meanwhile never changes it.
    values = dict(run.attrs.get(RECIPE_ATTR) or run.spec["train"], seed=run.seed)
    for name, dist in ((run.spec.get("search") or {}).get("space") or {}).items():
        values[name] = run.db(suggest, run.trial, name, dist)
    run.recipe = recipe = Recipe.from_dict(values)
    decide_on = decision_metric(run.spec["metric"], recipe.val_fraction)
    return recipe, decide_on


def _record_trial(run, recipe: Recipe) -> None:
    """What the trial records in Optuna before training, in one transaction: its cell as params,
    its host, epochs and MLflow run (the run's id as soon as the run exists: a retry reopens it)."""
    user_attrs = {
        "sweeper.host": socket.gethostname(),
        "sweeper.epochs": recipe.epochs,
        "mlflow_run_id": run.run_id,
        "mlflow_run_url": tracking.run_url(run.config.tracking_uri, run.experiment_id, run.run_id),
    }
    run.db(internals.set_cell_params, run.study, run.trial_id, run.spec, run.attrs, user_attrs)


def _study_run(run) -> tuple[str, str]:
    """(experiment id, parent run id) of the trial's study, created by the first worker."""
    name = run.study.study_name
    if name not in run.mlflow_ids:
        # Looked up before any lock: once they exist, workers starting together do not queue on
        # the lock for them (200 workers did, for minutes, polling it thousands of times).
        ids = tracking.find_study_run(run.client, name)
        if ids is None:
            with locks.study_lock(run.storage, name):  # one parent run, however many workers start
                experiment_id = tracking.ensure_experiment(run.client, name)
                ids = experiment_id, tracking.ensure_study_run(run.client, experiment_id, run.spec)
        # Studies launched before metrics were named get theirs here.
        val_fraction = Recipe.from_dict(run.spec["train"]).val_fraction
        run.db(enqueue.name_metric, run.study, decision_metric(run.spec["metric"], val_fraction))
        run.mlflow_ids[name] = ids
    return run.mlflow_ids[name]


def open_run(run) -> bool:
    """Open (or reopen) the cell's MLflow run; True when it was created just now."""
    experiment_id, parent_id = run.db(_study_run, run)
    run_id = run.attrs.get("mlflow_run_id")
    # A retry whose first attempt died between creating the run and recording its id finds the
    # run by its tags; a first attempt has no earlier run to find (a search request saved).
    if run_id is None and FAILED_TRIAL_ATTR in internals.frozen_trial(run.trial).system_attrs:
        identity = {tracking.KEY_TAG: run.key, tracking.ROLE_TAG: "cell"}
        if run.recipe_digest:
            identity[tracking.RECIPE_TAG] = run.recipe_digest
        found = tracking.find_run(run.client, experiment_id, identity)
        run_id = found.info.run_id if found else None
    tags = {"optuna.study": run.study.study_name, "optuna.trial_number": str(run.trial.number)}
    fresh = run_id is None
    if fresh:
        run_id = tracking.create_run_once(
            run.client,
            experiment_id,
            run.key,  # the run's name: "{variant}/{dataset}/s{seed}", "#k" appended for search trials
            tags={
                tracking.PARENT_TAG: parent_id,
                tracking.ROLE_TAG: "cell",
                tracking.KEY_TAG: run.key,
                **({tracking.RECIPE_TAG: run.recipe_digest} if run.recipe_digest else {}),
                "mlflow.note.content": f"GoogLeNet {run.variant} on {run.dataset}, seed {run.seed} "
                f"(study {run.study.study_name}, cell {run.key})",
                **tags,
            },
            identity={tracking.ROLE_TAG: "cell", tracking.KEY_TAG: run.key, **tags},  # this trial's run only
        )
    else:
        run.client.update_run(run_id, status="RUNNING")
        if "sweeper.reason" in run.client.get_run(run_id).data.tags:  # an earlier attempt's end, not this one's
            run.client.delete_tag(run_id, "sweeper.reason")
        for k, v in tags.items():
            run.client.set_tag(run_id, k, v)
    run.run_id, run.experiment_id = run_id, experiment_id
    run.logger = tracking.RunLogger(run.client, run_id, fence=run.heartbeat.check)
    return fresh


def fetch_checkpoint(run, recipe: Recipe, fresh_run: bool) -> dict[str, Any] | None:
    """The cell's latest usable checkpoint: the one in its MLflow run (any machine wrote it) or
    this machine's own copy, which is newer when MLflow missed uploads during an outage."""
    expect = {"variant": run.variant, "dataset": run.dataset, "seed": run.seed, "recipe": recipe.to_dict()}
    candidates = []
    names = [] if fresh_run else [a.path for a in run.client.list_artifacts(run.run_id, CHECKPOINT_ARTIFACT)]
    if f"{CHECKPOINT_ARTIFACT}/last.pt" in names:
        target = run.checkpoint_path.parent / "download"
        target.mkdir(parents=True, exist_ok=True)
        local = run.client.download_artifacts(run.run_id, f"{CHECKPOINT_ARTIFACT}/last.pt", str(target))
        candidates.append(("MLflow", local, expect))
    if run.checkpoint_path.is_file():  # only if this very run wrote it (not an older study's)
        candidates.append(("local", run.checkpoint_path, {**expect, "run_id": run.run_id}))
    best = None
    for where, path, want in candidates:
        try:
            state = checkpoint.load(path, expect=want)
        except checkpoint.CheckpointError as e:
            log.warning("trial %d: %s checkpoint not used: %s", run.trial.number, where, e)
            continue
        if best is None or state["epoch"] > best[1]["epoch"]:
            best = (where, state)
    if best is None:
        return None
    where, state = best
    log.info("trial %d: %s resumes after epoch %d (%s checkpoint)", run.trial.number, run.key, state["epoch"], where)
    if where == "local":  # MLflow missed it (an outage): send it, so any machine can resume from it
        run.logger.log_artifact(run.checkpoint_path, CHECKPOINT_ARTIFACT)
    return state


def _log_run_inputs(run, ready: Prepared, fresh_run: bool, data_digest: str) -> None:
    """The run's params (once: MLflow's are immutable), tags and dataset inputs."""
    if fresh_run or not run.client.get_run(run.run_id).data.params:
        run.logger.log_params({"variant": run.variant, "dataset": run.dataset, **ready.recipe.to_dict()})
    run.logger.set_tags(
        {
            "sweeper.device": device.describe(run.engine.device),
            "sweeper.host": socket.gethostname(),
            "sweeper.version": __version__,
            "torch.version": torch.__version__,
            tracking.CODE_DIGEST_TAG: lineage.code_digest(),
            tracking.DATASET_DIGEST_TAG: data_digest,
            **({"mlflow.source.git.commit": lineage.git_commit()} if lineage.git_commit() else {}),
        }
    )
    if fresh_run or not run.client.get_run(run.run_id).inputs.dataset_inputs:
        for dataset_input in lineage.dataset_inputs(ready.splits):
            run.logger.log_input(dataset_input)


def _replay_resumed(run, ready: Prepared) -> None:
    """A resumed trial: the checkpoint's epochs MLflow missed are logged, all reported to Optuna."""
    run.logger.set_tags({"sweeper.resumed_from_epoch": ready.resume["epoch"]})
    for m in ready.resume["history"]:
        if m["epoch"] not in ready.already_logged:  # died after the checkpoint, before the metrics
            run.logger.log_metrics(epoch_metrics(EpochMetrics(**m)), step=m["epoch"])
            ready.already_logged.add(m["epoch"])
        run.db(run.trial.report, m[ready.decide_on], m["epoch"])
