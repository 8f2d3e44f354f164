"""The trial queue, as workers and `sweeper retry` use it: claim a waiting trial, beat its
heartbeat, fail the trials of dead workers, requeue or hand back a trial, retry failed cells.

Workers claim trials with a compare-and-set on the trial state, so an empty queue never makes
Optuna invent a trial (``Study.ask()`` would sample a new one when nothing waits).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from sweeper import causes
from sweeper.errors import LeaseLapsed, TrialLost, root_cause
from sweeper.names import (
    FAIL_CAUSE_ATTR,
    FAIL_REASON_ATTR,
    FAILED_CELLS_ATTR,
    FAILED_TRIAL_ATTR,
    IDENTITY_ATTRS,
    KEY_ATTR,
    RETRY_HISTORY_ATTR,
)
from sweeper.redact import redact
from sweeper.storage.dberrors import retry_db
from sweeper.storage.internals import frozen_trial, storage_of, study_attrs_now, study_id
from sweeper.storage.leases import claim_waiting, fail_if_stale, renew_lease, stale_grace, stale_trial_ids
from sweeper.storage.locks import study_lock
from sweeper.trials.outcomes import by_key_and_recipe, latest_trials

log = logging.getLogger("sweeper.study")


def claim(
    study: optuna.Study,
    unfinished: dict[str, int] | None = None,
    study_attrs: dict[str, Any] | None = None,
    may_claim: Callable[[dict[str, Any]], bool] | None = None,
    look_for_stale: bool = False,
    on_stale: Callable[[optuna.Study], Any] | None = None,
) -> int | None:
    """Move one WAITING trial to RUNNING, its heartbeat written with it, and return its id; None
    when nothing waits (or every waiting trial is being claimed by other workers right now), and
    then ``unfinished[study name]`` = how many of its trials still wait or run, when given.
    One transaction; workers claiming at once take different trials (storage.leases). In the same
    transaction, when asked: the study's user attrs, first (into ``study_attrs``; ``may_claim(attrs)``
    False claims nothing), and its stale trials, which are then failed and retried
    (``fail_stale_trials``; ``on_stale(study)`` after)."""
    found = claim_waiting(
        study,
        count_unfinished=unfinished is not None,
        read_attrs=study_attrs is not None,
        may_claim=may_claim,
        look_for_stale=look_for_stale,
    )
    if study_attrs is not None:
        study_attrs.update(found.study_attrs or {})
    if found.stale and fail_stale_trials(study, found.stale) and on_stale is not None:
        on_stale(study)  # a retry may have been the last one
    if found.trial_id is None and unfinished is not None:
        unfinished[study.study_name] = found.unfinished
    return found.trial_id


class Heartbeat:
    """Renews a trial's heartbeat every ``interval`` seconds, and with it this worker's lease: the
    right to write for the trial (its MLflow run, its checkpoint) for ``grace / 2`` seconds after a
    renewal was sent. Other workers take a trial over only once its heartbeat is older than
    ``grace``, judged under the trial's row lock that a renewal also takes (storage.leases), and
    a worker's connections give up on what is not acknowledged within ``grace / 4`` (TCP user
    timeout): so a write started inside the lease lands before anyone else can hold the trial, and
    a worker cut off and taken over writes nothing when its network comes back.

    A database error is logged and retried, so a blip shorter than the grace period does not kill
    a live trial; a renewal refused because the trial is no longer RUNNING ends the lease for good."""

    def __init__(
        self,
        storage: RDBStorage,
        trial_id: int,
        interval: float,
        grace: float,
        label: str | None = None,
        claimed_at: float | None = None,
        watch: str | None = None,
    ):
        """``claimed_at``: time.monotonic() before the claim that wrote the trial's first heartbeat
        was sent; the lease runs from there and the first renewal waits an interval. ``watch``: a
        user attr of the study that each renewal reads too, kept in ``watched``."""
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.lease = grace / 2
        self.label = label or f"trial id {trial_id}"
        self.renewed_at: float | None = claimed_at  # time.monotonic() when the last renewal that held was sent
        # ... when the last renewal was sent, held or not: the next is due an interval after.
        self.sent_at: float | None = claimed_at
        self.watch = watch
        self.watched: tuple[float, Any] | None = None  # (time.monotonic() when sent, the attr's value)
        self.lost = False
        self.ending = False  # the worker is recording the trial's end: a refused renewal is its own doing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        if self.renewed_at is None:
            self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._until_due()) and not self.lost:
            if self._until_due() == 0:  # else an epoch's report renewed it meanwhile
                self._beat()

    def _until_due(self) -> float:
        return max(0.0, (self.sent_at or 0.0) + self.interval - time.monotonic())

    def _beat(self) -> None:
        try:
            self.renew()
        except TrialLost as e:
            if not self.ending:
                log.warning("%s; this worker writes nothing more for it", e)
        except Exception as e:
            log.warning("heartbeat for %s failed (%s); retrying", self.label, redact(root_cause(e)))

    def renew(self, report: tuple[int, float] | None = None) -> None:
        """Renew the lease now (with an epoch's ``report``, (step, value), written in the same
        transaction): raises TrialLost when the trial is no longer RUNNING, the database's error
        when it cannot be reached (the lease then runs down)."""
        if not self.lost:
            sent = self.sent_at = time.monotonic()
            renewal = renew_lease(self.storage, self.trial_id, self.watch, report)
            if renewal.held:
                self.renewed_at = max(sent, self.renewed_at or sent)
                if renewal.study_attrs is not None:
                    self.watched = (sent, renewal.study_attrs[self.watch])
                return
            self.lost = True
        raise TrialLost(f"{self.label} is no longer RUNNING: another worker has it")

    def report(self, trial: optuna.Trial, step: int, value: float) -> None:
        """``trial.report(value, step)`` as a renewal of the lease: one transaction, and the
        ownership check (TrialLost when refused). The trial keeps the value, as Optuna's report
        does (a PRUNED tell reads it)."""
        self.renew(report=(step, float(value)))
        frozen_trial(trial).intermediate_values[step] = float(value)

    def hold(self, within: float) -> None:
        """``check``, renewing a lapsed lease now, through database errors for up to ``within``
        seconds; TrialLost when the trial is another worker's."""
        try:
            self.check()
        except LeaseLapsed:
            retry_db(self.renew, within=within, what=f"{self.label}: heartbeat")

    def held(self) -> bool:
        try:
            self.check()
        except (LeaseLapsed, TrialLost):
            return False
        return True

    def check(self) -> None:
        """The fence each write for the trial passes first: raises TrialLost once the trial is
        known lost, LeaseLapsed while the last renewal that held is older than the lease."""
        if self.lost:
            raise TrialLost(f"{self.label} is no longer RUNNING: another worker has it")
        if self.renewed_at is None or time.monotonic() - self.renewed_at > self.lease:
            raise LeaseLapsed(f"no heartbeat of {self.label} recorded for over {self.lease:.0f}s")


def fail_stale_trials(study: optuna.Study, stale: tuple[int, ...] | None = None) -> list[int]:
    """Fail trials whose worker stopped beating (``stale``: as a claim found them; default: looked
    up now), with a reason; the retry callback re-enqueues each (at most ``max_retry`` times). Two
    workers doing this at once fail each trial once: the state change is a row-locked update that
    refuses to touch a finished trial, and judges the heartbeat again."""
    storage = storage_of(study)
    if storage.get_heartbeat_interval() is None:
        return []
    grace = stale_grace(storage)
    failed = []
    reason = {
        FAIL_REASON_ATTR: f"no heartbeat for over {grace}s: the worker was killed or lost",
        FAIL_CAUSE_ATTR: causes.WORKER_LOST,
    }
    for trial_id in stale_trial_ids(study) if stale is None else stale:
        # Judged again under the trial's row lock: its worker may have renewed meanwhile, and
        # another worker may have failed it first (and enqueued its retry).
        if fail_if_stale(storage, trial_id, grace, reason):
            failed.append(trial_id)
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        trial = storage.get_trial(trial_id)
        log.warning(
            "trial %d (%s): its worker stopped beating; retrying it", trial.number, trial.user_attrs.get(KEY_ATTR)
        )
        if callback is not None:
            callback(study, trial)
    return failed


def requeue(study: optuna.Study, trial_id: int, reason: str, cause: str) -> None:
    """Fail a trial and enqueue its retry at once (a worker that was told to stop), counting
    towards the same retry history a dead worker's trial would have."""
    storage = storage_of(study)
    storage.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
    storage.set_trial_system_attr(trial_id, FAIL_CAUSE_ATTR, cause)
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    callback = storage.get_heartbeat_stale_trial_callback()
    callback(study, storage.get_trial(trial_id))


def hand_back(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Fail a trial and enqueue its continuation without counting a retry (the study was
    cancelled: nothing went wrong with the trial). The copy keeps the cell's MLflow run."""
    storage = storage_of(study)
    storage.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
    storage.set_trial_system_attr(trial_id, FAIL_CAUSE_ATTR, causes.STUDY_CANCELLED)
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    trial = storage.get_trial(trial_id)
    history = {k: v for k, v in trial.system_attrs.items() if k in (FAILED_TRIAL_ATTR, RETRY_HISTORY_ATTR)}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=trial.user_attrs,
            system_attrs=history,
        )
    )


def retry_failed(study: optuna.Study) -> int:
    """Re-enqueue every cell whose latest trial FAILED and that has nothing waiting or done, each
    with a fresh retry budget; the study runs again, and a cell that fails for good again is
    announced (and counted by max_failed_cells) again.

    Under the study's launch lock, reading the trials afresh: two `sweeper retry` at once would
    otherwise both see a cell FAILED and both enqueue a retry of it (one MLflow run, two trials)."""
    with study_lock(storage_of(study), study.study_name):
        retried = _retry_failed(study)
        if retried:
            known = set(study_attrs_now(study).get(FAILED_CELLS_ATTR) or [])
            storage_of(study).set_study_user_attr(study_id(study), FAILED_CELLS_ATTR, sorted(known - set(retried)))
        return len(retried)


def _retry_failed(study: optuna.Study) -> list[str]:
    latest = latest_trials(study.get_trials(deepcopy=False), by_key_and_recipe)
    failed = [t for t in latest.values() if t.state == TrialState.FAIL]
    for t in failed:
        user_attrs = {k: v for k, v in t.user_attrs.items() if not k.startswith("sweeper.") or k in IDENTITY_ATTRS}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                user_attrs=user_attrs,
                # A fresh budget: max_retries automatic retries from here (the earlier attempts
                # stay in the study, this trial points to the one it retries).
                system_attrs={FAILED_TRIAL_ATTR: t.number, RETRY_HISTORY_ATTR: []},
            )
        )
    return [t.user_attrs[KEY_ATTR] for t in failed]
