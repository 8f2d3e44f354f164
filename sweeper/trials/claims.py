"""The trial queue, as workers and `sweeper retry` use it: claim a waiting trial, beat its
heartbeat, fail the trials of dead workers, requeue or hand back a trial, retry failed cells.

Workers claim trials with a compare-and-set on the trial state, so an empty queue never makes
Optuna invent a trial (``Study.ask()`` would sample a new one when nothing waits).
"""

from __future__ import annotations

import logging
import threading

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from sweeper import causes
from sweeper.errors import root_cause
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
from sweeper.storage.internals import (
    backend,
    read_into_cache,
    stale_trial_ids,
    storage_of,
    study_attrs_now,
    study_id,
    waiting_trial_ids,
)
from sweeper.storage.locks import study_lock
from sweeper.trials.outcomes import by_key_and_recipe, latest_trials

log = logging.getLogger("sweeper.study")


def claim(study: optuna.Study) -> int | None:
    """Move one WAITING trial to RUNNING and return its id, or None when nothing waits.

    The heartbeat is written before the compare-and-set: a worker killed right after winning
    the trial leaves a heartbeat that goes stale, so the trial is retried and never stays
    RUNNING forever (Optuna ignores RUNNING trials that have no heartbeat at all)."""
    storage = storage_of(study)
    while waiting := waiting_trial_ids(study):
        for trial_id in waiting:
            try:
                storage.record_heartbeat(trial_id)
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    read_into_cache(study, trial_id)
                    return trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker claimed and finished it meanwhile
        # Other workers took every one of these meanwhile: look again.
    return None


class Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds. Unlike Optuna's own thread, a
    database error is logged and retried, so a blip shorter than the grace period does not kill
    a live trial."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: float, label: str | None = None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.label = label or f"trial id {trial_id}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception as e:
            log.warning("heartbeat for %s failed (%s); retrying", self.label, redact(root_cause(e)))


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail trials whose worker stopped beating, with a reason; the retry callback re-enqueues
    each (at most ``max_retry`` times). Two workers doing this at once fail each trial once:
    the state change is a row-locked update that refuses to touch a finished trial."""
    storage = storage_of(study)
    if storage.get_heartbeat_interval() is None:
        return []
    rdb = backend(storage)
    grace = rdb.grace_period or 2 * rdb.heartbeat_interval
    failed = []
    for trial_id in stale_trial_ids(study):
        try:
            storage.set_trial_system_attr(
                trial_id, FAIL_REASON_ATTR, f"no heartbeat for over {grace}s: the worker was killed or lost"
            )
            storage.set_trial_system_attr(trial_id, FAIL_CAUSE_ATTR, causes.WORKER_LOST)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first (and enqueued its retry)
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
