"""The worker's loop: look at MLflow, claim the next waiting trial, run it, until the queue is
empty (or for ever). A trial that trained to its end has its model logged on a finishing thread
while the loop claims the next one."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import optuna

from sweeper import tracking
from sweeper.cellmodel import Exporter
from sweeper.errors import SweeperError, root_cause
from sweeper.names import LIFECYCLE_ATTR, SPEC_ATTR
from sweeper.redact import redact, redact_url
from sweeper.signals import StopSignal
from sweeper.storage import connect, dberrors, internals, leases
from sweeper.trials import cellsearch, claims
from sweeper.worker.config import WorkerConfig, timed
from sweeper.worker.outcome import settle
from sweeper.worker.trial import TrialRun

log = logging.getLogger("sweeper.worker")

TRACKING_CHECK_EVERY = 30.0  # seconds without a word from MLflow after which a claim is checked against it


@dataclass
class KeptStudy:
    """A study as a worker keeps it between claims (claim_next)."""

    spec: dict[str, Any] | None  # None until a claim has read it
    study: optuna.Study
    stale_looked_at: float = float("-inf")  # time.monotonic() of its last look for stale trials


def run_trials(config: WorkerConfig, stop: StopSignal, storage, mlflow_client) -> int:
    """Claim and run trials; returns how many ran."""
    exporter = config.exporter or Exporter(
        config.tracking_uri, config.build_model, unacknowledged_timeout=config.grace_period / 4
    )
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
        if exporter is not config.exporter:  # a shared one outlives this worker
            exporter.close()


def _trial_loop(config: WorkerConfig, stop: StopSignal, storage, mlflow_client, exporter, finishing, pending) -> int:
    done = 0
    tracking_ok_at = time.monotonic()  # checked just now
    mlflow_ids: dict[str, tuple[str, str]] = {}  # study name -> (experiment id, parent run id)
    told: dict[str, Any] = {"held": {}, "running": 0}  # what was last said about not claiming
    studies: dict[str, KeptStudy] = {}  # kept between claims (claim_next)
    while not stop.is_set() and (config.max_trials is None or done < config.max_trials):
        for trial_run in _finished(pending):
            if trial_run.outcome.errored:  # perhaps MLflow is down (or its experiment deleted): look again
                tracking_ok_at = float("-inf")
                mlflow_ids.pop(trial_run.study.study_name, None)
            else:  # its model and its run's end just reached MLflow: no need to look (a request per trial)
                tracking_ok_at = time.monotonic()
        if tracking_ok_at == float("-inf"):  # a trial errored: perhaps MLflow is down
            if not _wait_for_tracking(mlflow_client, config, stop):
                break
            tracking_ok_at = time.monotonic()
        held: dict[str, dict[str, Any]] = {}
        unfinished: dict[str, int] = {}
        claim_sent = time.monotonic()
        claimed = _claim(storage, config, mlflow_client, held, None if config.forever else unfinished, studies)
        if claimed is None:
            if pending:  # a model still being logged: its trial may yet be re-queued
                _finished(pending, wait=True)
                continue
            if not _wait_for_more(config, stop, held, unfinished, told):
                log.info("%s; %d run by this worker", "no trial claimed" if held else "no trial waiting", done)
                return done
            continue
        study, trial_id = claimed
        if time.monotonic() - tracking_ok_at > TRACKING_CHECK_EVERY:
            # After an idle spell MLflow is looked at once a trial is this worker's, not before each
            # empty look (200 idle workers asked it every 30 s: 1 to 2.5 requests per trial). Down:
            # the claim is undone, no attempt spent, and MLflow is waited for before the next claim.
            if not _tracking_reachable(mlflow_client):
                dberrors.retry_db(leases.release, storage, trial_id, within=config.grace_period, what="undoing a claim")
                tracking_ok_at = float("-inf")
                continue
            tracking_ok_at = time.monotonic()
        spec = studies[study.study_name].spec  # read by this claim
        trial_run = TrialRun(study, trial_id, config, mlflow_client, stop, mlflow_ids, exporter, spec, claim_sent)
        timed(config, "trial", trial_run.run)
        if trial_run.deferred is not None:  # trained to its end: its model is logged meanwhile
            pending.append(finishing.submit(trial_run.complete_in_background))
            tracking_ok_at = time.monotonic()  # its run's metrics just reached MLflow: no need to look
        elif trial_run.outcome.errored:
            tracking_ok_at = float("-inf")  # perhaps MLflow is down (or its experiment deleted): look again
            mlflow_ids.pop(study.study_name, None)
        done += 1
    return done


def _claim(
    storage, config: WorkerConfig, mlflow_client, held: dict[str, Any], unfinished: dict[str, int] | None, studies
):
    """The next trial claimed, (study, trial id), or None; a storage down past the grace period
    stops the worker."""
    try:
        return timed(
            config,
            "claim",
            dberrors.retry_db,
            claim_next,
            storage,
            config.study_names,
            held=held,
            unfinished=unfinished,
            studies=studies,
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


def _wait_for_more(config: WorkerConfig, stop: StopSignal, held, unfinished: dict[str, int], told) -> bool:
    """Nothing was claimed: wait a poll interval and True, or False when the worker is done. A
    --forever worker always waits; another waits while other workers' trials run (one may come
    back: its host cut off, its heartbeat stale; the last workers of a fleet stay to fail it
    after the grace period and retry it). Says each change once."""
    if held != told["held"]:  # once per change: a --forever worker polls every few seconds
        for name, life in held.items():
            log.info(
                "study %s is %s (%s): its waiting trials are not claimed until `sweeper resume --study %s`",
                name,
                life["state"],
                life.get("reason") or "no reason given",
                name,
            )
        told["held"] = held
    running = sum(unfinished.values())
    if not config.forever:
        if not running:
            return False
        if running != told["running"]:
            log.info(
                "no trial waiting; waiting for %d running trial(s) of other workers "
                "(one whose heartbeat stops is retried here)",
                running,
            )
            told["running"] = running
    stop.event.wait(config.poll_interval)
    return True


def _finished(pending: list[Future], wait: bool = False) -> list[TrialRun]:
    """The trials of ``pending`` that have ended (all of them with ``wait``), taken off the list;
    an error on the finishing thread is raised here, as it would have been on this one."""
    ended = [f for f in pending if wait or f.done()]
    for f in ended:
        pending.remove(f)
    return [f.result() for f in ended]


def _tracking_reachable(mlflow_client) -> bool:
    try:
        tracking.check_reachable(mlflow_client)
    except tracking.TrackingUnreachable:
        return False
    return True


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


def claim_next(
    storage,
    names: tuple[str, ...],
    on_stale=None,
    held: dict[str, Any] | None = None,
    unfinished=None,
    studies: dict[str, KeptStudy] | None = None,
):
    """The first trial claimed from the studies ``names`` (all when empty): (study, trial id), or
    None. ``held`` collects the studies skipped for their lifecycle while trials of theirs wait;
    ``unfinished``, when nothing was claimed, the trials still waiting or running per study.
    ``studies`` keeps the studies between claims: a claim is then one transaction that reads the
    study's attributes (its lifecycle, its spec), its stale trials at most once a heartbeat
    interval (a dead worker's trial is retried a grace period after its last beat) and the queue."""
    studies = {} if studies is None else studies
    for name in names or connect.study_names(storage):
        if name not in studies:
            try:  # its spec, sampler and pruner come with the first claim's read
                studies[name] = KeptStudy(None, optuna.load_study(study_name=name, storage=storage))
            except KeyError:
                if names:
                    raise SweeperError(connect.unknown_study(name, connect.study_names(storage))) from None
                continue
        kept = studies[name]
        # Not before the study is known to be sweeper's: another tool's trials are not ours to fail.
        look_for_stale = kept.spec is not None and (
            time.monotonic() - kept.stale_looked_at >= (storage.get_heartbeat_interval() or 0)
        )
        if look_for_stale:
            kept.stale_looked_at = time.monotonic()
        attrs: dict[str, Any] = {}  # the study's now, read by the claim's transaction
        trial_id = claims.claim(kept.study, unfinished, attrs, _may_claim, look_for_stale, on_stale)
        spec = attrs.get(SPEC_ATTR)
        if spec is None:  # not a sweeper study, or deleted since it was kept: nothing was claimed
            del studies[name]
            continue
        if spec != kept.spec:  # read first, or updated since (`launch --force-update`)
            kept.spec = spec
            kept.study.sampler, kept.study.pruner = cellsearch.make_sampler(spec), cellsearch.make_pruner(spec)
        if trial_id is not None:
            return studies[name].study, trial_id
        life = attrs.get(LIFECYCLE_ATTR) or {"state": "running"}
        if life["state"] != "running":  # stopped, paused or cancelled: claims nothing until `sweeper resume`
            if unfinished is not None:
                unfinished.pop(name, None)  # nothing here to wait for
            if held is not None and internals.waiting_trial_ids(kept.study, limit=1):
                held[name] = life
    return None


def _may_claim(study_attrs: dict[str, Any]) -> bool:
    """A study claims while it is a sweeper study that is running (not stopped, paused or cancelled)."""
    life = study_attrs.get(LIFECYCLE_ATTR) or {"state": "running"}
    return study_attrs.get(SPEC_ATTR) is not None and life["state"] == "running"
