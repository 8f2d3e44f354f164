"""A worker's lease on its trial, written where Optuna keeps trials: the claim, each renewal (a
heartbeat, or an epoch's report, which renews too), the look for stale trials and their takeover.

Each is one transaction that holds the trial's row, through Optuna's RDB table models (like
storage.internals, the other module on Optuna's private API; tests/test_layers.py holds the
contract). Why this fences a worker cut off and taken over: docs/RELIABILITY.md, "Lease".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import optuna
from optuna.trial import TrialState

from sweeper.storage.internals import backend, rdb_of, read_into_cache, trial_state, unfinished_count, unfinished_query


class Renewal(NamedTuple):
    held: bool  # the trial was RUNNING and its heartbeat is written
    study_attrs: dict[str, Any] | None = None  # the study attr asked for (unset: None); None: not read


class Claim(NamedTuple):
    trial_id: int | None  # the trial moved to RUNNING; None: none taken
    unfinished: int | None = None  # none taken: how many trials still wait or run (when counted)
    study_attrs: dict[str, Any] | None = None  # the study's user attrs, read first (when asked)
    stale: tuple[int, ...] = ()  # RUNNING trials whose heartbeat is older than the grace (when looked for)


def renew_lease(
    storage, trial_id: int, study_attr: str | None = None, report: tuple[int, float] | None = None
) -> Renewal:
    """Record the trial's heartbeat if it is still RUNNING (else ``held`` False, nothing written);
    ``study_attr``: that user attr of its study read in the same transaction (the lifecycle);
    ``report``: an epoch's (step, value) written in it too (Optuna's ``set_trial_intermediate_value``),
    so an epoch's report is a renewal and, refused, the ownership check.

    One transaction holding the trial's row (FOR SHARE): ``fail_if_stale`` takes it FOR UPDATE
    before it judges the heartbeat, so a renewal and a takeover never interleave. (Optuna's
    ``record_heartbeat`` beats for a failed trial too: a worker cut off and taken over would
    believe it still holds the trial when its network comes back.)"""
    rdb = rdb_of(storage)
    if rdb is None:  # pragma: no cover - other Optuna versions
        if trial_state(storage, trial_id) != TrialState.RUNNING:
            return Renewal(False)
        if report is not None:
            storage.set_trial_intermediate_value(trial_id, *report)
        storage.record_heartbeat(trial_id)
        return Renewal(True)
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import select

    trials, attrs = models.TrialModel, models.StudyUserAttributeModel
    columns = [trials.state]
    if study_attr is not None:
        of_study = select(attrs.value_json).where(attrs.study_id == trials.study_id, attrs.key == study_attr)
        columns.append(of_study.scalar_subquery())
    query = select(*columns).where(trials.trial_id == trial_id).with_for_update(read=True)
    with _create_scoped_session(scoped_session, True) as session:
        row = session.execute(query).one_or_none()
        if row is None or row[0] != TrialState.RUNNING:
            return Renewal(False)
        if report is not None:
            backend(storage)._set_trial_intermediate_value_without_commit(session, trial_id, *report)
        _write_heartbeat(session, models, trial_id)
    if study_attr is None:
        return Renewal(True)
    return Renewal(True, {study_attr: None if row[1] is None else json.loads(row[1])})


def fail_if_stale(storage, trial_id: int, grace: float, system_attrs: dict[str, Any]) -> bool:
    """FAIL the trial, with ``system_attrs``, if it is RUNNING and its heartbeat is older than
    ``grace`` seconds, judged in the transaction that fails it while it holds the trial's row (FOR
    UPDATE); False when it is not (finished meanwhile, or its worker renewed its heartbeat since
    the staleness was read: ``renew_lease`` waits on that row)."""
    rdb = rdb_of(storage)
    if rdb is None:  # pragma: no cover - other Optuna versions
        for key, value in system_attrs.items():
            storage.set_trial_system_attr(trial_id, key, value)
        return storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import func

    with _create_scoped_session(scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        if trial.state != TrialState.RUNNING:
            return False
        heartbeat = models.TrialHeartbeatModel.where_trial_id(trial_id, session)
        now = session.execute(func.now()).scalar_one().replace(tzinfo=None)
        if heartbeat is None or now - heartbeat.heartbeat.replace(tzinfo=None) <= timedelta(seconds=grace):
            return False
        for key, value in system_attrs.items():
            row = models.TrialSystemAttributeModel.find_by_trial_and_key(trial, key, session)
            if row is None:
                session.add(models.TrialSystemAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))
            else:
                row.value_json = json.dumps(value)
        trial.state = TrialState.FAIL
        trial.datetime_complete = datetime.now()  # as Optuna's set_trial_state_values records it
    return True


def release(storage, trial_id: int) -> bool:
    """Undo a claim: the trial back to WAITING as it was before (no start, no heartbeat), if it is
    still RUNNING; one transaction holding the trial's row. For a worker that finds, right after
    claiming, that it cannot run the trial (MLflow down): no attempt is spent on it."""
    rdb = rdb_of(storage)
    if rdb is None:  # pragma: no cover - other Optuna versions: it goes stale and is retried instead
        return False
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import delete

    with _create_scoped_session(scoped_session, True) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        if trial.state != TrialState.RUNNING:
            return False
        trial.state, trial.datetime_start = TrialState.WAITING, None
        beats = models.TrialHeartbeatModel
        session.execute(
            delete(beats).where(beats.trial_id == trial_id), execution_options={"synchronize_session": False}
        )
    return True


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """The study's RUNNING trials whose heartbeat is older than the grace period (``stale_grace``),
    in one transaction; Optuna's look builds every running trial."""
    rdb = rdb_of(study._storage)
    if rdb is None:  # pragma: no cover - other Optuna versions
        return study._storage._get_stale_trial_ids(study._study_id)
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(scoped_session) as session:
        return _stale_ids(session, models, study, stale_grace(study._storage))


def stale_grace(storage) -> float:
    """Seconds without a heartbeat after which a RUNNING trial is stale (as Optuna judges it)."""
    rdb = backend(storage)
    return rdb.grace_period or 2 * rdb.heartbeat_interval


def _stale_ids(session, models, study: optuna.Study, grace: float) -> list[int]:
    """``stale_trial_ids`` in ``session``: one indexed query by the database's clock, as Optuna
    judges it (now - heartbeat > grace), instead of every running trial built with its heartbeat."""
    from sqlalchemy import func, select

    trials, beats = models.TrialModel, models.TrialHeartbeatModel
    now = session.execute(select(func.now())).scalar_one().replace(tzinfo=None)
    query = (
        select(trials.trial_id)
        .join(beats, beats.trial_id == trials.trial_id)
        .where(trials.study_id == study._study_id, trials.state == TrialState.RUNNING)
        .where(beats.heartbeat < now - timedelta(seconds=grace))
        .order_by(trials.trial_id)
    )
    return list(session.scalars(query))


def _write_heartbeat(session, models, trial_id: int, first: bool = False) -> None:
    """The trial's heartbeat, now by the database's clock, in ``session``'s transaction (what
    Optuna's ``record_heartbeat`` writes in a transaction of its own), in one write: an UPDATE of
    a running trial's row, or, ``first`` (a claimed trial, which has none yet), an INSERT."""
    from sqlalchemy import func, select, update

    beats = models.TrialHeartbeatModel
    if first and session.scalar(select(beats.trial_heartbeat_id).where(beats.trial_id == trial_id)) is None:
        session.add(beats(trial_id=trial_id))
        return
    renew = update(beats).where(beats.trial_id == trial_id).values(heartbeat=func.now())
    if session.execute(renew, execution_options={"synchronize_session": False}).rowcount == 0:
        session.add(beats(trial_id=trial_id))


def claim_waiting(
    study: optuna.Study,
    count_unfinished: bool = False,
    read_attrs: bool = False,
    may_claim: Callable[[dict[str, Any]], bool] | None = None,
    look_for_stale: bool = False,
) -> Claim:
    """Move the study's oldest WAITING trial that no other worker is claiming right now to RUNNING,
    with its heartbeat, in one transaction. Also in it, first: the study's user attrs
    (``read_attrs``; ``may_claim(attrs)`` False: none taken, a paused study) and its stale trials
    (``look_for_stale``); last, when none was taken, how many trials still wait or run
    (``count_unfinished``). The trial taken is read into Optuna's cache (``trial_of_claim``).

    ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: workers claiming at once take different trials instead
    of queueing on the same row and writing heartbeats on each other's (benchmarks/fleet.py: with
    200 workers the claim through the public API took 673 transactions per trial, p50 111 s).
    SQLite serializes writers anyway (it has no SKIP LOCKED and needs none). The heartbeat goes in
    with the state change: a worker killed right after leaves a trial that goes stale and is retried
    (Optuna ignores RUNNING trials that have no heartbeat at all)."""
    rdb = rdb_of(study._storage)
    if rdb is None:  # pragma: no cover - other Optuna versions
        return _claim_public(study, count_unfinished, read_attrs, may_claim, look_for_stale)
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import select

    trials, attrs_table = models.TrialModel, models.StudyUserAttributeModel
    query = (
        select(trials)
        .where(trials.study_id == study._study_id, trials.state == TrialState.WAITING)
        .order_by(trials.trial_id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    attrs, stale = None, ()
    with _create_scoped_session(scoped_session, True) as session:
        if read_attrs:
            rows = session.execute(
                select(attrs_table.key, attrs_table.value_json).where(attrs_table.study_id == study._study_id)
            )
            attrs = {key: json.loads(value) for key, value in rows}
        if look_for_stale:
            stale = tuple(_stale_ids(session, models, study, stale_grace(study._storage)))
        trial = None if may_claim is not None and not may_claim(attrs or {}) else session.scalars(query).one_or_none()
        if trial is None:
            left = session.scalar(unfinished_query(models, study)) if count_unfinished else None
            return Claim(None, left, attrs, stale)
        trial.state, trial.datetime_start = TrialState.RUNNING, datetime.now()  # as set_trial_state_values
        trial_id = trial.trial_id
        _write_heartbeat(session, models, trial_id, first=True)
        session.flush()
        claimed = backend(study._storage)._build_frozen_trial_from_trial_model(trial)  # as get_trial reads it
    read_into_cache(study, trial_id, claimed)
    return Claim(trial_id, None, attrs, stale)


def _claim_public(
    study: optuna.Study, count_unfinished, read_attrs, may_claim, look_for_stale
) -> Claim:  # pragma: no cover
    """``claim_waiting`` through Optuna's public storage API (other Optuna versions): the
    heartbeat first, then a compare-and-set on the state."""
    from sweeper.storage.internals import study_attrs_now, waiting_trial_ids

    storage = study._storage
    attrs = study_attrs_now(study) if read_attrs else None
    stale = tuple(storage._get_stale_trial_ids(study._study_id)) if look_for_stale else ()
    if may_claim is None or may_claim(attrs or {}):
        while waiting := waiting_trial_ids(study):
            for trial_id in waiting:
                try:
                    storage.record_heartbeat(trial_id)
                    if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                        read_into_cache(study, trial_id)
                        return Claim(trial_id, None, attrs, stale)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker claimed and finished it meanwhile
    return Claim(None, unfinished_count(study) if count_unfinished else None, attrs, stale)
