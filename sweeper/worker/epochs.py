"""A trial's epochs: what the worker does after each one (EpochReporter) and the metrics an
epoch logs to MLflow (epoch_metrics)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import optuna

from sweeper import checkpoint
from sweeper.names import CHECKPOINT_ARTIFACT, EPOCH_METRICS, TOP1_ERROR_ATTR, VAL_EPOCH_METRICS
from sweeper.train import EpochMetrics, Recipe
from sweeper.trials import outcomes
from sweeper.worker.config import timed
from sweeper.worker.outcome import HandBack, TimedOut, TrialLost, outage

log = logging.getLogger("sweeper.worker")

LIFECYCLE_CHECK_EVERY = 2.0  # seconds between looks for a cancelled study, after an epoch


def epoch_metrics(m: EpochMetrics) -> dict[str, float]:
    """An epoch's metrics for MLflow: the validation ones only when the recipe holds out a slice."""
    names = EPOCH_METRICS + (VAL_EPOCH_METRICS if m.val_top1_error is not None else ())
    return {k: getattr(m, k) for k in names}


class EpochReporter:
    """fit's on_epoch for one trial (``run``: its TrialRun): after each epoch it checks the trial
    is still this worker's and MLflow not down too long, reports to Optuna, decides pruning and
    a cancelled study's hand back, and checkpoints. Checkpoints are written and uploaded in the
    background (one at a time) while the next epoch trains; an epoch's metrics go to MLflow only
    after the checkpoint that covers it, and are held until then (or until the trial's end:
    finish())."""

    def __init__(self, run, recipe: Recipe, decide_on: str, already_logged: set[int]):
        self.run = run
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
        """True: stop training (pruned). Raises TrialLost, HandBack, TimedOut or TrackingOutage."""
        run = self.run
        if self.lost:
            raise TrialLost(f"the trial is no longer RUNNING after epoch {m.epoch}")
        down_since = run.logger.down_since  # set by a background flush that failed
        if down_since is not None and time.monotonic() - down_since > run.config.tracking_outage_limit:
            raise outage(run.config, m.epoch)
        value = getattr(m, self.decide_on)
        # The report renews the trial's lease and is the ownership check: the storage refuses it,
        # in the transaction that holds the trial's row, once the trial has finished (failed by
        # another worker). A heartbeat is due an interval after it.
        try:
            run.db(run.heartbeat.report, run.trial, m.epoch, value)
        except TrialLost:
            raise TrialLost(f"the trial is no longer RUNNING after epoch {m.epoch}") from None
        if m.epoch not in self.already_logged:
            self.held.append(m)
            self.already_logged.add(m.epoch)
        if self.decide_on != "top1_error":  # `sweeper status` shows the test error; Optuna has the other
            run.db(run.trial.set_user_attr, TOP1_ERROR_ATTR, m.top1_error)
        log.info(
            "trial %d: %s epoch %d/%d %s %.4f",
            run.trial.number,
            run.key,
            m.epoch,
            self.recipe.epochs,
            self.decide_on,
            value,
        )
        # Optuna reads the trial back to ask the pruner: not worth a transaction when nothing prunes.
        pruned = not isinstance(run.study.pruner, optuna.pruners.NopPruner) and run.db(run.trial.should_prune)
        last = pruned or m.epoch == self.recipe.epochs  # the trial ends with its model: no checkpoint needed
        # A cancelled study, or a trial past its timeout: checkpoint this epoch now and hand the
        # trial back (`sweeper resume`), or re-queue it (the next attempt goes on from here).
        cancelled = not last and self._cancelled()
        timed_out = not last and not cancelled and run.timed_out()
        every = self.recipe.checkpoint_every
        stopping = cancelled or timed_out
        if not last and (every == "epoch" or stopping or time.monotonic() - self.last_checkpoint >= every):
            started = time.perf_counter()
            cell = {"variant": run.variant, "dataset": run.dataset, "seed": run.seed}
            self._checkpoint({**state(), **cell, "trial": run.trial.number})  # which attempt wrote it
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
        """Whether the study was cancelled: as the trial's heartbeat last read it (each renewal
        reads the study's lifecycle in its own transaction), or, while no renewal has read it within
        two heartbeat intervals (none yet, or the database unreachable), looked up here at most
        every LIFECYCLE_CHECK_EVERY seconds (sub-second epochs would read it many times a second)."""
        run = self.run
        watched = run.heartbeat.watched
        if watched is not None and time.monotonic() - watched[0] <= 2 * run.config.heartbeat_interval:
            return (watched[1] or {}).get("state") == "cancelled"
        if time.monotonic() - self.lifecycle_checked < LIFECYCLE_CHECK_EVERY:
            return False
        self.lifecycle_checked = time.monotonic()
        return run.db(outcomes.lifecycle, run.study)["state"] == "cancelled"

    def _checkpoint(self, snapshot: dict[str, Any]) -> None:
        self.wait()  # at most one checkpoint in flight
        self.in_flight.append(
            self.background.submit(timed, self.run.config, "checkpoint", self._persist, snapshot, self.held[:])
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
            self.run.logger.log_metrics(epoch_metrics(m), step=m.epoch)

    def _still_owned(self) -> bool:
        """Whether this worker still holds the trial: its lease holds, or renews now. A worker
        frozen (SIGSTOP, a paused VM) or cut off past the grace period comes back to find its
        trial retried by another: what it held back then belongs to that worker's attempt, and
        writing it would log an epoch twice."""
        try:
            self.run.fence()
        except TrialLost:
            self.lost = True
            return False
        return True

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
        run = self.run
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
