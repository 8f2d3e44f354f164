"""Per-cell search.

One Optuna study holds every cell of a sweeper study (one queue, one place to look). Its
sampler and pruner must still never pool cells: a naive/CIFAR-100 curve says nothing about a
short4/digits one. So each decision is taken on a view of the study that holds only the trials
of the deciding trial's cell and recipe, as Optuna's HyperbandPruner does for its brackets.
"""

from __future__ import annotations

from typing import Any

import optuna

from sweeper.names import KEY_ATTR, RECIPE_DIGEST_ATTR
from sweeper.spec import StudySpec
from sweeper.storage.internals import storage_of


def cell_of(trial: optuna.trial.FrozenTrial) -> tuple[str | None, str | None]:
    """A trial's cell and recipe: its key without the search trial's "#k", and its recipe digest."""
    key = trial.user_attrs.get(KEY_ATTR) or ""
    return key.split("#", 1)[0] or None, trial.user_attrs.get(RECIPE_DIGEST_ATTR)


class CellStudy(optuna.Study):
    """The study as one cell sees it: every trial query returns that cell's trials only."""

    def __init__(self, study: optuna.Study, cell: tuple[str | None, str | None]):
        super().__init__(
            study_name=study.study_name, storage=storage_of(study), sampler=study.sampler, pruner=study.pruner
        )
        self.cell = cell

    # A subclass hook, and the one place outside sweeper.storage that names an Optuna private:
    # Study routes every trial query (get_trials, best_trial, the samplers' and pruners' reads)
    # through _get_trials, so overriding it filters them all (Optuna's HyperbandPruner wraps a
    # study for its brackets the same way). It must stay: a wrapper object would miss reads.
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
