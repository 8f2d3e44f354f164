"""Study specs: ``experiments/NAME.toml`` -> a validated StudySpec.

description = "GoogLeNet depth variants on CIFAR-100"
metric = "top1_error"
direction = "minimize"

[grid]            # every combination is one grid cell
variant = ["standard", "short4"]
dataset = ["cifar100"]
seed = [1]

[train]           # the recipe handed to fit(); see sweeper.contract.Recipe
epochs = 14

[search]          # optional: Optuna samples these for every trial
trials_per_cell = 20
sampler = "tpe"
pruner = "median"
[search.space]
lr = { low = 0.05, high = 2.0, log = true }
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sweeper.contract import DATASETS, VARIANTS, Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METRICS = ("top1_error", "top5_error", "test_loss")
DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "cmaes", "qmc")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
GRID_KEYS = ("variant", "dataset", "seed")
SEARCHABLE = ("lr", "lr_gamma", "batch_size", "momentum", "weight_decay", "epochs")
TOP_KEYS = ("description", "metric", "direction", "grid", "train", "search")
SEARCH_KEYS = ("trials_per_cell", "sampler", "pruner", "space")


class SpecError(ValueError):
    """An invalid study spec; the message names the file, the key and the allowed values."""


@dataclass(frozen=True)
class Cell:
    variant: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.dataset}/s{self.seed}"


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: str
    description: str
    metric: str
    direction: str
    grid: dict[str, list[Any]]
    train: dict[str, Any]
    search: dict[str, Any] | None = None
    cells: tuple[Cell, ...] = field(default=())

    @property
    def trials_per_cell(self) -> int:
        return self.search["trials_per_cell"] if self.search else 1

    def trial_keys(self) -> list[tuple[Cell, str]]:
        """(cell, trial key) for every trial the study should hold, in launch order."""
        if not self.search:
            return [(cell, cell.key) for cell in self.cells]
        return [(cell, f"{cell.key}#{i}") for cell in self.cells for i in range(1, self.trials_per_cell + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "direction": self.direction,
            "grid": self.grid,
            "train": self.train,
            "search": self.search,
        }

    @property
    def hash(self) -> str:
        """Identity of what the study computes; the description is free text and left out."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("description", "name")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def spec_dirs() -> list[Path]:
    """./experiments in a checkout first, then the specs shipped in the package."""
    dirs = [Path.cwd() / "experiments"]
    shipped = Path(str(resources.files("sweeper.experiments")))
    if shipped.resolve() != dirs[0].resolve():
        dirs.append(shipped)
    return [d for d in dirs if d.is_dir()]


def find(study: str) -> Path:
    if study.endswith(".toml"):
        path = Path(study)
        if not path.is_file():
            raise SpecError(f"study file {study} does not exist")
        return path
    for d in spec_dirs():
        path = d / f"{study}.toml"
        if path.is_file():
            return path
    names = sorted({p.stem for d in spec_dirs() for p in d.glob("*.toml")})
    raise SpecError(f"no study named {study!r}; known studies: {', '.join(names)} (or pass a path to a .toml file)")


def available() -> list[Path]:
    seen: dict[str, Path] = {}
    for d in spec_dirs():
        for path in sorted(d.glob("*.toml")):
            seen.setdefault(path.stem, path)
    return list(seen.values())


def load(study: str) -> StudySpec:
    path = find(study)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    return parse(raw, name=path.stem, path=str(path))


def parse(raw: dict[str, Any], name: str, path: str = "<spec>") -> StudySpec:
    def fail(key: str, problem: str) -> SpecError:
        return SpecError(f"{path}: {key}: {problem}")

    _check_keys(raw, TOP_KEYS, "top level", fail)
    description = raw.get("description", "")
    metric = raw.get("metric", "top1_error")
    if metric not in METRICS:
        raise fail("metric", f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    direction = raw.get("direction", "minimize")
    if direction not in DIRECTIONS:
        raise fail("direction", f"must be one of {', '.join(DIRECTIONS)}, got {direction!r}")

    grid = raw.get("grid")
    if not isinstance(grid, dict):
        raise fail("[grid]", 'missing; it lists variant, dataset and seed values, e.g. variant = ["standard"]')
    _check_keys(grid, GRID_KEYS, "[grid]", fail)
    allowed = {"variant": list(VARIANTS), "dataset": list(DATASETS)}
    for key in GRID_KEYS:
        values = grid.get(key, [1] if key == "seed" else None)
        if not isinstance(values, list) or not values:
            raise fail(
                f"grid.{key}",
                "must be a non-empty list" + (f" of: {', '.join(allowed[key])}" if key in allowed else " of integers"),
            )
        for value in values:
            if key == "seed":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise fail("grid.seed", f"seeds must be integers, got {value!r}")
            elif value not in allowed[key]:
                raise fail(f"grid.{key}", f"unknown {key} {value!r}; allowed: {', '.join(allowed[key])}")
        if len(set(values)) != len(values):
            raise fail(f"grid.{key}", "lists a value twice")
    grid = {key: list(grid.get(key, [1])) for key in GRID_KEYS}

    train = raw.get("train", {})
    if not isinstance(train, dict):
        raise fail("[train]", "must be a table of recipe values")
    if "seed" in train:
        raise fail("train.seed", "seeds belong in [grid] seed = [...]")
    try:
        Recipe.from_dict(train)
    except ValueError as e:
        raise fail("[train]", str(e)) from None

    search = raw.get("search")
    if search is not None:
        search = _parse_search(search, fail)

    cells = tuple(Cell(v, d, s) for v, d, s in itertools.product(grid["variant"], grid["dataset"], grid["seed"]))
    return StudySpec(name, path, description, metric, direction, grid, dict(train), search, cells)


def _parse_search(search: Any, fail) -> dict[str, Any]:
    if not isinstance(search, dict):
        raise fail("[search]", "must be a table")
    _check_keys(search, SEARCH_KEYS, "[search]", fail)
    trials = search.get("trials_per_cell", 10)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise fail("search.trials_per_cell", f"must be a positive integer, got {trials!r}")
    sampler = search.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise fail("search.sampler", f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    pruner = search.get("pruner", "none")
    if pruner not in PRUNERS:
        raise fail("search.pruner", f"unknown pruner {pruner!r}; allowed: {', '.join(PRUNERS)}")
    space = search.get("space")
    if not isinstance(space, dict) or not space:
        raise fail("[search.space]", f"must name at least one of: {', '.join(SEARCHABLE)}")
    for key, dist in space.items():
        where = f"search.space.{key}"
        if key not in SEARCHABLE:
            raise fail(where, f"cannot be searched; allowed: {', '.join(SEARCHABLE)}")
        if not isinstance(dist, dict):
            raise fail(where, "must be { low = ..., high = ... [, log = true] } or { choices = [...] }")
        if "choices" in dist:
            _check_keys(dist, ("choices",), where, fail)
            if not isinstance(dist["choices"], list) or not dist["choices"]:
                raise fail(where, "choices must be a non-empty list")
            continue
        _check_keys(dist, ("low", "high", "log", "step"), where, fail)
        low, high = dist.get("low"), dist.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise fail(where, f"needs numbers low < high, got low={low!r}, high={high!r}")
        if dist.get("log") and low <= 0:
            raise fail(where, "log = true needs low > 0")
    return {"trials_per_cell": trials, "sampler": sampler, "pruner": pruner, "space": space}


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str, fail) -> None:
    for key in table:
        if key not in allowed:
            raise fail(
                f"{where} key {key!r}" if where != "top level" else repr(key),
                f"unknown key; allowed: {', '.join(allowed)}",
            )
