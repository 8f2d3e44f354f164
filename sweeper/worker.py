"""A worker: claim a trial -> build model and data -> fit -> log -> tell, until the queue is empty.

Per epoch the worker checkpoints (uploaded as an artifact of the cell's MLflow run, so a retry
on any machine resumes), logs the epoch's metrics with ``step`` = epoch, and reports to Optuna.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from sweeper import __version__, checkpoint, cores, device, lineage, settings, system_metrics, tracking, train
from sweeper.cellmodel import WEIGHTS_FILE, Exporter, save_weights
from sweeper.contract import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL
from sweeper.device import Engine
from sweeper.errors import SweeperError, first_line, root_cause
from sweeper.names import (
    FAIL_REASON_ATTR,
    KEY_ATTR,
    LIFECYCLE_ATTR,
    NO_RETRY_ATTR,
    RECIPE_ATTR,
    RECIPE_DIGEST_ATTR,
    SPEC_ATTR,
    TOP1_ERROR_ATTR,
)
from sweeper.redact import redact, redact_url
from sweeper.spec import SpecError, check_stored, decision_metric, variant_cfgs
from sweeper.storage import connect, dberrors, internals, locks, stale
from sweeper.train import EpochMetrics, FitResult, Interrupted, NonFiniteLoss, Recipe, seed_everything
from sweeper.trials import cellsearch, claims, enqueue, outcomes, summary

log = logging.getLogger("sweeper.worker")

EPOCH_METRICS = ("train_loss", "test_loss", "top1_error", "top5_error", "lr", "epoch_seconds", "images_per_s")
VAL_EPOCH_METRICS = ("val_loss", "val_top1_error", "val_top5_error")  # when the recipe holds out a slice
CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_EXAMPLE_IMAGES = 4  # the input example logged with a cell's model
TRACKING_CHECK_EVERY = 30.0  # seconds between looks at MLflow before claiming, after a success
LIFECYCLE_CHECK_EVERY = 2.0  # seconds between looks for a cancelled study, after an epoch


@dataclass
class WorkerConfig:
    storage_url: str
    tracking_uri: str
    study_names: tuple[str, ...] = ()  # empty: every study in the storage
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"  # auto (on CUDA), on, off
    expect_gpu: bool = False  # this worker was deployed to train on a GPU (SWEEPER_EXPECT_GPU)
    processes_per_host: int = 1  # workers sharing this host's CPUs (bounds inductor's compile pool)
    engine: Engine | None = None  # the bound device (the CLI binds it first); else run() binds it
    data_dir: Path | None = None
    max_trials: int | None = None
    forever: bool = False
    poll_interval: float = 5.0  # seconds between looks at an empty queue (--forever)
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    tracking_outage_limit: float = 300.0  # seconds MLflow may stay down before a trial fails
    system_metrics: bool = True
    threads: int | None = None  # CPU threads per trial; None: share the host's cores by running trials
    notify_url: str | None = None  # JSON POST when a study completes or a cell fails for good
    fit: Callable[..., FitResult] = train.fit  # the training function (a benchmark passes a stand-in)
    # The variant's network, build_model(variant, num_classes, in_channels, variant_cfgs); None:
    # sweeper.models'. A stand-in must be a module-level function: the model helper process calls it too.
    build_model: Callable[..., Any] | None = None
    # Called with the study's name after each cell that completes (the CLI refreshes the study's
    # report page in MLflow with it: sweeper.report.publish.Refresher); must return at once.
    on_cell_complete: Callable[[str], None] | None = None
    # Called with (phase, seconds) as each phase of a trial ends (benchmarks time the worker with
    # it): "claim" (looking for a waiting trial and claiming it), "trial" (a claimed trial on the
    # training thread, until trained), within it "prepare", "train" (the fit, its epochs' reports
    # included) and "finish" (the run's metrics after training); "epoch" (each epoch's report:
    # Optuna, pruning, the checkpoint handed off), "checkpoint" (one saved and sent, on a background
    # thread) and "model" (the model logged, on the finishing thread). Must return at once.
    on_phase: Callable[[str, float], None] | None = None


def _timed(config: WorkerConfig, phase: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its seconds given to ``config.on_phase`` as ``phase``."""
    if config.on_phase is None:
        return fn(*args, **kwargs)
    started = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        config.on_phase(phase, time.perf_counter() - started)


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
    # The device first: a missing or broken GPU stops the worker before it claims any trial.
    if config.engine is None:
        engine = device.prepare(
            config.device,
            config.precision,
            config.compile,
            expect_gpu=config.expect_gpu,
            processes_per_host=config.processes_per_host,
        )
        config = replace(config, engine=engine)
    warm_up()
    tracking.configure_http()
    # A server is checked before an embedded store is opened (which creates its file), so an
    # unreachable URL or a refused password leaves nothing behind.
    server = tracking.is_server(config.tracking_uri)
    if server:
        mlflow_client = tracking.client(config.tracking_uri)
        tracking.check_reachable(mlflow_client)
    storage = _open_storage(config)
    if not server:  # an embedded store: the client creates its database file
        mlflow_client = tracking.client(config.tracking_uri)
        tracking.check_reachable(mlflow_client)
    log.info(
        "worker %s on %s: storage %s, tracking %s",
        os.getpid(),
        socket.gethostname(),
        redact_url(config.storage_url),
        redact_url(config.tracking_uri),
    )
    # What the worker has loaded by now (torch, MLflow, SQLAlchemy: ~300k objects) lives as long
    # as the process: moved out of the collector's way, each trial's gc.collect() walks only
    # what that trial left behind.
    gc.collect()
    gc.freeze()
    try:
        return _run_trials(config, stop, storage, mlflow_client)
    finally:
        gc.unfreeze()


def _open_storage(config: WorkerConfig):
    """The storage; a worker for named studies creates nothing when one of them does not exist
    (a typo must not leave an empty optuna.db and mlflow.db behind)."""
    names = config.study_names
    try:
        storage = connect.open_storage(
            config.storage_url,
            config.heartbeat_interval,
            config.grace_period,
            stall_timeout=config.grace_period,
            create=not names,
        )
    except connect.NoStore as e:
        raise SweeperError(f"no study named {names[0]!r}: {e}") from None
    known = connect.study_names(storage) if names else []
    for name in names:
        if name not in known:
            raise SweeperError(connect.unknown_study(name, known))
    return storage


def warm_up() -> None:
    """What a trial's first step needs, imported once per process before any claim: the first
    torch.optim optimizer imports torch._dynamo (~900 modules, seconds), which would otherwise
    fall between the first trial's claim and its first step."""
    started = time.perf_counter()
    param = torch.zeros(1, requires_grad=True)
    for make in (torch.optim.AdamW, torch.optim.SGD, torch.optim.Adadelta):  # train.make_optimizer's
        param.grad = torch.ones(1)
        make([param], lr=0.1).step()
    log.info("imported what training needs in %.1f s", time.perf_counter() - started)


def _run_trials(config: WorkerConfig, stop: StopSignal, storage, mlflow_client) -> int:
    exporter = Exporter(config.tracking_uri, config.build_model)
    if config.max_trials != 0:
        exporter.start()
    # The trials whose model is being logged, one after the other, while this thread trains the next.
    finishing = ThreadPoolExecutor(1, thread_name_prefix="finish")
    pending: list[Future] = []
    try:
        return _trial_loop(config, stop, storage, mlflow_client, exporter, finishing, pending)
    finally:
        finishing.shutdown(wait=True)  # stopped or not: every trained model is logged and told
        _finished(pending)
        exporter.close()


def _trial_loop(config: WorkerConfig, stop: StopSignal, storage, mlflow_client, exporter, finishing, pending) -> int:
    done = 0
    tracking_ok_at = time.monotonic()  # checked just now
    mlflow_ids: dict[str, tuple[str, str]] = {}  # study name -> (experiment id, parent run id)
    told_held: dict[str, dict[str, Any]] = {}  # studies not running whose waiting trials were last logged
    told_running = 0  # the other workers' running trials last logged while this one waits to exit
    while not stop.is_set() and (config.max_trials is None or done < config.max_trials):
        for trial_run in _finished(pending):
            if trial_run.failed:  # perhaps MLflow is down (or its experiment deleted): look again
                tracking_ok_at = float("-inf")
                mlflow_ids.pop(trial_run.study.study_name, None)
        if time.monotonic() - tracking_ok_at > TRACKING_CHECK_EVERY:
            if not _wait_for_tracking(mlflow_client, config, stop):
                break
            tracking_ok_at = time.monotonic()
        held: dict[str, dict[str, Any]] = {}
        unfinished: dict[str, int] = {}
        try:
            claimed = _timed(
                config,
                "claim",
                dberrors.retry_db,
                _claim_next,
                storage,
                config.study_names,
                held=held,
                unfinished=None if config.forever else unfinished,
                on_stale=lambda study: settle(study, mlflow_client, config),
                within=config.grace_period,
                what="looking for a waiting trial",
            )
        except Exception as e:
            if not dberrors.is_db_error(e):
                raise
            raise SweeperError(
                f"the Optuna storage {redact_url(config.storage_url)} stayed unreachable for over "
                f"{config.grace_period}s: {redact(root_cause(e))}"
            ) from None
        if claimed is None:
            if pending:  # a model still being logged: its trial may yet be re-queued
                _finished(pending, wait=True)
                continue
            if held != told_held:  # once per change: a --forever worker polls every few seconds
                for name, life in held.items():
                    log.info(
                        "study %s is %s (%s): its waiting trials are not claimed until `sweeper resume --study %s`",
                        name,
                        life["state"],
                        life.get("reason") or "no reason given",
                        name,
                    )
                told_held = held
            running = sum(unfinished.values())
            if not config.forever and running:
                # Another worker's trial may come back (its host cut off, its heartbeat stale):
                # the last workers of a fleet stay to fail it after the grace period and retry it.
                if running != told_running:
                    log.info(
                        "no trial waiting; waiting for %d running trial(s) of other workers "
                        "(one whose heartbeat stops is retried here)",
                        running,
                    )
                    told_running = running
                stop.event.wait(config.poll_interval)
                continue
            if not config.forever:
                log.info(
                    "%s; %d run by this worker",
                    "no trial claimed" if held else "no trial waiting",
                    done,
                )
                return done
            stop.event.wait(config.poll_interval)
            continue
        study, trial_id = claimed
        trial_run = TrialRun(study, trial_id, config, mlflow_client, stop, mlflow_ids, exporter)
        _timed(config, "trial", trial_run.run)
        if trial_run.deferred is not None:  # trained to its end: its model is logged meanwhile
            pending.append(finishing.submit(_conclude, trial_run.complete_in_background, mlflow_client, config))
        elif _conclude(lambda: trial_run, mlflow_client, config).failed:
            tracking_ok_at = float("-inf")  # perhaps MLflow is down (or its experiment deleted): look again
            mlflow_ids.pop(study.study_name, None)
        done += 1
    return done


def drop_local_checkpoint(path: Path) -> None:
    """Remove a finished cell's folder under $SWEEPER_HOME/checkpoints (its last.pt and a copy
    downloaded from MLflow). The run's artifact stays: see docs/RELIABILITY.md, "Checkpoints"."""
    import shutil

    shutil.rmtree(path.parent, ignore_errors=True)


def _conclude(end: Callable[[], TrialRun], mlflow_client, config: WorkerConfig) -> TrialRun:
    """End the trial (``end``), then settle its study."""
    trial_run = end()
    ended_well = trial_run.told in (TrialState.COMPLETE, TrialState.PRUNED)
    if ended_well:  # nothing resumes a finished cell: its local checkpoint only took disk space
        drop_local_checkpoint(trial_run.checkpoint_path)
    settle(trial_run.study, mlflow_client, config, completed=trial_run.key if ended_well else None)
    if trial_run.told == TrialState.COMPLETE and config.on_cell_complete is not None:
        config.on_cell_complete(trial_run.study.study_name)
    return trial_run


def _finished(pending: list[Future], wait: bool = False) -> list[TrialRun]:
    """The trials of ``pending`` that have ended (all of them with ``wait``), taken off the list;
    an error on the finishing thread is raised here, as it would have been on this one."""
    ended = [f for f in pending if wait or f.done()]
    for f in ended:
        pending.remove(f)
    return [f.result() for f in ended]


def _wait_for_tracking(mlflow_client, config: WorkerConfig, stop: StopSignal) -> bool:
    """Claim nothing while MLflow is down: a trial claimed now could only fail, burning a retry.
    Waits up to --tracking-outage-limit (for ever with --forever); False when told to stop."""
    started = time.monotonic()
    warned = False
    while not stop.is_set():
        try:
            tracking.check_reachable(mlflow_client)
        except tracking.TrackingUnreachable as e:
            waited = time.monotonic() - started
            if not config.forever and waited > config.tracking_outage_limit:
                raise SweeperError(
                    f"{e}; waited {waited:.0f}s (--tracking-outage-limit) without claiming a "
                    "trial. Waiting trials stay queued for the next worker."
                ) from None
            if not warned:
                log.warning("%s; claiming no trial until it is back", e)
                warned = True
            stop.event.wait(min(5.0, max(0.5, config.tracking_outage_limit / 10)))
            continue
        if warned:
            log.info("MLflow is reachable again after %.0fs", time.monotonic() - started)
        return True
    return False


def epoch_metrics(m: EpochMetrics) -> dict[str, float]:
    """An epoch's metrics for MLflow: the validation ones only when the recipe holds out a slice."""
    names = EPOCH_METRICS + (VAL_EPOCH_METRICS if m.val_top1_error is not None else ())
    return {k: getattr(m, k) for k in names}


def _claim_next(storage, names: tuple[str, ...], on_stale=None, held: dict[str, Any] | None = None, unfinished=None):
    """The first trial claimed from the studies ``names`` (all when empty): (study, trial id), or
    None. ``held`` collects the studies skipped for their lifecycle while trials of theirs wait;
    ``unfinished``, when nothing was claimed, the trials still waiting or running per study."""
    for name in names or connect.study_names(storage):
        try:
            attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
        except KeyError:
            if names:
                raise SweeperError(connect.unknown_study(name, connect.study_names(storage))) from None
            continue
        spec = attrs.get(SPEC_ATTR)
        if spec is None:
            continue  # not a sweeper study
        study = optuna.load_study(
            study_name=name, storage=storage, sampler=cellsearch.make_sampler(spec), pruner=cellsearch.make_pruner(spec)
        )
        if claims.fail_stale_trials(study) and on_stale is not None:
            on_stale(study)  # a retry may have been the last one
        life = attrs.get(LIFECYCLE_ATTR) or {"state": "running"}
        if life["state"] != "running":  # stopped, paused or cancelled: claim nothing (`sweeper resume` allows it again)
            if held is not None and internals.waiting_trial_ids(study, limit=1):
                held[name] = life
            continue
        trial_id = claims.claim(study)
        if trial_id is not None:
            return study, trial_id
        if unfinished is not None:
            unfinished[name] = internals.unfinished_count(study)
    return None


def settle(study: optuna.Study, mlflow_client, config: WorkerConfig | None, completed: str | None = None) -> None:
    """After a trial ended (``completed``: its key, when it completed or was pruned): apply the
    failure policy, mirror the study's outcome on its parent MLflow run and send the
    notifications. Never fails the worker."""
    from sweeper import notify

    try:
        settled = outcomes.settle(study, completed)
    except Exception as e:
        log.warning("could not settle study %s: %s", study.study_name, redact(e))
        return
    if settled.paused:
        log.warning("study %s paused itself: %s", study.study_name, settled.paused)
    uri = config.tracking_uri if config else None
    url = config.notify_url if config else settings.notify_url()
    for trial in settled.new_failures:
        notify.send(
            url,
            notify.event(
                "cell_failed",
                study.study_name,
                uri,
                cell=trial.user_attrs.get(KEY_ATTR),
                reason=trial.system_attrs.get(FAIL_REASON_ATTR),
                run_id=trial.user_attrs.get("mlflow_run_id"),
                paused=settled.paused,
            ),
        )
    if settled.outcome_changed:
        if mlflow_client is not None:
            tracking.set_study_run_status(mlflow_client, study.study_name, settled.outcome)
        if settled.outcome != "running":
            counts = summary.counts(
                list(outcomes.latest_trials(study.get_trials(deepcopy=False), outcomes.by_key).values())
            )
            log.info("study %s %s: %s", study.study_name, settled.outcome, counts)
            notify.send(
                url, notify.event("study_complete", study.study_name, uri, outcome=settled.outcome, counts=counts)
            )


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


class HandBack(Exception):
    """The study was cancelled: the trial stops after this epoch's checkpoint and waits for
    `sweeper resume`, without counting a retry."""

    def __init__(self, epoch: int, reason: str):
        super().__init__(reason)
        self.epoch, self.reason = epoch, reason


class TimedOut(Exception):
    """The trial ran past the policy's trial_timeout: it stops after this epoch's checkpoint and
    is re-queued (counting a retry), so the next attempt goes on from there."""

    def __init__(self, epoch: int):
        super().__init__(f"trial_timeout after epoch {epoch}")
        self.epoch = epoch


class TrialLost(Exception):
    """Another worker owns the trial now: this one's heartbeat went stale (a freeze, a long
    database outage), the trial was failed and its retry enqueued. Stand down, touch nothing."""


@dataclass
class Prepared:
    """A trial ready to train: what TrialRun._prepare gathered."""

    recipe: Recipe
    decide_on: str  # the metric reported to Optuna
    splits: Any
    resume: dict[str, Any] | None  # the checkpoint to resume from
    already_logged: set[int]  # epochs the cell's MLflow run holds already
    num_params: int
    macs: int
    prepare_seconds: float = 0.0  # from claim to ready: the run, the checkpoint, the data, the model


class TrialRun:
    """One claimed trial, from the cell's attributes to a told result."""

    def __init__(
        self,
        study: optuna.Study,
        trial_id: int,
        config: WorkerConfig,
        mlflow_client,
        stop: StopSignal,
        mlflow_ids: dict[str, tuple[str, str]] | None = None,
        exporter: Exporter | None = None,
    ):
        self.study, self.trial_id, self.config = study, trial_id, config
        self.client, self.stop = mlflow_client, stop
        self.mlflow_ids = {} if mlflow_ids is None else mlflow_ids  # the worker's, kept between trials
        self.storage = internals.storage_of(study)
        self.trial = self._db(optuna.Trial, study, trial_id)
        self.spec = self._db(connect.stored_spec, study)
        attrs = internals.frozen_trial(self.trial).user_attrs
        self.attrs = attrs
        self.key = attrs[KEY_ATTR]
        self.variant, self.dataset, self.seed = attrs["variant"], attrs["dataset"], int(attrs["seed"])
        self.recipe_digest = attrs.get(RECIPE_DIGEST_ATTR)
        cell = self.key + (f"@{self.recipe_digest}" if self.recipe_digest else "")  # one folder per recipe
        self.checkpoint_path = checkpoint.cell_path(settings.home() / "checkpoints", study.study_name, cell)
        self.logger: tracking.RunLogger | None = None
        self.run_id: str | None = None
        self.model = None
        self.system_metrics = None
        self.core_share: cores.CoreShare | None = None
        self.failed = False
        self.told: TrialState | None = None  # COMPLETE or PRUNED once the trial ended so
        self.exporter = exporter  # the worker's helper process that logs models
        self.deferred: Callable[[], None] | None = None  # the model to log, then COMPLETE (_finish)
        self.timeout = stale.policy(self.spec)["trial_timeout"]
        self.started = time.monotonic()

    def timed_out(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.started > self.timeout

    @property
    def engine(self) -> Engine:
        return self.config.engine

    def _db(self, fn, *args, **kwargs):
        """A storage call that survives a database blip shorter than the grace period."""
        trial = getattr(self, "trial", None)
        label = f"trial {trial.number}" if trial is not None else f"trial id {self.trial_id}"
        return dberrors.retry_db(
            fn,
            *args,
            within=self.config.grace_period,
            what=f"{label}: {getattr(fn, '__name__', 'storage call')}",
            **kwargs,
        )

    def run(self) -> None:
        number = self.trial.number
        log.info("trial %d: %s claimed", number, self.key)
        self.heartbeat = claims.Heartbeat(
            self.storage, self.trial_id, self.config.heartbeat_interval, label=f"trial {number}"
        )
        with self._heartbeat(), self._core_share():
            try:
                self._run()
            except TrialLost as e:
                log.warning("trial %d: %s: %s; this worker stands down", number, self.key, e)
            except HandBack as e:
                self._flush_quietly()
                self._end_run("KILLED", e.reason)
                self._db(claims.hand_back, self.study, self.trial_id, e.reason)
                log.warning("trial %d: %s handed back after epoch %d: %s", number, self.key, e.epoch, e.reason)
            except TimedOut as e:
                self._flush_quietly()  # this epoch's checkpoint: the next attempt goes on from it
                self._requeue(
                    e.epoch,
                    f"ran longer than the policy's trial_timeout ({self.timeout:g}s) and stopped after epoch "
                    f"{e.epoch}; raise [policy] trial_timeout or lower the epochs",
                )
            except Interrupted as e:
                self._flush_quietly()  # the last epoch's checkpoint, if MLflow had not taken it yet
                self._requeue(e.last_epoch, f"worker stopped by a signal after epoch {e.last_epoch}")
            except (NonFiniteLoss, SpecError) as e:  # retrying cannot help: fail the cell, no traceback
                self._fail(str(e), retry=False)
            except torch.OutOfMemoryError as e:
                self.model = None  # before the reason is recorded: free what can be freed now
                self._fail(
                    f"out of memory on {self.engine.device} at batch size "
                    f"{self.recipe.batch_size}: {first_line(e)}; "
                    "lower batch_size in the spec's [train] or use a larger GPU",
                    retry=False,
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning("trial %d: %s was finished by another worker; this worker stands down", number, self.key)
            except SweeperError as e:  # a known cause (MLflow outage past the limit...): retry later
                self._fail(str(e), retry=True)
            except Exception as e:  # any other failure: record why, retry later
                log.exception("trial %d: %s failed", number, self.key)
                self._fail(f"{type(e).__name__}: {redact(e)}", retry=True)
            finally:
                if self.system_metrics is not None:
                    self.system_metrics.finish()
                self.model = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _requeue(self, epoch: int, reason: str) -> None:
        """Fail the trial and enqueue its retry, unless its retries are used up: then it failed
        for good, and the run's reason and the log say so."""
        history = self._db(self.storage.get_trial, self.trial_id).system_attrs.get("retry_history", [])
        max_retries = stale.policy(self.spec)["max_retries"]
        retry = len(history) < max_retries  # as the retry callback decides
        outcome = "re-queued" if retry else f"failed for good (max_retries = {max_retries} reached)"
        self._end_run("KILLED" if retry else "FAILED", f"{reason}; the trial {'was ' if retry else ''}{outcome}")
        self._db(claims.requeue, self.study, self.trial_id, reason)
        log.warning(
            "trial %d: %s stopped after epoch %d and %s: %s", self.trial.number, self.key, epoch, outcome, reason
        )

    @contextlib.contextmanager
    def _heartbeat(self):
        """The trial's heartbeat, until it is told: a trial whose model is still to log
        (``deferred``) keeps it beating for complete_in_background."""
        self.heartbeat.__enter__()
        try:
            yield
        finally:
            if self.deferred is None:
                self.heartbeat.__exit__(None, None, None)

    @contextlib.contextmanager
    def _core_share(self):
        """Train on the host's cores split between the trials running on it now, re-counted as
        they come and go (unless --threads fixed the count)."""
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
            yield
            return
        with cores.CoreShare(settings.home() / "cores") as share:
            self.core_share = share
            self._set_threads()
            try:
                yield
            finally:
                self.core_share = None

    def _set_threads(self, *_step) -> None:
        if self.core_share is not None and (n := self.core_share.threads()) != torch.get_num_threads():
            log.info("trial %d: training on %d CPU thread(s)", self.trial.number, n)
            torch.set_num_threads(n)

    def _run(self) -> None:
        """Prepare, train (an EpochReporter takes each epoch), finish."""
        started = time.perf_counter()
        ready = _timed(self.config, "prepare", self._prepare)
        ready.prepare_seconds = time.perf_counter() - started
        # The first epoch of a big model can be minutes away: say what the wait is for.
        log.info(
            "trial %d: %s ready after %.1fs (%d parameters, %d training images); training %d epoch(s)",
            self.trial.number,
            self.key,
            ready.prepare_seconds,
            ready.num_params,
            len(ready.splits.train_y),
            ready.recipe.epochs,
        )
        reporter = EpochReporter(self, ready.recipe, ready.decide_on, ready.already_logged)
        try:
            result = _timed(
                self.config,
                "train",
                self.config.fit,
                self.model,
                ready.splits,
                ready.recipe,
                **self.engine.fit_options(),
                resume=ready.resume,
                on_epoch=functools.partial(_timed, self.config, "epoch", reporter.on_epoch),
                should_stop=self.stop.is_set,  # a timeout stops at the epoch's end (EpochReporter)
                on_step=self._set_threads,
            )
        finally:
            reporter.shutdown()  # the logger is this thread's again from here
        reporter.finish()
        self.logger.log_metrics(
            {
                "checkpoint_blocking_seconds": reporter.checkpoint_blocking_seconds,
                "checkpoint_background_seconds": reporter.checkpoint_background_seconds,
            }
        )
        _timed(self.config, "finish", self._finish, ready, result, reporter.pruned_at)

    def _prepare(self) -> Prepared:
        """Everything before the first epoch: the recipe, the cell's MLflow run, the resume
        checkpoint, the data, the model, and what the run records about them."""
        from sweeper.contract import count_macs
        from sweeper.models import build_model, count_params

        recipe, decide_on = self._recipe()
        fresh_run = self._open_run()
        if self.config.system_metrics:
            self.system_metrics = system_metrics.start(self.run_id, self.config.tracking_uri, self.engine.gpu_uuid)
        # Steps already in the run (an earlier attempt logged them): never logged again, whether
        # this attempt resumes from a checkpoint or, without a usable one, starts from epoch 1.
        already_logged = set() if fresh_run else tracking.logged_steps(self.client, self.run_id)
        resume = self._fetch_checkpoint(recipe, fresh_run)
        splits = load_data(self.dataset, self.config.data_dir).limit(recipe.limit_train, recipe.limit_test)
        splits = splits.split_validation(recipe.val_fraction)
        data_digest = lineage.dataset_digest(splits)
        seed_everything(self.seed)
        cfgs = variant_cfgs(self.spec)
        build = self.config.build_model or build_model
        self.model = build(self.variant, splits.num_classes, splits.in_channels, cfgs)
        ready = Prepared(
            recipe=recipe,
            decide_on=decide_on,
            splits=splits,
            resume=resume,
            already_logged=already_logged,
            num_params=count_params(self.model),
            # From the variant's table, not a forward pass (seconds for naive); tests check they agree.
            macs=count_macs(cfgs[self.variant], splits.info.shape, splits.num_classes),
        )
        self._log_run_inputs(ready, fresh_run, data_digest)
        if resume:
            self._replay_resumed(ready)
        self.logger.flush()
        return ready

    def _recipe(self) -> tuple[Recipe, str]:
        """The trial's recipe with its searched values, and the metric the trial is decided on."""
        check_stored(self.spec, self.study.study_name)  # stored by an older sweeper, or by hand
        # The recipe stored on the trial at enqueue time: a spec updated meanwhile never changes it.
        values = dict(self.attrs.get(RECIPE_ATTR) or self.spec["train"], seed=self.seed)
        for name, dist in ((self.spec.get("search") or {}).get("space") or {}).items():
            values[name] = self._db(suggest, self.trial, name, dist)
        self.recipe = recipe = Recipe.from_dict(values)
        decide_on = decision_metric(self.spec["metric"], recipe.val_fraction)
        self._db(internals.set_cell_params, self.study, self.trial_id, self.spec, self.attrs)
        self._db(self.trial.set_user_attr, "sweeper.host", socket.gethostname())
        self._db(self.trial.set_user_attr, "sweeper.epochs", recipe.epochs)
        return recipe, decide_on

    def _log_run_inputs(self, ready: Prepared, fresh_run: bool, data_digest: str) -> None:
        """The run's params (once: MLflow's are immutable), tags and dataset inputs."""
        if fresh_run or not self.client.get_run(self.run_id).data.params:
            self.logger.log_params({"variant": self.variant, "dataset": self.dataset, **ready.recipe.to_dict()})
        self.logger.set_tags(
            {
                "sweeper.device": device.describe(self.engine.device),
                "sweeper.host": socket.gethostname(),
                "sweeper.version": __version__,
                "torch.version": torch.__version__,
                tracking.CODE_DIGEST_TAG: lineage.code_digest(),
                tracking.DATASET_DIGEST_TAG: data_digest,
                **({"mlflow.source.git.commit": lineage.git_commit()} if lineage.git_commit() else {}),
            }
        )
        if fresh_run or not self.client.get_run(self.run_id).inputs.dataset_inputs:
            for dataset_input in lineage.dataset_inputs(ready.splits):
                self.logger.log_input(dataset_input)

    def _replay_resumed(self, ready: Prepared) -> None:
        """A resumed trial: the checkpoint's epochs MLflow missed are logged, all reported to Optuna."""
        self.logger.set_tags({"sweeper.resumed_from_epoch": ready.resume["epoch"]})
        for m in ready.resume["history"]:
            if m["epoch"] not in ready.already_logged:  # died after the checkpoint, before the metrics
                self.logger.log_metrics(epoch_metrics(EpochMetrics(**m)), step=m["epoch"])
                ready.already_logged.add(m["epoch"])
            self._db(self.trial.report, m[ready.decide_on], m["epoch"])

    def _finish(self, ready: Prepared, result: FitResult, pruned_at: int | None) -> None:
        """The run-level metrics, then the outcome: a pruned trial is told now; a trial that trained
        to its end leaves its model to log (``deferred``: the worker's finishing thread runs it
        while this thread claims the next trial), and is told COMPLETE only once it is logged."""
        started = time.perf_counter()
        final = result.final
        value = getattr(final, ready.decide_on)
        # Recorded in Optuna before MLflow is waited for: an outage past the limit cannot lose it.
        self._db(self.trial.set_user_attr, "sweeper.final_value", value)
        deadline = time.monotonic() + self.config.tracking_outage_limit
        model_id = None
        if pruned_at is None:  # the cell's model, named after it: its params now, its metrics as logged
            model_id = self._until_deadline(
                final.epoch,
                tracking.create_model,
                self.client,
                self.run_id,
                tracking.model_name(self.key),
                {"variant": self.variant, "dataset": self.dataset, **ready.recipe.to_dict()},
                {tracking.KEY_TAG: self.key, "optuna.study": self.study.study_name},
                deadline=deadline,
                should_stop=self.stop.is_set,
            )
        self.logger.log_metrics(
            {
                "num_params": ready.num_params,
                "macs": ready.macs,
                "train_seconds": result.train_seconds,
                # Where the rest of the run's time went (finish_seconds and model_log_seconds follow
                # with the model; a pruned trial's last part is the run's wall time minus the rest).
                "prepare_seconds": ready.prepare_seconds,
                "setup_seconds": result.setup_seconds,
            },
            model_id=model_id,
        )
        layout = "channels_last" if result.channels_last else "contiguous"
        self.logger.set_tags(
            {"sweeper.precision": result.precision, "sweeper.memory_format": layout, "sweeper.device": result.device}
        )
        self._until_deadline(final.epoch, self.logger.flush, deadline=deadline, should_stop=self.stop.is_set)
        if pruned_at is not None:
            self._end_run("KILLED", f"pruned by Optuna after epoch {pruned_at}")
            self._db(self.study.tell, self.trial, state=TrialState.PRUNED)
            self.told = TrialState.PRUNED
            log.info("trial %d: %s pruned after epoch %d", self.trial.number, self.key, pruned_at)
            return
        model, example = self._model_to_log(ready.splits)
        cfg = variant_cfgs(self.spec)[self.variant]
        shape = (ready.splits.num_classes, ready.splits.in_channels)

        def complete() -> None:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="sweeper-model-") as tmp:
                weights = save_weights(Path(tmp) / WEIGHTS_FILE, model, self.variant, cfg, *shape)
                request = {"run_id": self.run_id, "example": example, "step": final.epoch, "model_id": model_id}
                request.update(weights=str(weights), deadline=time.monotonic() + self.config.tracking_outage_limit)
                _timed(
                    self.config,
                    "model",
                    self._until_deadline,
                    final.epoch,
                    self.exporter.log_model,
                    request,
                    should_stop=self.stop.is_set,
                )
            model_seconds = time.perf_counter() - started
            log.info("trial %d: %s model logged in %.1f s", self.trial.number, self.key, model_seconds)
            self.logger.log_metrics({"finish_seconds": finish_seconds, "model_log_seconds": model_seconds})
            self.logger.flush()  # what MLflow does not take now is lost: these two are not worth a retry
            self._end_run("FINISHED")
            self._tell_complete(value)
            self.told = TrialState.COMPLETE
            log.info("trial %d: %s complete, %s %.4f", self.trial.number, self.key, ready.decide_on, value)

        finish_seconds = time.perf_counter() - started  # the training thread's part after the last epoch
        self.deferred = complete

    def _until_deadline(self, epoch: int, fn, *args, **kwargs):
        """``fn`` (an MLflow write that retries until its deadline): an outage past it fails the
        trial for a retry, or, when the worker was told to stop meanwhile, re-queues it at once."""
        try:
            return fn(*args, **kwargs)
        except tracking.TrackingUnreachable:
            if self.stop.is_set():
                raise Interrupted(epoch) from None
            raise SweeperError(self._outage_reason(epoch)) from None

    def _model_to_log(self, splits):
        """The trained model on the CPU in eval mode (it loads on hosts without a GPU; training is
        over, so no copy) and MODEL_EXAMPLE_IMAGES images of the test split as the model takes
        them (float32, normalized)."""
        from sweeper.data.loader import normalize

        # At least two images: torch.export fixes a batch dimension of one, any other stays free.
        images = torch.cat([splits.test_x[:MODEL_EXAMPLE_IMAGES], splits.train_x[:MODEL_EXAMPLE_IMAGES]])
        return self.model.cpu().eval(), normalize(images[:MODEL_EXAMPLE_IMAGES]).numpy()

    def complete_in_background(self) -> TrialRun:
        """(The worker's finishing thread.) Run ``deferred``: the model logged, then the trial told
        COMPLETE. Its heartbeat beats until then; a failure fails the trial as on the training
        thread (MLflow down past the limit: re-queued)."""
        number = self.trial.number
        try:
            self.deferred()
        except Interrupted as e:
            reason = f"worker stopped by a signal after epoch {e.last_epoch}, while MLflow was unreachable"
            self._end_run("KILLED", f"{reason}; the trial was re-queued")
            self._db(claims.requeue, self.study, self.trial_id, reason)
            log.warning("trial %d: %s re-queued: %s", number, self.key, reason)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d: %s was finished by another worker; this worker stands down", number, self.key)
        except SweeperError as e:
            self._fail(str(e), retry=True)
        except Exception as e:
            log.exception("trial %d: %s failed", number, self.key)
            self._fail(f"{type(e).__name__}: {redact(e)}", retry=True)
        finally:
            self.deferred = None
            self.heartbeat.__exit__(None, None, None)
        return self

    def _tell_complete(self, value: float) -> None:
        try:
            self._db(self.study.tell, self.trial, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            # A tell whose commit went through but whose answer was lost in a blip, then retried.
            trial = self.storage.get_trial(self.trial_id)
            if trial.state != TrialState.COMPLETE or trial.value != value:
                raise

    def _outage_reason(self, epoch: int) -> str:
        return (
            f"MLflow at {redact_url(self.config.tracking_uri)} was unreachable for over "
            f"{self.config.tracking_outage_limit:.0f}s (--tracking-outage-limit) after epoch {epoch}; "
            "the trial was re-queued and resumes from its latest checkpoint, logging what MLflow missed"
        )

    def _open_run(self) -> bool:
        """Open (or reopen) the cell's MLflow run; True when it was created just now."""
        name = self.study.study_name
        if name not in self.mlflow_ids:
            with locks.study_lock(self.storage, name):  # one parent run, however many workers start
                experiment_id = tracking.ensure_experiment(self.client, name)
                self.mlflow_ids[name] = experiment_id, tracking.ensure_study_run(self.client, experiment_id, self.spec)
                # Studies launched before metrics were named get theirs here.
                val_fraction = Recipe.from_dict(self.spec["train"]).val_fraction
                self._db(enqueue.name_metric, self.study, decision_metric(self.spec["metric"], val_fraction))
        experiment_id, parent_id = self.mlflow_ids[name]
        run_id = self.attrs.get("mlflow_run_id")
        if run_id is None:
            identity = {tracking.KEY_TAG: self.key, tracking.ROLE_TAG: "cell"}
            if self.recipe_digest:
                identity[tracking.RECIPE_TAG] = self.recipe_digest
            found = tracking.find_run(self.client, experiment_id, identity)
            run_id = found.info.run_id if found else None
        tags = {"optuna.study": self.study.study_name, "optuna.trial_number": str(self.trial.number)}
        fresh = run_id is None
        if fresh:
            run = self.client.create_run(
                experiment_id,
                run_name=self.key,  # "{variant}/{dataset}/s{seed}", "#k" appended for search trials
                tags={
                    tracking.PARENT_TAG: parent_id,
                    tracking.ROLE_TAG: "cell",
                    tracking.KEY_TAG: self.key,
                    **({tracking.RECIPE_TAG: self.recipe_digest} if self.recipe_digest else {}),
                    "mlflow.note.content": f"GoogLeNet {self.variant} on {self.dataset}, seed {self.seed} "
                    f"(study {self.study.study_name}, cell {self.key})",
                    **tags,
                },
            )
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            if "sweeper.reason" in self.client.get_run(run_id).data.tags:  # an earlier attempt's end, not this one's
                self.client.delete_tag(run_id, "sweeper.reason")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
        self.run_id = run_id
        self._db(self.trial.set_user_attr, "mlflow_run_id", run_id)
        self._db(
            self.trial.set_user_attr,
            "mlflow_run_url",
            tracking.run_url(self.config.tracking_uri, experiment_id, run_id),
        )
        self.logger = tracking.RunLogger(self.client, run_id)
        return fresh

    def _fetch_checkpoint(self, recipe: Recipe, fresh_run: bool) -> dict[str, Any] | None:
        """The cell's latest usable checkpoint: the one in its MLflow run (any machine wrote it) or
        this machine's own copy, which is newer when MLflow missed uploads during an outage."""
        expect = {"variant": self.variant, "dataset": self.dataset, "seed": self.seed, "recipe": recipe.to_dict()}
        candidates = []
        names = [] if fresh_run else [a.path for a in self.client.list_artifacts(self.run_id, CHECKPOINT_ARTIFACT)]
        if f"{CHECKPOINT_ARTIFACT}/last.pt" in names:
            target = self.checkpoint_path.parent / "download"
            target.mkdir(parents=True, exist_ok=True)
            local = self.client.download_artifacts(self.run_id, f"{CHECKPOINT_ARTIFACT}/last.pt", str(target))
            candidates.append(("MLflow", local, expect))
        if self.checkpoint_path.is_file():  # only if this very run wrote it (not an older study's)
            candidates.append(("local", self.checkpoint_path, {**expect, "run_id": self.run_id}))
        best = None
        for where, path, want in candidates:
            try:
                state = checkpoint.load(path, expect=want)
            except checkpoint.CheckpointError as e:
                log.warning("trial %d: %s checkpoint not used: %s", self.trial.number, where, e)
                continue
            if best is None or state["epoch"] > best[1]["epoch"]:
                best = (where, state)
        if best is None:
            return None
        where, state = best
        log.info(
            "trial %d: %s resumes after epoch %d (%s checkpoint)", self.trial.number, self.key, state["epoch"], where
        )
        if where == "local":  # MLflow missed it (an outage): send it, so any machine can resume from it
            self.logger.log_artifact(self.checkpoint_path, CHECKPOINT_ARTIFACT)
        return state

    def _flush_quietly(self) -> None:
        if self.logger is None:
            return
        try:
            self.logger.flush(deadline=time.monotonic() + min(10.0, self.config.tracking_outage_limit))
        except Exception as e:
            log.warning("could not send the last checkpoint and metrics to MLflow: %s", redact(e))

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
        self.failed = True
        log.error("trial %d: %s failed: %s", self.trial.number, self.key, reason)
        self._end_run("FAILED", reason)
        if retry:
            self._db(claims.requeue, self.study, self.trial_id, reason)
        else:
            self._db(self.storage.set_trial_system_attr, self.trial_id, FAIL_REASON_ATTR, reason)
            self._db(self.storage.set_trial_system_attr, self.trial_id, NO_RETRY_ATTR, True)
            self._db(self.study.tell, self.trial, state=TrialState.FAIL)


class EpochReporter:
    """fit's on_epoch for one trial: after each epoch it checks the trial is still this worker's
    and MLflow not down too long, reports to Optuna, decides pruning and a cancelled study's hand
    back, and checkpoints. Checkpoints are written and uploaded in the background (one at a time)
    while the next epoch trains; an epoch's metrics go to MLflow only after the checkpoint that
    covers it, and are held until then (or until the trial's end: finish())."""

    def __init__(self, trial_run: TrialRun, recipe: Recipe, decide_on: str, already_logged: set[int]):
        self.trial_run = trial_run
        self.recipe, self.decide_on, self.already_logged = recipe, decide_on, already_logged
        self.held: list[EpochMetrics] = []  # not logged yet: waiting for a checkpoint or the trial's end
        self.last_checkpoint = time.monotonic()
        self.lifecycle_checked = float("-inf")
        self.background = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.in_flight: list[Future] = []
        self.pruned_at: int | None = None
        self.lost = False  # set by the checkpoint thread when another worker has the trial now
        # What checkpoints cost: on the training thread (the state's copy, waiting for the one in
        # flight), and in the background (writing and uploading, which training once waited for).
        self.checkpoint_blocking_seconds = 0.0
        self.checkpoint_background_seconds = 0.0

    def on_epoch(self, m: EpochMetrics, state) -> bool:
        """True: stop training (pruned). Raises TrialLost, HandBack or SweeperError (MLflow outage)."""
        run = self.trial_run
        if self.lost:
            raise TrialLost(f"the trial is no longer RUNNING after epoch {m.epoch}")
        down_since = run.logger.down_since  # set by a background flush that failed
        if down_since is not None and time.monotonic() - down_since > run.config.tracking_outage_limit:
            raise SweeperError(run._outage_reason(m.epoch))
        value = getattr(m, self.decide_on)
        # The report is also the ownership check: the storage refuses it, in the same transaction
        # that reads the trial's state, once the trial has finished (failed by another worker).
        try:
            run._db(run.trial.report, value, m.epoch)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialLost(f"the trial is no longer RUNNING after epoch {m.epoch}") from None
        if m.epoch not in self.already_logged:
            self.held.append(m)
            self.already_logged.add(m.epoch)
        if self.decide_on != "top1_error":  # `sweeper status` shows the test error; Optuna has the other
            run._db(run.trial.set_user_attr, TOP1_ERROR_ATTR, m.top1_error)
        log.info(
            "trial %d: %s epoch %d/%d %s %.4f",
            run.trial.number,
            run.key,
            m.epoch,
            self.recipe.epochs,
            self.decide_on,
            value,
        )
        pruned = run._db(run.trial.should_prune)
        last = pruned or m.epoch == self.recipe.epochs  # the trial ends with its model: no checkpoint needed
        # A cancelled study, or a trial past its timeout: checkpoint this epoch now and hand the
        # trial back (`sweeper resume`), or re-queue it (the next attempt goes on from here).
        cancelled = not last and self._cancelled()
        timed_out = not last and not cancelled and run.timed_out()
        every = self.recipe.checkpoint_every
        stopping = cancelled or timed_out
        if not last and (every == "epoch" or stopping or time.monotonic() - self.last_checkpoint >= every):
            started = time.perf_counter()
            self._checkpoint({**state(), "variant": run.variant, "dataset": run.dataset, "seed": run.seed})
            self.checkpoint_blocking_seconds += time.perf_counter() - started
        if pruned:
            self.pruned_at = m.epoch
            return True
        if cancelled:
            raise HandBack(m.epoch, f"study cancelled after epoch {m.epoch}; `sweeper resume` continues it")
        if timed_out:
            raise TimedOut(m.epoch)
        return False

    def _cancelled(self) -> bool:
        """Whether the study was cancelled, looked up at most every LIFECYCLE_CHECK_EVERY seconds
        (sub-second epochs would otherwise read the study's attributes many times a second)."""
        if time.monotonic() - self.lifecycle_checked < LIFECYCLE_CHECK_EVERY:
            return False
        run = self.trial_run
        self.lifecycle_checked = time.monotonic()
        return run._db(outcomes.lifecycle, run.study)["state"] == "cancelled"

    def _checkpoint(self, snapshot: dict[str, Any]) -> None:
        self.wait()  # at most one checkpoint in flight
        config = self.trial_run.config
        self.in_flight.append(
            self.background.submit(_timed, config, "checkpoint", self._persist, snapshot, self.held[:])
        )
        self.held.clear()
        self.last_checkpoint = time.monotonic()

    def wait(self) -> None:
        """Wait for the checkpoint in flight; its error, if any, is raised here."""
        while self.in_flight:
            self.in_flight.pop().result()

    def shutdown(self) -> None:
        self.background.shutdown(wait=True)

    def finish(self) -> None:
        """After training: the last checkpoint sent, then the epochs still held logged."""
        self.wait()
        if self.lost:
            raise TrialLost("the trial is no longer RUNNING (its checkpoint was not sent)")
        for m in self.held:
            self.trial_run.logger.log_metrics(epoch_metrics(m), step=m.epoch)

    def _still_owned(self) -> bool:
        """Whether this worker still holds the trial. A worker frozen (SIGSTOP, a paused VM) past
        the grace period wakes up to find its trial retried by another: what it held back then
        belongs to that worker's attempt, and writing it would log an epoch twice."""
        run = self.trial_run
        if run._db(internals.trial_state, run.storage, run.trial_id) == TrialState.RUNNING:
            return True
        self.lost = True
        return False

    def _persist(self, snapshot: dict[str, Any], metrics: list[EpochMetrics]) -> None:
        """(Background thread.) Write the checkpoint, then send it and the epochs it covers to
        MLflow; a full disk keeps the previous checkpoint and training goes on. Nothing is
        written once the trial is no longer this worker's."""
        if not self._still_owned():
            return
        started = time.perf_counter()
        try:
            self._save_and_send(snapshot, metrics)
        finally:
            self.checkpoint_background_seconds += time.perf_counter() - started

    def _save_and_send(self, snapshot: dict[str, Any], metrics: list[EpochMetrics]) -> None:
        run = self.trial_run
        try:
            checkpoint.save(run.checkpoint_path, {**snapshot, "run_id": run.run_id})
            run.logger.log_artifact(run.checkpoint_path, CHECKPOINT_ARTIFACT)
        except checkpoint.CheckpointError as e:
            log.warning("trial %d: %s", run.trial.number, e)
        if not self._still_owned():  # the upload can be where the freeze happened
            return
        for m in metrics:
            run.logger.log_metrics(epoch_metrics(m), step=m.epoch)
        if run.logger.flush():
            log.info("trial %d: %s checkpoint of epoch %d sent", run.trial.number, run.key, snapshot["epoch"])
