"""Enqueue a study: create it (or check it against its spec) and add one WAITING trial per grid
cell that it does not hold yet. A cell is its trial key and recipe digest: a changed recipe
enqueues every cell again, as new rows."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage

from sweeper.errors import SweeperError
from sweeper.names import KEY_ATTR, RECIPE_ATTR, RECIPE_DIGEST_ATTR, SPEC_ATTR, SPEC_HASH_ATTR
from sweeper.spec import Cell, StudySpec, decision_metric, variant_cfgs
from sweeper.storage.connect import study_names
from sweeper.storage.internals import enqueue_many, trial_keys
from sweeper.storage.locks import study_lock
from sweeper.trials.cellsearch import make_sampler


@dataclass
class EnqueueResult:
    study: optuna.Study
    added: int
    existing: int
    created: bool
    updated: bool


def enqueue_study(storage: RDBStorage, spec: StudySpec, force_update: bool = False) -> EnqueueResult:
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


def name_metric(study: optuna.Study, metric: str) -> None:
    """Name the study's objective (optuna-dashboard shows it instead of "Objective 0")."""
    if study.metric_names != [metric]:
        with warnings.catch_warnings():  # experimental in Optuna, used knowingly: nothing for a user
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])


def cell_attrs(cell: Cell, key: str, recipe: dict[str, Any], digest: str) -> dict[str, Any]:
    return {
        KEY_ATTR: key,
        RECIPE_DIGEST_ATTR: digest,
        RECIPE_ATTR: recipe,
        "variant": cell.variant,
        "dataset": cell.dataset,
        "seed": cell.seed,
    }
