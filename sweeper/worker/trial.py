"""One claimed trial, from the cell's attributes to its outcome (``TrialRun.run``): prepare,
train (an EpochReporter takes each epoch), finish; whatever ends it becomes an Outcome that
sweeper.worker.outcome.apply records."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from sweeper import checkpoint, cores, settings, tracking
from sweeper.cellmodel import WEIGHTS_FILE, Exporter, save_weights
from sweeper.device import Engine
from sweeper.names import KEY_ATTR, LIFECYCLE_ATTR, RECIPE_DIGEST_ATTR
from sweeper.signals import StopSignal
from sweeper.spec import variant_cfgs
from sweeper.storage import connect, dberrors, internals, stale
from sweeper.train import FitResult
from sweeper.trials import claims
from sweeper.worker.config import WorkerConfig, timed
from sweeper.worker.epochs import EpochReporter
from sweeper.worker.outcome import (
    COMPLETED,
    PRUNED,
    Outcome,
    StoppedDuringOutage,
    apply,
    outage,
    outcome_of,
)
from sweeper.worker.prepare import Prepared, prepare

log = logging.getLogger("sweeper.worker")

MODEL_EXAMPLE_IMAGES = 4  # the input example logged with a cell's model


class TrialRun:
    """One claimed trial, from the cell's attributes to a recorded outcome."""

    def __init__(
        self,
        study: optuna.Study,
        trial_id: int,
        config: WorkerConfig,
        mlflow_client,
        stop: StopSignal,
        mlflow_ids: dict[str, tuple[str, str]] | None = None,
        exporter: Exporter | None = None,
        spec: dict | None = None,
        claimed_at: float | None = None,
    ):
        self.study, self.trial_id, self.config = study, trial_id, config
        self.claimed_at = claimed_at  # time.monotonic() before the claim (its heartbeat) was sent
        self.client, self.stop = mlflow_client, stop
        self.mlflow_ids = {} if mlflow_ids is None else mlflow_ids  # the worker's, kept between trials
        self.storage = internals.storage_of(study)
        self.trial = self.db(internals.trial_of_claim, study, trial_id)  # as the claim read it
        self.spec = spec if spec is not None else self.db(connect.stored_spec, study)  # the claim's, when it read it
        self.attrs = attrs = internals.frozen_trial(self.trial).user_attrs
        self.key = attrs[KEY_ATTR]
        self.variant, self.dataset, self.seed = attrs["variant"], attrs["dataset"], int(attrs["seed"])
        self.recipe_digest = attrs.get(RECIPE_DIGEST_ATTR)
        cell = self.key + (f"@{self.recipe_digest}" if self.recipe_digest else "")  # one folder per recipe
        self.checkpoint_path = checkpoint.cell_path(settings.home() / "checkpoints", study.study_name, cell)
        self.logger: tracking.RunLogger | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None  # of the study, once the run is open
        self.recipe = None  # the trial's Recipe, once prepared
        self.model = None
        self.system_metrics = None
        self.core_share: cores.CoreShare | None = None
        self.outcome: Outcome | None = None  # how the trial ended, as recorded
        self.exporter = exporter  # the worker's helper process that logs models
        self.deferred: Callable[[], Outcome] | None = None  # the model to log, then COMPLETE (_finish)
        self.timeout = stale.policy(self.spec)["trial_timeout"]
        self.started = time.monotonic()

    def timed_out(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.started > self.timeout

    @property
    def engine(self) -> Engine:
        return self.config.engine

    def db(self, fn, *args, **kwargs):
        """A storage call that survives a database blip shorter than the grace period."""
        label = f"trial {self.trial.number}" if hasattr(self, "trial") else f"trial id {self.trial_id}"
        what = f"{label}: {getattr(fn, '__name__', 'storage call')}"
        return dberrors.retry_db(fn, *args, within=self.config.grace_period, what=what, **kwargs)

    def run(self) -> None:
        """Run the trial and record its outcome; a trial that trained to its end leaves its model
        to log (``deferred``: complete_in_background records it)."""
        number = self.trial.number
        log.info("trial %d: %s claimed", number, self.key)
        interval, grace = self.config.heartbeat_interval, self.config.grace_period
        self.heartbeat = claims.Heartbeat(
            self.storage, self.trial_id, interval, grace, f"trial {number}", self.claimed_at, watch=LIFECYCLE_ATTR
        )
        with self._heartbeat(), self._core_share():
            try:
                try:
                    outcome = self._run()
                except Exception as e:
                    outcome = outcome_of(e, self)
                if outcome is not None:
                    self.outcome = apply(outcome, self)
            finally:
                if self.system_metrics is not None:
                    self.system_metrics.finish()
                self.model = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def complete_in_background(self) -> TrialRun:
        """(The worker's finishing thread.) Run ``deferred``: the model logged, then the trial
        recorded COMPLETE. Its heartbeat beats until then; a failure is recorded as on the
        training thread (MLflow down past the limit: re-queued)."""
        try:
            try:
                outcome = self.deferred()
            except Exception as e:
                outcome = outcome_of(e, self)
            self.outcome = apply(outcome, self)
        finally:
            self.deferred = None
            self.heartbeat.__exit__(None, None, None)
        return self

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

    def _run(self) -> Outcome | None:
        """Prepare, train (an EpochReporter takes each epoch), finish: PRUNED, or None when the
        model is left to log (``deferred``)."""
        started = time.perf_counter()
        ready = timed(self.config, "prepare", prepare, self)
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
        # Counted again now: workers that claimed while this one prepared share the cores too (the
        # precision probe runs before fit's first step would recount; 3 probes on 2 cores each
        # taking 2 threads ran 4x slower).
        self._set_threads()
        reporter = EpochReporter(self, ready.recipe, ready.decide_on, ready.already_logged)
        try:
            result = timed(
                self.config,
                "train",
                self.config.fit,
                self.model,
                ready.splits,
                ready.recipe,
                **self.engine.fit_options(),
                resume=ready.resume,
                on_epoch=functools.partial(timed, self.config, "epoch", reporter.on_epoch),
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
        return timed(self.config, "finish", self._finish, ready, result, reporter.pruned_at)

    def _finish(self, ready: Prepared, result: FitResult, pruned_at: int | None) -> Outcome | None:
        """The run-level metrics, then the outcome: a pruned trial's now; a trial that trained to
        its end leaves its model to log (``deferred``: the worker's finishing thread runs it while
        this thread claims the next trial), and is COMPLETE only once it is logged."""
        started = time.perf_counter()
        final = result.final
        value = getattr(final, ready.decide_on)
        # Optuna has the value already, before MLflow is waited for: the last epoch's report.
        deadline = time.monotonic() + self.config.tracking_outage_limit
        model_id, artifact_location, metrics_linked = None, None, False
        if pruned_at is None:  # the cell's model, named after it: its params now, its metrics as logged
            model_id, artifact_location, metrics_linked = create_model(self, ready, final.epoch, deadline)
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
        self._until_deadline(final.epoch, self.logger.flush, deadline=deadline)
        if pruned_at is not None:
            return Outcome(PRUNED, reason=f"pruned by Optuna after epoch {pruned_at}", epoch=pruned_at)
        model, example = model_to_log(self.model, ready.splits)
        cfg = variant_cfgs(self.spec)[self.variant]
        shape = (ready.splits.num_classes, ready.splits.in_channels)

        def complete() -> Outcome:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="sweeper-model-") as tmp:
                weights = save_weights(Path(tmp) / WEIGHTS_FILE, model, self.variant, cfg, *shape)
                request = {"run_id": self.run_id, "example": example, "step": final.epoch, "model_id": model_id}
                request.update(metrics_linked=metrics_linked, artifact_location=artifact_location)
                request.update(weights=str(weights), deadline=time.monotonic() + self.config.tracking_outage_limit)
                timed(
                    self.config,
                    "model",
                    self._until_deadline,
                    final.epoch,
                    self.exporter.log_model,
                    request,
                )
            model_seconds = time.perf_counter() - started
            log.info("trial %d: %s model logged in %.1f s", self.trial.number, self.key, model_seconds)
            self.logger.log_metrics({"finish_seconds": finish_seconds, "model_log_seconds": model_seconds})
            self.logger.flush()  # what MLflow does not take now is lost: these two are not worth a retry
            return Outcome(COMPLETED, reason=f"{ready.decide_on} {value:.4f}", epoch=final.epoch, value=value)

        finish_seconds = time.perf_counter() - started  # the training thread's part after the last epoch
        self.deferred = complete
        return None

    def fence(self) -> None:
        """Before a write for the trial: its lease holds or renews now (claims.Heartbeat.hold)."""
        self.heartbeat.hold(within=self.config.grace_period)

    def _until_deadline(self, epoch: int, fn, *args, **kwargs):
        """``fn`` (an MLflow write that retries until its deadline, or until the worker is told to
        stop or its lease lapses: cut off from the database, the trial may be another's), inside
        the lease: an outage past the deadline fails the trial for a retry, a stop re-queues it."""
        self.fence()
        try:
            return fn(*args, should_stop=lambda: self.stop.is_set() or not self.heartbeat.held(), **kwargs)
        except tracking.TrackingUnreachable:
            if self.stop.is_set():
                raise StoppedDuringOutage(epoch) from None
            self.fence()  # the lease lapsed: the trial's own or lost, and then nothing is recorded
            raise outage(self.config, epoch) from None


def model_to_log(model, splits):
    """The trained model on the CPU in eval mode (it loads on hosts without a GPU; training is
    over, so no copy) and MODEL_EXAMPLE_IMAGES images of the test split as the model takes
    them (float32, normalized)."""
    from sweeper.data.loader import normalize

    # At least two images: torch.export fixes a batch dimension of one, any other stays free.
    images = torch.cat([splits.test_x[:MODEL_EXAMPLE_IMAGES], splits.train_x[:MODEL_EXAMPLE_IMAGES]])
    return model.cpu().eval(), normalize(images[:MODEL_EXAMPLE_IMAGES]).numpy()


def create_model(run: TrialRun, ready: Prepared, epoch: int, deadline: float) -> tuple[str, str, bool]:
    """The cell's logged model, PENDING (its params now): its id, its artifact location, and
    whether the last epoch's metrics go linked to it: still queued unless an earlier attempt sent
    them (log_model then links them, reading every metric's history)."""
    model = run._until_deadline(
        epoch,
        tracking.create_model,
        run.client,
        run.experiment_id,
        run.run_id,
        tracking.model_name(run.key),
        {"variant": run.variant, "dataset": run.dataset, **ready.recipe.to_dict()},
        {tracking.KEY_TAG: run.key, "optuna.study": run.study.study_name},
        deadline=deadline,
    )
    return model.model_id, model.artifact_location, run.logger.link_step(epoch, model.model_id)
