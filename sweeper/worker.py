"""A worker: claim a trial -> build model and data -> fit -> log -> tell, until the queue is empty.

Per epoch the worker checkpoints (uploaded as an artifact of the cell's MLflow run, so a retry
on any machine resumes), logs the epoch's metrics with ``step`` = epoch, and reports to Optuna.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from sweeper import __version__, checkpoint, settings, study as studies, tracking
from sweeper.errors import SweeperError, redact
from sweeper.train import EpochMetrics, Interrupted, NonFiniteLoss, Recipe, fit, seed_everything

log = logging.getLogger("sweeper.worker")

EPOCH_METRICS = ("train_loss", "test_loss", "top1_error", "top5_error", "lr", "epoch_seconds", "images_per_s")
CHECKPOINT_ARTIFACT = "checkpoint"


@dataclass
class WorkerConfig:
    storage_url: str
    tracking_uri: str
    study_names: tuple[str, ...] = ()  # empty: every study in the storage
    device: str = "auto"
    precision: str = "auto"
    data_dir: Path | None = None
    max_trials: int | None = None
    forever: bool = False
    poll_interval: float = 5.0  # seconds between looks at an empty queue (--forever)
    heartbeat_interval: int = studies.DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = studies.DEFAULT_GRACE_PERIOD
    tracking_outage_limit: float = 300.0  # seconds MLflow may stay down before a trial fails
    system_metrics: bool = True


class StopSignal:
    """First SIGTERM/SIGINT: finish the current batch, checkpoint, requeue, exit. Second: exit now."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.event.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.warning("%s received: stopping after this batch (send again to exit at once)", signal.Signals(signum).name)
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def run(config: WorkerConfig, stop: StopSignal | None = None) -> int:
    """Claim and run trials; returns how many ran. Exits when no trial waits (unless forever)."""
    stop = stop or StopSignal()
    tracking.configure_http()
    storage = studies.open_storage(config.storage_url, config.heartbeat_interval, config.grace_period)
    mlflow_client = tracking.client(config.tracking_uri)
    tracking.check_reachable(mlflow_client)
    log.info("worker %s on %s: storage %s, tracking %s", os.getpid(), socket.gethostname(),
             redact(config.storage_url), redact(config.tracking_uri))
    done = 0
    while not stop.is_set() and (config.max_trials is None or done < config.max_trials):
        claimed = _claim_next(storage, config.study_names)
        if claimed is None:
            if not config.forever:
                log.info("no trial waiting; %d run by this worker", done)
                return done
            stop.event.wait(config.poll_interval)
            continue
        study, trial_id = claimed
        TrialRun(study, trial_id, config, mlflow_client, stop).run()
        done += 1
    return done


def _claim_next(storage, names: tuple[str, ...]):
    for name in names or studies.study_names(storage):
        try:
            spec = _spec_of(storage, name)
        except KeyError:
            if names:
                raise SweeperError(f"no study named {name!r}; start it with `sweeper launch --study {name}`") from None
            continue
        if spec is None:
            continue  # not a sweeper study
        study = optuna.load_study(study_name=name, storage=storage, sampler=studies.make_sampler(spec),
                                  pruner=studies.make_pruner(spec))
        studies.fail_stale_trials(study)
        trial_id = studies.claim(study)
        if trial_id is not None:
            return study, trial_id
    return None


def _spec_of(storage, name: str) -> dict[str, Any] | None:
    study_id = storage.get_study_id_from_name(name)
    return storage.get_study_user_attrs(study_id).get(studies.SPEC_ATTR)


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


class TrialRun:
    """One claimed trial, from the cell's attributes to a told result."""

    def __init__(self, study: optuna.Study, trial_id: int, config: WorkerConfig, mlflow_client, stop: StopSignal):
        self.study, self.trial_id, self.config = study, trial_id, config
        self.client, self.stop = mlflow_client, stop
        self.storage = study._storage
        self.trial = optuna.Trial(study, trial_id)
        self.spec = studies.stored_spec(study)
        attrs = self.storage.get_trial(trial_id).user_attrs
        self.attrs = attrs
        self.key = attrs[studies.KEY_ATTR]
        self.variant, self.dataset, self.seed = attrs["variant"], attrs["dataset"], int(attrs["seed"])
        safe_key = self.key.replace("/", "_").replace("#", "_")
        self.checkpoint_path = settings.home() / "checkpoints" / study.study_name / safe_key / "last.pt"
        self.logger: tracking.RunLogger | None = None
        self.run_id: str | None = None

    def run(self) -> None:
        number = self.trial.number
        log.info("trial %d: %s claimed", number, self.key)
        with studies.Heartbeat(self.storage, self.trial_id, self.config.heartbeat_interval):
            try:
                self._run()
            except Interrupted as e:
                self._end_run("KILLED", f"worker stopped by a signal after epoch {e.last_epoch}; the trial was re-queued")
                studies.requeue(self.study, self.trial_id, "worker stopped by a signal")
                log.warning("trial %d: %s stopped after epoch %d and re-queued", number, self.key, e.last_epoch)
            except NonFiniteLoss as e:
                self._fail(str(e), retry=False)
            except torch.OutOfMemoryError as e:
                self._fail(f"out of memory on {self.config.device} at batch size "
                           f"{self.recipe.batch_size}: {str(e).splitlines()[0]}", retry=False)
            except Exception as e:  # noqa: BLE001 - any other failure: record why, retry later
                log.exception("trial %d: %s failed", number, self.key)
                self._fail(f"{type(e).__name__}: {redact(e)}", retry=True)
            finally:
                self.model = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _run(self) -> None:
        from sweeper.models import build_model, count_macs, count_params

        values = dict(self.spec["train"], seed=self.seed)
        for name, dist in ((self.spec.get("search") or {}).get("space") or {}).items():
            values[name] = suggest(self.trial, name, dist)
        self.recipe = recipe = Recipe.from_dict(values)
        self.trial.set_user_attr("sweeper.host", socket.gethostname())
        self.trial.set_user_attr("sweeper.epochs", recipe.epochs)

        self._open_run()
        resume = self._fetch_checkpoint()
        already_logged = tracking.logged_steps(self.client, self.run_id) if resume else set()
        splits = load_data(self.dataset, self.config.data_dir).limit(recipe.limit_train, recipe.limit_test)
        seed_everything(self.seed)
        self.model = build_model(self.variant, splits.num_classes, splits.in_channels)
        num_params, macs = count_params(self.model), count_macs(self.model, splits.info.shape)
        self.logger.log_params({"variant": self.variant, "dataset": self.dataset, **recipe.to_dict()})
        self.logger.set_tags({"sweeper.device": self.config.device, "sweeper.host": socket.gethostname(),
                              "sweeper.version": __version__, "torch.version": torch.__version__})
        if resume:
            self.logger.set_tags({"sweeper.resumed_from_epoch": resume["epoch"]})
            for m in resume["history"]:
                if m["epoch"] not in already_logged:  # died after the checkpoint, before the metrics
                    self.logger.log_metrics({k: m[k] for k in EPOCH_METRICS}, step=m["epoch"])
                    already_logged.add(m["epoch"])
                self.trial.report(m[self.spec["metric"]], m["epoch"])
        self.logger.flush()

        pruned_at: list[int] = []

        def on_epoch(m: EpochMetrics, state) -> bool:
            checkpoint.save(self.checkpoint_path, {**state(), "variant": self.variant, "dataset": self.dataset, "seed": self.seed})
            self.logger.log_artifact(self.checkpoint_path, CHECKPOINT_ARTIFACT)
            if m.epoch not in already_logged:
                self.logger.log_metrics({k: getattr(m, k) for k in EPOCH_METRICS}, step=m.epoch)
            if not self.logger.flush() and time.monotonic() - self.logger.down_since > self.config.tracking_outage_limit:
                raise SweeperError(f"MLflow was unreachable for over {self.config.tracking_outage_limit:.0f}s")
            value = getattr(m, self.spec["metric"])
            self.trial.set_user_attr("sweeper.epoch", m.epoch)
            self.trial.set_user_attr("sweeper.top1_error", m.top1_error)
            log.info("trial %d: %s epoch %d/%d %s %.4f", self.trial.number, self.key, m.epoch, recipe.epochs,
                     self.spec["metric"], value)
            self.trial.report(value, m.epoch)
            if self.trial.should_prune():
                pruned_at.append(m.epoch)
                return True
            return False

        result = fit(self.model, splits, recipe, device=self.config.device, precision=self.config.precision,
                     resume=resume, on_epoch=on_epoch, should_stop=self.stop.is_set)
        final = result.final
        value = getattr(final, self.spec["metric"])
        self.trial.set_user_attr("sweeper.final_value", value)
        self.logger.log_metrics({"num_params": num_params, "macs": macs, "train_seconds": result.train_seconds})
        self.logger.set_tags({"sweeper.precision": result.precision, "sweeper.device": result.device})
        if not pruned_at:
            weights = self.checkpoint_path.with_name("model.pt")
            torch.save(self.model.state_dict(), weights)
            self.logger.log_artifact(weights, "model")
        self.logger.flush(deadline=time.monotonic() + self.config.tracking_outage_limit)
        if pruned_at:
            self._end_run("KILLED", f"pruned by Optuna after epoch {pruned_at[0]}")
            self.study.tell(self.trial, state=TrialState.PRUNED)
            log.info("trial %d: %s pruned after epoch %d", self.trial.number, self.key, pruned_at[0])
        else:
            self._end_run("FINISHED")
            self.study.tell(self.trial, value)
            log.info("trial %d: %s complete, %s %.4f", self.trial.number, self.key, self.spec["metric"], value)

    def _open_run(self) -> None:
        experiment_id = tracking.ensure_experiment(self.client, self.study.study_name)
        parent_id = tracking.ensure_study_run(self.client, experiment_id, self.spec)
        run_id = self.attrs.get("mlflow_run_id")
        if run_id is None:
            found = tracking.find_run(self.client, experiment_id, {tracking.KEY_TAG: self.key, tracking.ROLE_TAG: "cell"})
            run_id = found.info.run_id if found else None
        tags = {"optuna.study": self.study.study_name, "optuna.trial_number": str(self.trial.number)}
        if run_id is None:
            run = self.client.create_run(experiment_id, run_name=tracking.cell_run_name(self.key), tags={
                tracking.PARENT_TAG: parent_id, tracking.ROLE_TAG: "cell", tracking.KEY_TAG: self.key,
                "mlflow.note.content": f"GoogLeNet {self.variant} on {self.dataset}, seed {self.seed} "
                                       f"(study {self.study.study_name}, cell {self.key})",
                **tags,
            })
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
        self.run_id = run_id
        self.trial.set_user_attr("mlflow_run_id", run_id)
        self.logger = tracking.RunLogger(self.client, run_id)

    def _fetch_checkpoint(self) -> dict[str, Any] | None:
        """The cell's latest checkpoint from its MLflow run (any machine wrote it), if any."""
        names = [a.path for a in self.client.list_artifacts(self.run_id, CHECKPOINT_ARTIFACT)]
        if f"{CHECKPOINT_ARTIFACT}/last.pt" not in names:
            return None
        target = self.checkpoint_path.parent / "download"
        target.mkdir(parents=True, exist_ok=True)
        local = self.client.download_artifacts(self.run_id, f"{CHECKPOINT_ARTIFACT}/last.pt", str(target))
        try:
            state = checkpoint.load(local, expect={"variant": self.variant, "dataset": self.dataset, "seed": self.seed})
        except checkpoint.CheckpointError as e:
            log.warning("trial %d: %s; starting from epoch 1", self.trial.number, e)
            return None
        log.info("trial %d: %s resumes after epoch %d", self.trial.number, self.key, state["epoch"])
        return state

    def _end_run(self, status: str, reason: str | None = None) -> None:
        if self.run_id is None:
            return
        try:
            if reason:
                self.client.set_tag(self.run_id, "sweeper.reason", reason)
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # MLflow down: the Optuna side still records the outcome
            log.warning("could not close MLflow run %s: %s", self.run_id, redact(e))

    def _fail(self, reason: str, retry: bool) -> None:
        log.error("trial %d: %s failed: %s", self.trial.number, self.key, reason)
        self._end_run("FAILED", reason)
        if retry:
            studies.requeue(self.study, self.trial_id, reason)
        else:
            self.storage.set_trial_system_attr(self.trial_id, "sweeper.fail_reason", reason)
            self.study.tell(self.trial, state=TrialState.FAIL)
