"""The fast paths through Optuna's private API, and the few private attributes sweeper reads.

Every use of Optuna's internals in sweeper is here or in storage.leases (``Study._storage``, the
cached storage's backend and cache, the RDB table models). Each fast path falls back to the public API where a
future Optuna moved what it uses; tests/test_layers.py checks that each still does what the public
API does.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any

import optuna
from optuna.trial import TrialState

from sweeper.names import KEY_ATTR, RECIPE_DIGEST_ATTR

log = logging.getLogger("sweeper.study")

CELL_PARAMS = ("variant", "dataset", "seed")


def storage_of(study: optuna.Study):
    """The study's storage (Optuna's trial cache over the RDB storage, as Optuna opens it)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def backend(storage):
    """The RDB storage under Optuna's trial cache: what it reads comes from the database now."""
    return getattr(storage, "_backend", storage)


def study_attrs_now(study: optuna.Study) -> dict[str, Any]:
    """The study's user attrs as the database has them now (``Study.user_attrs`` may be cached)."""
    return backend(study._storage).get_study_user_attrs(study._study_id)


def trials_now(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Every trial of the study as the database has it now (not through Optuna's trial cache)."""
    return backend(study._storage).get_all_trials(study._study_id, deepcopy=False)


def frozen_trial(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The trial as it was read when the ``optuna.Trial`` was made (no database read)."""
    return trial._cached_frozen_trial


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None = None, state: TrialState | None = None) -> None:
    """``study.tell`` from the trial as the worker holds it (Study.tell reads the whole trial first
    and back after). Ownership is checked where it is written: ``set_trial_state_values`` raises
    UpdateFinishedTrialError, under the row lock, for a trial finished meanwhile (taken over, or
    told by this worker's commit whose answer was lost; Study.tell's read made that a ValueError)."""
    try:
        from optuna import pruners
    except ImportError:  # pragma: no cover - another Optuna
        study.tell(trial, value, state)
        return
    frozen = frozen_trial(trial)
    state = TrialState.COMPLETE if state is None else state
    values = None
    if state == TrialState.COMPLETE:
        values = [float(value)]
    elif state == TrialState.PRUNED and frozen.last_step is not None:  # as Optuna: the last report
        last = frozen.intermediate_values[frozen.last_step]
        values = [float(last)] if math.isfinite(last) else None
    try:
        study.sampler.after_trial(pruners._filter_study(study, frozen), frozen, state, values)
    finally:
        study._storage.set_trial_state_values(frozen._trial_id, state, values)


def trial_state(storage, trial_id: int) -> TrialState:
    """The trial's state as the database has it now (a finished trial may come from the cache)."""
    return backend(storage).get_trial(trial_id).state


def _rdb(study: optuna.Study):
    """Optuna's RDB table models and the storage's session factory, or None where a future
    Optuna moved them (callers then take the public API)."""
    return rdb_of(study._storage)


def trial_keys(study: optuna.Study) -> set[tuple[str | None, str | None]]:
    """(``sweeper.key``, recipe digest) of every trial in the study, in one query
    (``get_all_trials`` builds every trial with all its rows: over a second for 1,000 trials)."""
    import json

    rdb = _rdb(study)
    if rdb is None:  # pragma: no cover - other Optuna versions
        return {
            (t.user_attrs.get(KEY_ATTR), t.user_attrs.get(RECIPE_DIGEST_ATTR)) for t in study.get_trials(deepcopy=False)
        }
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import select

    attrs, trials = models.TrialUserAttributeModel, models.TrialModel
    query = select(attrs.trial_id, attrs.key, attrs.value_json).join(trials, attrs.trial_id == trials.trial_id)
    query = query.where(trials.study_id == study._study_id, attrs.key.in_((KEY_ATTR, RECIPE_DIGEST_ATTR)))
    by_trial: dict[int, dict[str, Any]] = {}
    with _create_scoped_session(scoped_session) as session:
        for trial_id, key, value in session.execute(query):
            by_trial.setdefault(trial_id, {})[key] = json.loads(value)
    return {(a.get(KEY_ATTR), a.get(RECIPE_DIGEST_ATTR)) for a in by_trial.values()}


def enqueue_many(study: optuna.Study, user_attrs: list[dict[str, Any]]) -> None:
    """Enqueue one WAITING trial per entry, as a few bulk INSERTs in one transaction.

    ``Study.enqueue_trial`` commits each trial on its own and looks up every attribute row
    (~14 statements a trial: 23 s for 1,000 cells on PostgreSQL here). This writes the same rows
    through Optuna's own table models, holding the study row lock that Optuna's trial creation
    takes, and numbers the trials as Optuna does; tests/test_layers.py checks that the trials are
    the ones ``enqueue_trial`` makes.
    """
    import json

    rdb = _rdb(study)
    if rdb is None:  # pragma: no cover - other Optuna versions
        for attrs in user_attrs:
            study.enqueue_trial({}, user_attrs=attrs)
        return
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import func, insert, select

    trials, study_id = models.TrialModel, study._study_id
    for start in range(0, len(user_attrs), 1000):  # bounded transactions
        chunk = user_attrs[start : start + 1000]
        with _create_scoped_session(scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            first = session.scalar(select(func.count()).select_from(trials).where(trials.study_id == study_id))
            ids = session.scalars(
                insert(trials).returning(trials.trial_id, sort_by_parameter_order=True),
                [{"number": first + i, "study_id": study_id, "state": TrialState.WAITING} for i in range(len(chunk))],
            ).all()
            session.execute(
                insert(models.TrialUserAttributeModel),
                [
                    {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                    for trial_id, attrs in zip(ids, chunk)
                    for key, value in attrs.items()
                ],
            )
            # What enqueue_trial({}) records: the (empty) parameters a claimed trial must take.
            session.execute(
                insert(models.TrialSystemAttributeModel),
                [{"trial_id": trial_id, "key": "fixed_params", "value_json": json.dumps({})} for trial_id in ids],
            )


def read_into_cache(study: optuna.Study, trial_id: int, trial: optuna.trial.FrozenTrial | None = None) -> None:
    """Read the claimed trial into Optuna's trial cache: its ``set_trial_param`` writes a suggested
    parameter only for a trial it has read. ``get_all_trials`` would read every unfinished trial
    of the study, all 1,000 waiting ones of a big grid, on every claim; this reads one (or takes
    ``trial``, read by the claim), and marks it unfinished so the cache re-reads it once it ends
    (tests/test_layers.py holds the contract)."""
    storage = study._storage
    try:
        from optuna.storages._cached_storage import _StudyInfo

        uncached, lock, studies = storage._backend, storage._lock, storage._studies
    except (ImportError, AttributeError):  # pragma: no cover - not cached, or another Optuna
        storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return
    trial = trial or uncached.get_trial(trial_id)
    with lock:
        info = studies.setdefault(study._study_id, _StudyInfo())
        storage._add_trials_to_cache(study._study_id, [trial])
        info.unfinished_trial_ids.add(trial_id)


def trial_of_claim(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """``optuna.Trial(study, trial_id)`` from the trial as its claim read it into Optuna's cache
    (``read_into_cache``): Optuna's constructor reads it again, a transaction per trial.
    tests/test_layers.py checks both are the same trial."""
    try:
        from optuna import pruners

        cache = study._storage
        with cache._lock:
            number = cache._trial_id_to_study_id_and_number[trial_id][1]
            frozen = copy.deepcopy(cache._studies[study._study_id].trials[number])
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - not read by a claim, another Optuna
        frozen = None
    if frozen is None or frozen.state != TrialState.RUNNING:  # not as its claim left it
        return optuna.Trial(study, trial_id)
    trial = optuna.Trial.__new__(optuna.Trial)  # what Trial.__init__ does, less its read
    trial.study, trial._trial_id, trial.storage = study, trial_id, study._storage
    trial._cached_frozen_trial = frozen
    study.sampler.before_trial(pruners._filter_study(study, frozen), frozen)
    trial.relative_search_space, trial._relative_params = None, None
    trial._fixed_params = frozen.system_attrs.get("fixed_params", {})
    return trial


def waiting_trial_ids(study: optuna.Study, limit: int = 16) -> list[int]:
    """The ids of the first ``limit`` WAITING trials, oldest first, in one indexed query
    (``get_all_trials`` builds every waiting trial with all its rows)."""
    rdb = _rdb(study)
    if rdb is None:  # pragma: no cover - other Optuna versions
        trials = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        return [t._trial_id for t in trials[:limit]]
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import select

    trials = models.TrialModel
    waiting = select(trials.trial_id).where(trials.study_id == study._study_id, trials.state == TrialState.WAITING)
    with _create_scoped_session(scoped_session) as session:
        return list(session.scalars(waiting.order_by(trials.trial_id).limit(limit)))


def unfinished_count(study: optuna.Study) -> int:
    """How many of the study's trials wait or run, in one indexed count."""
    rdb = _rdb(study)
    if rdb is None:  # pragma: no cover - other Optuna versions
        states = (TrialState.WAITING, TrialState.RUNNING)
        return len(study._storage.get_all_trials(study._study_id, deepcopy=False, states=states))
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(scoped_session) as session:
        return session.scalar(unfinished_query(models, study))


def unfinished_query(models, study: optuna.Study):
    """SELECT the number of the study's WAITING or RUNNING trials (one indexed count)."""
    from sqlalchemy import func, select

    trials = models.TrialModel
    states = trials.state.in_([TrialState.WAITING, TrialState.RUNNING])
    return select(func.count()).select_from(trials).where(trials.study_id == study._study_id, states)


def attrs_and_unfinished(study: optuna.Study) -> tuple[dict[str, Any], int]:
    """The study's user attrs as the database has them now and how many of its trials wait or
    run, in one transaction (what every trial's end looks at: sweeper.trials.outcomes.settle)."""
    rdb = _rdb(study)
    if rdb is None:  # pragma: no cover - other Optuna versions
        return study_attrs_now(study), unfinished_count(study)
    models, scoped_session = rdb
    import json

    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import select

    attrs = models.StudyUserAttributeModel
    with _create_scoped_session(scoped_session) as session:
        rows = session.execute(select(attrs.key, attrs.value_json).where(attrs.study_id == study._study_id))
        return {key: json.loads(value) for key, value in rows}, session.scalar(unfinished_query(models, study))


def set_cell_params(
    study: optuna.Study,
    trial_id: int,
    spec: dict[str, Any],
    attrs: dict[str, Any],
    user_attrs: dict[str, Any] | None = None,
) -> None:
    """The trial's cell (its ``variant``, ``dataset`` and ``seed`` user attrs) also as Optuna
    params, so optuna-dashboard's plots and importance split by them. They are written to the
    storage as they are, never asked of the sampler (the per-cell search is unchanged), as
    categorical params over the study's grid; a cell's identity stays its user attrs. A value
    Optuna refuses (the grid changed under --force-update since the first trial recorded it)
    is left out. ``user_attrs`` are set on the trial too: all of it in one transaction (Optuna's
    API takes one per value), through the RDB storage's own per-value steps."""
    from optuna.distributions import CategoricalDistribution

    grid = spec.get("grid") or {}
    wanted = {}
    for name in CELL_PARAMS:
        value = int(attrs[name]) if name == "seed" else attrs.get(name)
        if value is not None:
            wanted[name] = (value, CategoricalDistribution(list(grid.get(name) or [value])))
    rdb = _rdb(study)
    if rdb is None:  # pragma: no cover - other Optuna versions
        storage = study._storage
        for key, value in (user_attrs or {}).items():
            storage.set_trial_user_attr(trial_id, key, value)
        have = storage.get_trial(trial_id).params
        for name, (value, distribution) in wanted.items():
            if name not in have:
                _set_param(trial_id, name, value, distribution, storage.set_trial_param)
        return
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import select

    rdb_storage = backend(study._storage)
    params = models.TrialParamModel
    with _create_scoped_session(scoped_session, True) as session:
        for key, value in (user_attrs or {}).items():
            rdb_storage._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
        have = set(session.scalars(select(params.param_name).where(params.trial_id == trial_id)))
        for name, (value, distribution) in wanted.items():
            if name not in have:
                set_param = functools.partial(rdb_storage._set_trial_param_without_commit, session)
                _set_param(trial_id, name, value, distribution, set_param)


def _set_param(trial_id: int, name: str, value: Any, distribution, set_param) -> None:
    """One cell param through ``set_param`` (Optuna's signature); a value refused is logged."""
    try:
        set_param(trial_id, name, distribution.to_internal_repr(value), distribution)
    except ValueError as e:
        log.info("trial id %d: %s=%s not recorded as an Optuna param: %s", trial_id, name, value, e)


def rdb_of(storage):
    """``_rdb`` for a storage."""
    try:
        from optuna.storages._rdb import models

        return models, backend(storage).scoped_session
    except (ImportError, AttributeError):  # pragma: no cover - other Optuna versions
        return None
