"""How a trial ended, as a value: whatever happened to it maps to one ``Outcome``, and one
function, ``apply``, records every outcome in the same order (as Optuna's own ``_run_trial``
maps a trial's exception to one state and tells it once)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from sweeper import causes, settings, tracking
from sweeper.errors import SweeperError, TrialLost, first_line, root_cause
from sweeper.names import FAIL_CAUSE_ATTR, FAIL_REASON_ATTR, KEY_ATTR, NO_RETRY_ATTR
from sweeper.redact import redact, redact_url
from sweeper.spec import SpecError
from sweeper.storage import dberrors, internals, stale
from sweeper.train import Interrupted, NonFiniteLoss
from sweeper.trials import claims, outcomes, summary

log = logging.getLogger("sweeper.worker")

COMPLETED, PRUNED, HANDED_BACK, LOST, FAILED = "completed", "pruned", "handed_back", "lost", "failed"


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


class TrackingOutage(SweeperError):
    """MLflow stayed unreachable past --tracking-outage-limit: the trial fails for a retry."""


class StoppedDuringOutage(Interrupted):
    """The worker was told to stop while an MLflow write waited for MLflow to come back."""


def outage(config, epoch: int) -> TrackingOutage:
    """MLflow down past --tracking-outage-limit after ``epoch``."""
    return TrackingOutage(
        f"MLflow at {redact_url(config.tracking_uri)} was unreachable for over "
        f"{config.tracking_outage_limit:.0f}s (--tracking-outage-limit) after epoch {epoch}; "
        "the trial was re-queued and resumes from its latest checkpoint, logging what MLflow missed"
    )


@dataclass(frozen=True)
class Outcome:
    kind: str  # COMPLETED, PRUNED, HANDED_BACK, LOST or FAILED
    cause: str | None = None  # a code of sweeper.causes.CAUSES (failed or handed back)
    reason: str | None = None  # for people: the MLflow run's sweeper.reason, the trial's fail reason
    retry: bool = False  # failed: a retry follows (while the policy's max_retries allows)
    epoch: int | None = None  # the last epoch trained, where known
    value: float | None = None  # completed: the value told to Optuna

    @classmethod
    def failed(cls, cause: str, reason: str, epoch: int | None = None) -> Outcome:
        return cls(FAILED, cause, reason, retry=causes.CAUSES[cause].retried, epoch=epoch)

    @property
    def errored(self) -> bool:
        """Failed by an error (not a timeout or a signal): perhaps MLflow is down, look again."""
        return self.kind == FAILED and not causes.CAUSES[self.cause].stop


def outcome_of(e: Exception, run) -> Outcome:
    """The outcome of the exception that ended ``run``'s trial."""
    if isinstance(e, TrialLost):
        return Outcome(LOST, reason=str(e))
    if isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
        return Outcome(LOST, reason="finished by another worker")
    if isinstance(e, HandBack):
        return Outcome(HANDED_BACK, causes.STUDY_CANCELLED, e.reason, epoch=e.epoch)
    if isinstance(e, TimedOut):
        reason = (
            f"ran longer than the policy's trial_timeout ({run.timeout:g}s) and stopped after epoch "
            f"{e.epoch}; raise [policy] trial_timeout or lower the epochs"
        )
        return Outcome.failed(causes.TRIAL_TIMEOUT, reason, e.epoch)
    if isinstance(e, Interrupted):
        reason = f"worker stopped by a signal after epoch {e.last_epoch}"
        if isinstance(e, StoppedDuringOutage):
            reason += ", while MLflow was unreachable"
        return Outcome.failed(causes.WORKER_STOPPED, reason, e.last_epoch)
    if isinstance(e, NonFiniteLoss):  # retrying cannot help: fail the cell, no traceback
        return Outcome.failed(causes.NON_FINITE_LOSS, str(e))
    if isinstance(e, SpecError):
        return Outcome.failed(causes.BAD_SPEC, str(e))
    if isinstance(e, torch.OutOfMemoryError):
        run.model = None  # before the reason is recorded: free what can be freed now
        reason = (
            f"out of memory on {run.engine.device} at batch size {run.recipe.batch_size}: {first_line(e)}; "
            "lower batch_size in the spec's [train] or use a larger GPU"
        )
        return Outcome.failed(causes.OUT_OF_MEMORY, reason)
    if isinstance(e, (TrackingOutage, tracking.TrackingUnreachable)):
        return Outcome.failed(causes.TRACKING_OUTAGE, str(e))
    if isinstance(e, SweeperError):  # a known cause: retry later
        return Outcome.failed(causes.ERROR, str(e))
    if dberrors.is_db_error(e):  # past the retries of the grace period: no traceback, a reason
        reason = f"the Optuna storage stayed unreachable for over {run.config.grace_period}s: {redact(root_cause(e))}"
        return Outcome.failed(causes.ERROR, reason)
    log.exception("trial %d: %s failed", run.trial.number, run.key)  # any other failure: retry later
    return Outcome.failed(causes.ERROR, f"{type(e).__name__}: {redact(e)}")


def apply(outcome: Outcome, run) -> Outcome:
    """Record ``outcome`` of ``run``'s trial, always in this order: the cell's MLflow run (status
    and reason), the trial in Optuna (told, re-queued or handed back), the log line, then the
    study (the finished cell's local checkpoint dropped, the study settled, on_cell_complete).
    Returns the outcome recorded: LOST when another worker finished the trial meanwhile."""
    fate = None
    run.heartbeat.ending = True
    if outcome.kind != LOST:
        try:
            fate = _record(outcome, run)
        except (optuna.exceptions.UpdateFinishedTrialError, TrialLost):
            outcome = Outcome(LOST, reason="finished by another worker")
        except Exception as e:
            if not dberrors.is_db_error(e):
                raise
            # Its heartbeat lapsed with it: the trial is any worker's to retry once reachable.
            grace = run.config.grace_period
            outcome = Outcome(LOST, reason=f"the Optuna storage stayed unreachable for over {grace}s")
    _log(outcome, run, fate)
    if outcome.kind == LOST:  # recorded by the worker that has the trial now
        return outcome
    ended_well = outcome.kind in (COMPLETED, PRUNED)
    if ended_well:  # nothing resumes a finished cell: its local checkpoint only took disk space
        drop_local_checkpoint(run.checkpoint_path)
    settle(run.study, run.client, run.config, completed=run.key if ended_well else None)
    if outcome.kind == COMPLETED and run.config.on_cell_complete is not None:
        run.config.on_cell_complete(run.study.study_name)
    return outcome


def _record(outcome: Outcome, run) -> str | None:
    """The MLflow run's status and reason, then the trial's state in Optuna; for a trial the
    worker stopped, what becomes of it (re-queued, or failed for good)."""
    kind, reason = outcome.kind, outcome.reason
    if kind == COMPLETED:
        _end_run(run, "FINISHED")
        _tell_complete(run, outcome.value)
    elif kind == PRUNED:
        _end_run(run, "KILLED", reason)
        run.db(internals.tell, run.study, run.trial, state=TrialState.PRUNED)
    elif kind == HANDED_BACK:
        _flush_quietly(run)  # this epoch's checkpoint: `sweeper resume` goes on from it
        _end_run(run, "KILLED", reason)
        run.db(claims.hand_back, run.study, run.trial_id, reason)
    elif causes.CAUSES[outcome.cause].stop:  # a timeout or a signal, after a checkpoint
        _flush_quietly(run)  # the last epoch's checkpoint, if MLflow had not taken it yet
        attrs = run.db(run.storage.get_trial, run.trial_id).system_attrs
        max_retries = stale.policy(run.spec)["max_retries"]
        retry = causes.will_retry(outcome.cause, attrs, max_retries)
        fate = "re-queued" if retry else f"failed for good (max_retries = {max_retries} reached)"
        _end_run(run, "KILLED" if retry else "FAILED", f"{reason}; the trial {'was ' if retry else ''}{fate}")
        run.db(claims.requeue, run.study, run.trial_id, reason, outcome.cause)
        return fate
    else:
        _end_run(run, "FAILED", reason)
        if outcome.retry:
            run.db(claims.requeue, run.study, run.trial_id, reason, outcome.cause)
        else:
            run.db(run.storage.set_trial_system_attr, run.trial_id, FAIL_REASON_ATTR, reason)
            run.db(run.storage.set_trial_system_attr, run.trial_id, FAIL_CAUSE_ATTR, outcome.cause)
            run.db(run.storage.set_trial_system_attr, run.trial_id, NO_RETRY_ATTR, True)
            run.db(internals.tell, run.study, run.trial, state=TrialState.FAIL)
    return None


def _flush_quietly(run) -> None:
    """What the run's logger holds (the last checkpoint, epochs), sent if MLflow takes it soon."""
    if run.logger is None:
        return
    try:
        run.logger.flush(deadline=time.monotonic() + min(10.0, run.config.tracking_outage_limit))
    except Exception as e:
        log.warning("could not send the last checkpoint and metrics to MLflow: %s", redact(e))


def _end_run(run, status: str, reason: str | None = None) -> None:
    if run.run_id is None:
        return
    run.fence()  # the run is this attempt's to end (TrialLost: another worker's now)
    try:
        if reason:
            run.client.set_tag(run.run_id, "sweeper.reason", reason)
        run.client.set_terminated(run.run_id, status)
    except Exception as e:  # MLflow down: the Optuna side still records the outcome
        log.warning("could not close MLflow run %s: %s", run.run_id, redact(e))


def _log(outcome: Outcome, run, fate: str | None) -> None:
    number, key, kind, reason = run.trial.number, run.key, outcome.kind, outcome.reason
    if kind == COMPLETED:
        log.info("trial %d: %s complete, %s", number, key, reason)
    elif kind == PRUNED:
        log.info("trial %d: %s pruned after epoch %d", number, key, outcome.epoch)
    elif kind == LOST:
        log.warning("trial %d: %s: %s; this worker stands down", number, key, reason)
    elif kind == HANDED_BACK:
        log.warning("trial %d: %s handed back after epoch %d: %s", number, key, outcome.epoch, reason)
    elif fate is not None:
        log.warning("trial %d: %s stopped after epoch %d and %s: %s", number, key, outcome.epoch, fate, reason)
    else:
        log.error("trial %d: %s failed: %s", number, key, reason)


def _tell_complete(run, value: float) -> None:
    try:
        run.db(internals.tell, run.study, run.trial, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        # A tell whose commit went through but whose answer was lost in a blip, then retried.
        trial = run.storage.get_trial(run.trial_id)
        if trial.state != TrialState.COMPLETE or trial.value != value:
            raise


def drop_local_checkpoint(path) -> None:
    """Remove a finished cell's folder under $SWEEPER_HOME/checkpoints (its last.pt and a copy
    downloaded from MLflow). The run's artifact stays: see docs/RELIABILITY.md, "Checkpoints"."""
    import shutil

    shutil.rmtree(path.parent, ignore_errors=True)


def settle(study: optuna.Study, mlflow_client, config, completed: str | None = None) -> None:
    """After a trial ended (``completed``: its key, when it completed or was pruned): apply the
    failure policy, mirror the study's outcome on its parent MLflow run and send the
    notifications. Never fails the worker."""
    from sweeper import notify

    try:
        within = config.grace_period if config else 0
        settled = dberrors.retry_db(outcomes.settle, study, completed, within=within, what="settling the study")
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
