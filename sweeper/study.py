"""Optuna storage, the trial queue and heartbeats.

Every grid cell is one WAITING trial whose user attrs name its cell (``sweeper.key``).
Workers claim trials with a compare-and-set on the trial state, so an empty queue never makes
Optuna invent a trial (``Study.ask()`` would sample a new one when nothing waits).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import threading
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from sweeper import settings
from sweeper.contract import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL
from sweeper.errors import SweeperError, root_cause
from sweeper.redact import quote_password, redact, redact_url, remember
from sweeper.spec import Cell, StudySpec, decision_metric, variant_cfgs

log = logging.getLogger("sweeper.study")

MAX_RETRY = 3  # retries of a trial whose worker died
SPEC_ATTR = "sweeper.spec"
SPEC_HASH_ATTR = "sweeper.spec_hash"
KEY_ATTR = "sweeper.key"
RECIPE_ATTR = "sweeper.recipe"  # the resolved recipe the trial was enqueued with: it trains with exactly this
RECIPE_DIGEST_ATTR = "sweeper.recipe_digest"  # with the key, the trial's identity
# The test top-1 error of a trial's latest epoch, where the trial reports another metric to Optuna
# (validation); otherwise the intermediate values are the top-1 errors.
TOP1_ERROR_ATTR = "sweeper.top1_error"
IDENTITY_ATTRS = (KEY_ATTR, RECIPE_ATTR, RECIPE_DIGEST_ATTR)
FAIL_REASON_ATTR = "sweeper.fail_reason"
NO_RETRY_ATTR = "sweeper.no_retry"  # a trial failed for a reason retrying cannot fix
LIFECYCLE_ATTR = "sweeper.lifecycle"  # {"state", "reason", "at"}: what every worker obeys
FAILED_CELLS_ATTR = "sweeper.failed_cells"  # cells failed for good, already announced
OUTCOME_ATTR = "sweeper.outcome"  # running / finished / failed, as last mirrored to MLflow
LIFECYCLE_STATES = ("running", "paused", "stopped", "cancelled")
SCHEMA_LOCK_KEY = zlib.crc32(b"sweeper.optuna-schema")
STATES = ("WAITING", "RUNNING", "COMPLETE", "PRUNED", "FAIL")


def default_storage_url() -> str:
    return f"sqlite:///{settings.home() / 'optuna.db'}"


def resolve_storage_url(url: str | None) -> str:
    return quote_password(remember(url or settings.storage_url() or default_storage_url()))


def open_storage(
    url: str | None = None,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int = DEFAULT_GRACE_PERIOD,
    max_retry: int = MAX_RETRY,
    stall_timeout: float | None = None,
    create: bool = True,
) -> RDBStorage:
    """An RDBStorage with heartbeats, retries of dead workers' trials, and SQLite made safe for
    several processes (write transactions take the lock up front and wait for it).

    ``create=False`` (commands that only read): a SQLite file that does not exist is an error
    naming where it was looked for, instead of a new empty store.

    ``stall_timeout`` (workers pass their grace period): on PostgreSQL, the server ends a session
    of this process that sits idle inside a transaction that long, so a frozen worker (a paused
    VM, SIGSTOP) cannot hold row locks that the workers retrying its trial wait on."""
    url = resolve_storage_url(url)
    sqlite = url.startswith("sqlite")
    if sqlite:
        check_sqlite_file(sqlite_path(url), "Optuna storage", "--storage / SWEEPER_STORAGE", create)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    storage_kwargs = engine_kwargs
    if stall_timeout and url.startswith("postgresql"):
        options = f"-c idle_in_transaction_session_timeout={int(stall_timeout * 1000)}"
        storage_kwargs = {**engine_kwargs, "connect_args": {**engine_kwargs["connect_args"], "options": options}}
    try:
        if not create and not sqlite and not _has_schema(url, engine_kwargs):
            raise NoStore(
                f"the Optuna storage {redact_url(url)} holds no study yet (it has no Optuna tables); "
                "check the URL (--storage / SWEEPER_STORAGE), or start a study with `sweeper launch --study SPEC`"
            )
        # Experimental in Optuna (heartbeats, the retry callback), relied on knowingly: its
        # ExperimentalWarning would only reach a user (every command, every sweeper.api call).
        with _schema_lock(url, engine_kwargs, create), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                url,
                engine_kwargs=storage_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryCallback(max_retry=max_retry),
            )
    except SweeperError:
        raise
    except RuntimeError as e:  # Optuna's message for an old schema names the upgrade command
        raise SweeperError(
            f"the Optuna storage {redact_url(url)} cannot be used: {redact(e)} Stop every worker, back up the "
            f"database, then run `optuna storage upgrade --storage URL` with this storage's URL."
        ) from None
    except Exception as e:
        raise SweeperError(
            f"cannot open the Optuna storage {redact_url(url)}: {redact(root_cause(e))}. "
            "Check that the database server is running and the URL (--storage / SWEEPER_STORAGE) is right."
        ) from None
    if sqlite:
        _serialize_sqlite_writes(storage)
    return storage


class NoStore(SweeperError):
    """A command that only reads or steers found no Optuna storage there, and created none."""


def _has_schema(url: str, engine_kwargs: dict[str, Any]) -> bool:
    """Whether a database server's storage holds Optuna's tables (RDBStorage would create them)."""
    import sqlalchemy

    kwargs = {k: v for k, v in engine_kwargs.items() if k != "pool_pre_ping"}
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **kwargs)
    try:
        return sqlalchemy.inspect(engine).has_table("studies")
    finally:
        engine.dispose()


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for an in-memory database)."""
    path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def check_sqlite_file(path: Path | None, what: str, option: str, create: bool) -> None:
    """A missing file is created only by commands that write; a read-only one is refused up front
    (SQLite would fail at the first write, inside Optuna or MLflow, with a traceback)."""
    if path is None:
        return
    if not path.exists():
        if not create:
            raise NoStore(
                f"no {what} at {path}; run from the folder you launched in, set SWEEPER_HOME to that "
                f"launch's home (now {settings.home()}), or pass {option}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, path.parent):  # SQLite writes its journal beside the file
        if target.exists() and not os.access(target, os.W_OK):
            raise SweeperError(
                f"the {what} {path} is read-only ({'file' if target == path else 'its folder'} {target} cannot be "
                f"written); make it writable (chmod u+w {target}, or remount it read-write), or set SWEEPER_HOME "
                f"to a writable copy of {path.parent}"
            )


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing), held across processes of one machine."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _schema_lock(url: str, engine_kwargs: dict[str, Any], create: bool = True) -> Iterator[None]:
    """One process at a time creates or checks the schema: RDBStorage's create_all and alembic
    stamp are not safe when two processes start on a fresh database (two `sweeper launch` at
    once would both stamp alembic_version). PostgreSQL: an advisory lock; SQLite: a file lock
    next to the database."""
    if not url.startswith("postgresql"):
        path = sqlite_path(url) if url.startswith("sqlite") and create else None  # a reader writes no lock file
        with file_lock(Path(f"{path}.lock")) if path else contextlib.nullcontext():
            yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(
        url, poolclass=sqlalchemy.pool.NullPool, **{k: v for k, v in engine_kwargs.items() if k != "pool_pre_ping"}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def _serialize_sqlite_writes(storage: RDBStorage) -> None:
    """BEGIN IMMEDIATE + WAL: concurrent writers queue on the busy timeout instead of failing
    with "database is locked" when two deferred transactions both try to upgrade their lock."""
    from sqlalchemy import event

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed


def load_study(storage: RDBStorage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SweeperError(unknown_study(name, study_names(storage))) from None


def unknown_study(name: str, known: list[str]) -> str:
    """No such study: the message names the studies there are, the closest to ``name`` first."""
    import difflib

    if not known:
        return f"no study named {name!r}: this storage holds no study yet; start one with `sweeper launch --study SPEC`"
    ranked = difflib.get_close_matches(name, known, n=len(known), cutoff=0.0)
    return f"no study named {name!r} in this storage; known studies: {', '.join(ranked)}"


def open_study(name: str, url: str | None = None) -> optuna.Study:
    """An existing study, for the commands that read or steer one: where there is no store, or
    no such study in it, they create nothing (no home, database, lock file or tables)."""
    try:
        storage = open_storage(url, create=False)
    except NoStore as e:
        raise SweeperError(f"no study named {name!r}: {e}") from None
    return load_study(storage, name)


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def stored_spec(study: optuna.Study) -> dict[str, Any]:
    spec = study.user_attrs.get(SPEC_ATTR)
    if spec is None:
        raise SweeperError(f"study {study.study_name!r} was not created by `sweeper launch`")
    return spec


# --- launch: create the study and enqueue each cell once --------------------------------------


@dataclass
class EnqueueResult:
    study: optuna.Study
    added: int
    existing: int
    created: bool
    updated: bool


@contextlib.contextmanager
def study_lock(storage: RDBStorage, name: str) -> Iterator[None]:
    """One launcher (or one worker creating the study's MLflow runs) at a time per study: a
    PostgreSQL advisory lock, or a file lock on SQLite."""
    storage = getattr(storage, "_backend", storage)  # under Optuna's trial cache
    url = storage.engine.url
    if url.get_backend_name() == "postgresql":
        from sqlalchemy import text

        key = zlib.crc32(f"sweeper.launch:{name}".encode())
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    elif url.get_backend_name() == "sqlite" and url.database:
        with file_lock(Path(f"{url.database}.lock")):
            yield
    else:
        yield


def launch(storage: RDBStorage, spec: StudySpec, force_update: bool = False) -> EnqueueResult:
    """Create or load the study and enqueue every trial of the spec that it does not hold yet."""
    with study_lock(storage, spec.name):
        created = spec.name not in study_names(storage)
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            direction=spec.direction,
            sampler=make_sampler(spec),
            load_if_exists=True,
        )
        updated = False
        old_hash = study.user_attrs.get(SPEC_HASH_ATTR)
        if old_hash is not None and old_hash != spec.hash:
            if not force_update:
                raise SweeperError(
                    f"study {spec.name!r} already exists with a different spec (hash {old_hash}, "
                    f"now {spec.hash}). Give the changed study a new name (rename {spec.path}), or pass "
                    "--force-update to keep the finished trials and enqueue only the new cells (every cell again, as "
                    "new rows, when the [train] recipe changed)."
                )
            updated = True
        name_metric(study, decision_metric(spec.metric, spec.recipe.get("val_fraction", 0)))
        if study.user_attrs.get(SPEC_ATTR) != spec.to_dict():  # a changed policy or description too
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
        if old_hash != spec.hash:
            study.set_user_attr(SPEC_HASH_ATTR, spec.hash)
            study.set_user_attr(RECIPE_DIGEST_ATTR, spec.recipe_digest)
        existing = trial_keys(study)
        digest = spec.recipe_digest
        missing = [(cell, key) for cell, key in spec.trial_keys() if (key, digest) not in existing]
        # Workers claim in trial order: the longest cells first, so the long pole starts at once.
        cost = cell_costs({cell for cell, _ in missing}, spec.train, variant_cfgs(spec))
        missing.sort(key=lambda ck: -cost[ck[0]])  # stable: equal costs keep the spec's order
        enqueue_many(study, [cell_attrs(cell, key, spec.recipe, digest) for cell, key in missing])
    return EnqueueResult(study, len(missing), len(spec.trial_keys()) - len(missing), created, updated)


def cell_costs(cells, train: dict[str, Any], variants: dict[str, Any] | None = None) -> dict[Cell, int]:
    """Each cell's training work, MACs per image x images x epochs, from the module table alone
    (no torch: launch stays light). ``variants``: the study's table (built-ins plus its own)."""
    from sweeper.contract import DATASETS, VARIANTS, Recipe, count_macs

    table = VARIANTS if variants is None else variants
    costs = {}
    for cell in cells:
        info = DATASETS[cell.dataset]
        images = min(train.get("limit_train") or info.num_train, info.num_train)
        macs = count_macs(table[cell.variant], info.shape, info.num_classes)
        costs[cell] = macs * images * train.get("epochs", Recipe.epochs)
    return costs


def _rdb(study: optuna.Study):
    """Optuna's RDB table models and the storage's session factory, or None where a future
    Optuna moved them (callers then take the public API)."""
    try:
        from optuna.storages._rdb import models

        storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's trial cache
        return models, storage.scoped_session
    except (ImportError, AttributeError):  # pragma: no cover - other Optuna versions
        return None


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
    query = (
        select(attrs.trial_id, attrs.key, attrs.value_json)
        .join(trials, attrs.trial_id == trials.trial_id)
        .where(trials.study_id == study._study_id, attrs.key.in_((KEY_ATTR, RECIPE_DIGEST_ATTR)))
    )
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
    the ones ``enqueue_trial`` makes. If a future Optuna moves those internals, it falls back to
    the public API.
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


# --- what optuna-dashboard shows: the metric's name, each trial's cell as params ------------------

CELL_PARAMS = ("variant", "dataset", "seed")


def name_metric(study: optuna.Study, metric: str) -> None:
    """Name the study's objective (optuna-dashboard shows it instead of "Objective 0")."""
    if study.metric_names != [metric]:
        with warnings.catch_warnings():  # experimental in Optuna, used knowingly: nothing for a user
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])


def set_cell_params(study: optuna.Study, trial_id: int, spec: dict[str, Any], attrs: dict[str, Any]) -> None:
    """The trial's cell (its ``variant``, ``dataset`` and ``seed`` user attrs) also as Optuna
    params, so optuna-dashboard's plots and importance split by them. They are written to the
    storage as they are, never asked of the sampler (the per-cell search is unchanged), as
    categorical params over the study's grid; a cell's identity stays its user attrs. A value
    Optuna refuses (the grid changed under --force-update since the first trial recorded it)
    is left out."""
    from optuna.distributions import CategoricalDistribution

    storage = study._storage
    have = storage.get_trial(trial_id).params
    grid = spec.get("grid") or {}
    for name in CELL_PARAMS:
        value = int(attrs[name]) if name == "seed" else attrs.get(name)
        if name in have or value is None:
            continue
        try:
            distribution = CategoricalDistribution(list(grid.get(name) or [value]))
            storage.set_trial_param(trial_id, name, distribution.to_internal_repr(value), distribution)
        except ValueError as e:
            log.info("trial id %d: %s=%s not recorded as an Optuna param: %s", trial_id, name, value, e)


def cell_attrs(cell: Cell, key: str, recipe: dict[str, Any], digest: str) -> dict[str, Any]:
    return {
        KEY_ATTR: key,
        RECIPE_DIGEST_ATTR: digest,
        RECIPE_ATTR: recipe,
        "variant": cell.variant,
        "dataset": cell.dataset,
        "seed": cell.seed,
    }


def make_sampler(spec: StudySpec | dict[str, Any]) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeing only the trials of the cell it samples for (see CellSampler)."""
    search = spec.search if isinstance(spec, StudySpec) else spec.get("search")
    kind = (search or {}).get("sampler", "random")
    if kind == "random":  # reads no history
        return optuna.samplers.RandomSampler()
    return CellSampler(
        {
            "tpe": lambda: optuna.samplers.TPESampler(),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(),
            "qmc": lambda: optuna.samplers.QMCSampler(),
        }[kind]()
    )


def make_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The spec's pruner, comparing a trial only with trials of its own cell (see CellPruner)."""
    kind = (spec.get("search") or {}).get("pruner", "none")
    if kind == "none":
        return optuna.pruners.NopPruner()
    return CellPruner(
        {
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
            "hyperband": optuna.pruners.HyperbandPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        }[kind]()
    )


# --- per-cell search -------------------------------------------------------------------------
#
# One Optuna study holds every cell of a sweeper study (one queue, one place to look). Its
# sampler and pruner must still never pool cells: a naive/CIFAR-100 curve says nothing about a
# short4/digits one. So each decision is taken on a view of the study that holds only the trials
# of the deciding trial's cell and recipe, as Optuna's HyperbandPruner does for its brackets.


def cell_of(trial: optuna.trial.FrozenTrial) -> tuple[str | None, str | None]:
    """A trial's cell and recipe: its key without the search trial's "#k", and its recipe digest."""
    key = trial.user_attrs.get(KEY_ATTR) or ""
    return key.split("#", 1)[0] or None, trial.user_attrs.get(RECIPE_DIGEST_ATTR)


class CellStudy(optuna.Study):
    """The study as one cell sees it: every trial query returns that cell's trials only."""

    def __init__(self, study: optuna.Study, cell: tuple[str | None, str | None]):
        super().__init__(
            study_name=study.study_name, storage=study._storage, sampler=study.sampler, pruner=study.pruner
        )
        self.cell = cell

    def _get_trials(self, deepcopy=True, states=None, use_cache=False) -> list[optuna.trial.FrozenTrial]:
        trials = super()._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if cell_of(t) == self.cell]


class CellPruner(optuna.pruners.BasePruner):
    """Wraps a pruner so that it compares a trial only with the trials of the same cell.

    >>> pruner = CellPruner(optuna.pruners.MedianPruner())
    """

    def __init__(self, pruner: optuna.pruners.BasePruner):
        self.pruner = pruner

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self.pruner.prune(CellStudy(study, cell_of(trial)), trial)


class CellSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that it learns only from the trials of the cell it samples for."""

    def __init__(self, sampler: optuna.samplers.BaseSampler):
        self.sampler = sampler

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(CellStudy(study, cell_of(trial)), trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(CellStudy(study, cell_of(trial)), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(CellStudy(study, cell_of(trial)), trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.sampler.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.sampler.after_trial(CellStudy(study, cell_of(trial)), trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


# --- workers: claim, heartbeat, retry ----------------------------------------------------------


class RetryCallback(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial (a copy in WAITING with the same params and user attrs,
    ``mlflow_run_id`` included, so the retry continues the cell's run), minus the failed
    attempt's own ``sweeper.*`` system attrs (its fail reason is not the retry's)."""

    def __init__(self, max_retry: int = MAX_RETRY):
        super().__init__(max_retry=max_retry)
        self.default_max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("sweeper.")}
        # The study's own [policy] max_retries; one storage (and callback) serves many studies.
        self._max_retry = policy(study.user_attrs.get(SPEC_ATTR) or {}, self.default_max_retry)["max_retries"]
        super().__call__(study, trial)


def claim(study: optuna.Study) -> int | None:
    """Move one WAITING trial to RUNNING and return its id, or None when nothing waits.

    The heartbeat is written before the compare-and-set: a worker killed right after winning
    the trial leaves a heartbeat that goes stale, so the trial is retried and never stays
    RUNNING forever (Optuna ignores RUNNING trials that have no heartbeat at all)."""
    storage = study._storage
    while waiting := waiting_trial_ids(study):
        for trial_id in waiting:
            try:
                storage.record_heartbeat(trial_id)
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    _read_into_cache(study, trial_id)
                    return trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker claimed and finished it meanwhile
        # Other workers took every one of these meanwhile: look again.
    return None


def _read_into_cache(study: optuna.Study, trial_id: int) -> None:
    """Read the claimed trial into Optuna's trial cache: its ``set_trial_param`` writes a suggested
    parameter only for a trial it has read. ``get_all_trials`` would read every unfinished trial
    of the study, all 1,000 waiting ones of a big grid, on every claim; this reads one, and marks
    it unfinished so the cache re-reads it once it ends (tests/test_layers.py holds the contract)."""
    storage = study._storage
    try:
        from optuna.storages._cached_storage import _StudyInfo

        backend, lock, studies = storage._backend, storage._lock, storage._studies
    except (ImportError, AttributeError):  # pragma: no cover - not cached, or another Optuna
        storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return
    trial = backend.get_trial(trial_id)
    with lock:
        info = studies.setdefault(study._study_id, _StudyInfo())
        storage._add_trials_to_cache(study._study_id, [trial])
        info.unfinished_trial_ids.add(trial_id)


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
    query = (
        select(trials.trial_id)
        .where(trials.study_id == study._study_id, trials.state == TrialState.WAITING)
        .order_by(trials.trial_id)
        .limit(limit)
    )
    with _create_scoped_session(scoped_session) as session:
        return list(session.scalars(query))


def unfinished_count(study: optuna.Study) -> int:
    """How many of the study's trials wait or run, in one indexed count."""
    rdb = _rdb(study)
    if rdb is None:  # pragma: no cover - other Optuna versions
        states = (TrialState.WAITING, TrialState.RUNNING)
        return len(study._storage.get_all_trials(study._study_id, deepcopy=False, states=states))
    models, scoped_session = rdb
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import func, select

    trials = models.TrialModel
    query = (
        select(func.count())
        .select_from(trials)
        .where(trials.study_id == study._study_id, trials.state.in_([TrialState.WAITING, TrialState.RUNNING]))
    )
    with _create_scoped_session(scoped_session) as session:
        return session.scalar(query)


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail trials whose worker stopped beating, with a reason; the retry callback re-enqueues
    each (at most ``max_retry`` times). Two workers doing this at once fail each trial once:
    the state change is a row-locked update that refuses to touch a finished trial."""
    storage = study._storage
    if storage.get_heartbeat_interval() is None:
        return []
    backend = getattr(storage, "_backend", storage)
    grace = backend.grace_period or 2 * backend.heartbeat_interval
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_system_attr(
                trial_id, FAIL_REASON_ATTR, f"no heartbeat for over {grace}s: the worker was killed or lost"
            )
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


def requeue(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Fail a trial and enqueue its retry at once (a worker that was told to stop), counting
    towards the same retry history a dead worker's trial would have."""
    storage = study._storage
    storage.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    callback = storage.get_heartbeat_stale_trial_callback()
    callback(study, storage.get_trial(trial_id))


def hand_back(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Fail a trial and enqueue its continuation without counting a retry (the study was
    cancelled: nothing went wrong with the trial). The copy keeps the cell's MLflow run."""
    storage = study._storage
    storage.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    trial = storage.get_trial(trial_id)
    history = {k: v for k, v in trial.system_attrs.items() if k in ("failed_trial", "retry_history")}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=trial.user_attrs,
            system_attrs=history,
        )
    )


def trial_state(storage, trial_id: int) -> TrialState:
    """The trial's state as the database has it now (a finished trial may come from the cache)."""
    return getattr(storage, "_backend", storage).get_trial(trial_id).state


def is_db_error(e: BaseException) -> bool:
    """A database or connection failure that may pass (server restart, dropped connection)."""
    import sqlalchemy.exc

    return isinstance(
        e,
        (
            optuna.exceptions.StorageInternalError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.DisconnectionError,
        ),
    )


def retry_db(fn, *args, within: float, what: str = "database call", **kwargs):
    """Call ``fn``, retrying database errors for up to ``within`` seconds (then re-raise).

    A worker uses it for every storage call of a running trial, so a database blip shorter
    than the grace period neither fails the trial nor kills the worker."""
    deadline = time.monotonic() + within
    delay = 0.5
    warned = False
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not is_db_error(e) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                log.warning("%s failed (%s); retrying for up to %.0fs", what, redact(root_cause(e)), within)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if warned:
            log.info("%s succeeded after the database came back", what)
        return result


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


# --- queue queries ---------------------------------------------------------------------------


def counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    c = Counter(t.state.name for t in trials)
    return {state: c.get(state, 0) for state in STATES}


def last_epoch(trial: optuna.trial.FrozenTrial) -> int | None:
    """The latest epoch the trial reported to Optuna (the worker reports every epoch)."""
    return max(trial.intermediate_values, default=None)


def trial_rows(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    """One row per trial for `sweeper status` and the launch board."""
    rows = []
    now = time.time()
    for t in trials:
        ua, sa = t.user_attrs, t.system_attrs
        start = t.datetime_start.timestamp() if t.datetime_start else None
        end = t.datetime_complete.timestamp() if t.datetime_complete else None
        epoch = last_epoch(t)
        rows.append(
            {
                "number": t.number,
                "cell": ua.get(KEY_ATTR),
                "state": t.state.name,
                "epoch": epoch,
                "epochs": ua.get("sweeper.epochs"),
                "top1_error": ua.get(TOP1_ERROR_ATTR, t.intermediate_values.get(epoch)),
                "value": t.value if t.state == TrialState.COMPLETE else None,
                "host": ua.get("sweeper.host"),
                "elapsed_s": round((end or now) - start, 1) if start else None,
                "retry_of": sa.get("failed_trial"),
                "retry_history": sa.get("retry_history", []),
                "fail_reason": sa.get(FAIL_REASON_ATTR),
                "mlflow_run_id": ua.get("mlflow_run_id"),
            }
        )
    return rows


def retry_failed(study: optuna.Study) -> int:
    """Re-enqueue every cell whose latest trial FAILED and that has nothing waiting or done, each
    with a fresh retry budget; the study runs again, and a cell that fails for good again is
    announced (and counted by max_failed_cells) again.

    Under the study's launch lock, reading the trials afresh: two `sweeper retry` at once would
    otherwise both see a cell FAILED and both enqueue a retry of it (one MLflow run, two trials)."""
    with study_lock(getattr(study._storage, "_backend", study._storage), study.study_name):
        retried = _retry_failed(study)
        if retried:
            storage = study._storage
            attrs = getattr(storage, "_backend", storage).get_study_user_attrs(study._study_id)
            known = set(attrs.get(FAILED_CELLS_ATTR) or [])
            storage.set_study_user_attr(study._study_id, FAILED_CELLS_ATTR, sorted(known - set(retried)))
        return len(retried)


def _retry_failed(study: optuna.Study) -> list[str]:
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get(KEY_ATTR)
        if key is not None:
            latest[(key, t.user_attrs.get(RECIPE_DIGEST_ATTR))] = t  # in number order: the last one wins
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
                system_attrs={"failed_trial": t.number, "retry_history": []},
            )
        )
    return [t.user_attrs[KEY_ATTR] for t in failed]


# --- lifecycle and policy -----------------------------------------------------------------------


def policy(spec: dict[str, Any], default_max_retries: int = MAX_RETRY) -> dict[str, Any]:
    """The study's ``[policy]`` with defaults filled in."""
    given = spec.get("policy") or {}
    return {
        "max_retries": given.get("max_retries", default_max_retries),
        "max_failed_cells": given.get("max_failed_cells"),
        "trial_timeout": given.get("trial_timeout"),
    }


def lifecycle(storage: RDBStorage, study_id: int) -> dict[str, Any]:
    """The study's lifecycle state as the database has it now: ``{"state", "reason", "at"}``."""
    attrs = getattr(storage, "_backend", storage).get_study_user_attrs(study_id)
    return attrs.get(LIFECYCLE_ATTR) or {"state": "running", "reason": None, "at": None}


def set_lifecycle(study: optuna.Study, state: str, reason: str | None = None) -> dict[str, Any]:
    """Store the study's state (every worker on every host reads it before claiming and after
    each epoch); returns the previous one."""
    if state not in LIFECYCLE_STATES:
        raise ValueError(f"unknown lifecycle state {state!r}")
    import datetime

    previous = lifecycle(study._storage, study._study_id)
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    study._storage.set_study_user_attr(study._study_id, LIFECYCLE_ATTR, {"state": state, "reason": reason, "at": at})
    return previous


def latest_trials(trials: list[optuna.trial.FrozenTrial]) -> dict[str, optuna.trial.FrozenTrial]:
    """The latest trial of each trial key (a retry replaces the trial it retries)."""
    latest: dict[str, optuna.trial.FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        key = t.user_attrs.get(KEY_ATTR)
        if key is not None:
            latest[key] = t
    return latest


def failed_for_good(trial: optuna.trial.FrozenTrial, max_retries: int) -> bool:
    """A FAILed trial that no retry follows: a cause retrying cannot fix, or retries used up."""
    if trial.state != TrialState.FAIL:
        return False
    return (
        bool(trial.system_attrs.get(NO_RETRY_ATTR)) or len(trial.system_attrs.get("retry_history", [])) >= max_retries
    )


def outcome(latest: dict[str, optuna.trial.FrozenTrial], max_retries: int) -> str:
    """running while any trial waits or runs (or a retry is on its way); else failed or finished."""
    states = [t.state for t in latest.values()]
    pending = any(s in (TrialState.WAITING, TrialState.RUNNING) for s in states) or any(
        t.state == TrialState.FAIL and not failed_for_good(t, max_retries) for t in latest.values()
    )
    if pending or not states:
        return "running"
    return "failed" if any(s == TrialState.FAIL for s in states) else "finished"


@dataclass
class Settled:
    """What changed since the study was last settled."""

    outcome: str
    outcome_changed: bool
    new_failures: list[optuna.trial.FrozenTrial]
    paused: str | None  # the reason, when the failure policy paused the study just now


def settle(study: optuna.Study, completed: str | None = None) -> Settled:
    """After a trial ends: note the cells that failed for good, pause the study once
    ``max_failed_cells`` have, and compute the study's outcome. One process at a time (the
    study lock), so each change is reported once however many workers finish together.

    ``completed``, the key of a trial that just completed: while other trials still wait or run
    and that cell was not failed for good, nothing can change: neither the lock is taken nor the
    study's trials read (every one of them: 0.1-0.15 s with 1,000 trials on PostgreSQL, under the
    lock that serializes all workers' settles)."""
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    if completed is not None:  # no lock: a read that races another worker's settle sees "running"
        attrs = backend.get_study_user_attrs(study._study_id)
        if (
            completed not in (attrs.get(FAILED_CELLS_ATTR) or [])
            and attrs.get(OUTCOME_ATTR, "running") == "running"
            and unfinished_count(study)
        ):
            return Settled("running", False, [], None)
    with study_lock(storage, study.study_name):
        attrs = backend.get_study_user_attrs(study._study_id)
        rules = policy(attrs.get(SPEC_ATTR) or {})
        known = set(attrs.get(FAILED_CELLS_ATTR) or [])
        was = attrs.get(OUTCOME_ATTR, "running")
        latest = latest_trials(backend.get_all_trials(study._study_id, deepcopy=False))
        failed = {k: t for k, t in latest.items() if failed_for_good(t, rules["max_retries"])}
        new = [t for k, t in failed.items() if k not in known]
        if set(failed) != known:
            storage.set_study_user_attr(study._study_id, FAILED_CELLS_ATTR, sorted(failed))
        paused = None
        limit = rules["max_failed_cells"]
        state = (attrs.get(LIFECYCLE_ATTR) or {}).get("state", "running")
        if new and limit and len(failed) >= limit and state == "running":
            paused = (
                f"{len(failed)} cell(s) failed for good (policy max_failed_cells = {limit}); "
                "fix the cause, then `sweeper retry` and `sweeper resume`"
            )
            set_lifecycle(study, "paused", paused)
        now = outcome(latest, rules["max_retries"])
        changed = now != was
        if changed:
            storage.set_study_user_attr(study._study_id, OUTCOME_ATTR, now)
    return Settled(now, changed, new, paused)


def mark_running(study: optuna.Study) -> bool:
    """New trials were enqueued: the study runs again. True when it had been settled as done."""
    storage = study._storage
    was = getattr(storage, "_backend", storage).get_study_user_attrs(study._study_id).get(OUTCOME_ATTR, "running")
    if was != "running":
        storage.set_study_user_attr(study._study_id, OUTCOME_ATTR, "running")
    return was != "running"


# Known causes of failure: (pattern in the recorded reason, cause, fix).
FAILURE_CAUSES = (
    (r"loss became (nan|inf)", "non-finite loss", "lower [train] lr (or use another optimizer), then `sweeper retry`"),
    (r"out of memory", "out of memory", "lower [train] batch_size or use a larger GPU, then `sweeper retry`"),
    (
        r"no heartbeat",
        "worker lost",
        "a worker was killed or lost its host (look for the OOM killer in `dmesg`); the trial is retried by itself",
    ),
    (r"MLflow .* unreachable", "tracking outage", "check the MLflow server (`sweeper doctor`); the trial is retried"),
    (r"trial_timeout", "trial timeout", "raise [policy] trial_timeout or lower [train] epochs"),
    (r"stopped by a signal", "worker stopped", None),
    (r"study cancelled", "study cancelled", "`sweeper resume` continues the handed-back trials"),
)


def failure_cause(reason: str | None) -> tuple[str, str | None]:
    """(cause, fix) of a recorded fail reason; an unknown one is named by its first words."""
    import re

    text = reason or "no reason recorded"
    for pattern, cause, fix in FAILURE_CAUSES:
        if re.search(pattern, text):
            return cause, fix
    head = re.split(r"[:;(]", text, maxsplit=1)[0].strip()
    return re.sub(r"\d+", "N", head)[:80], None


def failure_groups(trials: list[optuna.trial.FrozenTrial], max_retries: int) -> list[dict[str, Any]]:
    """FAILed trials grouped by cause: how many trials, how many cells failed for good, the fix."""
    for_good = {t.number for t in latest_trials(trials).values() if failed_for_good(t, max_retries)}
    groups: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        reason = t.system_attrs.get(FAIL_REASON_ATTR)
        cause, fix = failure_cause(reason)
        if cause == "study cancelled":  # handed back, continued by its copy: nothing failed
            continue
        group = groups.setdefault(
            cause, {"cause": cause, "trials": 0, "cells_failed_for_good": 0, "fix": fix, "example": reason}
        )
        group["trials"] += 1
        group["cells_failed_for_good"] += t.number in for_good
    return sorted(groups.values(), key=lambda g: (-g["cells_failed_for_good"], -g["trials"]))
