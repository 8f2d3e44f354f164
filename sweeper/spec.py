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

[policy]          # optional: what to do about failures
max_retries = 3         # retries of a cell whose trial failed (worker lost, MLflow outage...)
max_failed_cells = 2    # the study pauses itself once this many cells failed for good
trial_timeout = 3600    # seconds; a trial running longer checkpoints at its epoch's end and is re-queued

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
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sweeper.contract import DATASETS, RECIPE_RULES, VARIANTS
from sweeper.validation import BadValue, Rule, check_distribution, check_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METRICS = ("top1_error", "top5_error", "test_loss")
# The validation twin of each metric: with [train] val_fraction > 0 the Optuna value, pruning and
# search read it, and the test split is never read for a decision.
VAL_METRICS = {"top1_error": "val_top1_error", "top5_error": "val_top5_error", "test_loss": "val_loss"}
DEFAULT_SEARCH_VAL_FRACTION = 0.1
# Recipe keys that change how a trial runs, not what it computes: left out of the recipe digest.
OPERATIONAL_KEYS = ("checkpoint_every",)
DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "cmaes", "qmc")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
GRID_KEYS = ("variant", "dataset", "seed")
SEARCHABLE = ("lr", "lr_gamma", "batch_size", "momentum", "weight_decay", "epochs")
# Plain values of the top level and of [search]; a new key is a new row (see sweeper.validation).
TOP_RULES = {
    "description": Rule(str),
    "metric": Rule(str, choices=METRICS),
    "direction": Rule(str, choices=DIRECTIONS),
}
TOP_DEFAULTS = {"description": "", "metric": "top1_error", "direction": "minimize"}
SEARCH_RULES = {
    "trials_per_cell": Rule(int, ge=1),
    "sampler": Rule(str, choices=SAMPLERS),
    "pruner": Rule(str, choices=PRUNERS),
}
SEARCH_DEFAULTS = {"trials_per_cell": 10, "sampler": "tpe", "pruner": "none"}
POLICY_RULES = {
    "max_retries": Rule(int, ge=0),
    "max_failed_cells": Rule(int, ge=1, optional=True),
    "trial_timeout": Rule(float, gt=0, optional=True),
}
TOP_KEYS = (*TOP_RULES, "grid", "train", "search", "variants", "policy")
VARIANT_KEYS = ("stages", "block", "description")
BLOCKS = ("bottleneck", "naive")
SEARCH_KEYS = (*SEARCH_RULES, "space")


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


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
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # declared in [variants.NAME]
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def trials_per_cell(self) -> int:
        return self.search["trials_per_cell"] if self.search else 1

    def trial_keys(self) -> list[tuple[Cell, str]]:
        """(cell, trial key) for every trial the study should hold, in launch order."""
        if not self.search:
            return [(cell, cell.key) for cell in self.cells]
        return [(cell, f"{cell.key}#{i}") for cell in self.cells for i in range(1, self.trials_per_cell + 1)]

    @property
    def recipe(self) -> dict[str, Any]:
        """The resolved recipe every trial of this spec is enqueued with (see resolve_recipe)."""
        return resolve_recipe(self.train)

    @property
    def recipe_digest(self) -> str:
        return recipe_digest(self.train)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "direction": self.direction,
            "grid": self.grid,
            "train": self.train,
            "search": self.search,
            **({"variants": self.variants} if self.variants else {}),
            "policy": self.policy,
        }

    @property
    def hash(self) -> str:
        """Identity of what the study computes; the description and the policy are left out."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("description", "name", "policy")}
        content["recipe"] = self.recipe_digest  # a changed default recipe value changes the study too
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def resolve_recipe(train: dict[str, Any]) -> dict[str, Any]:
    """Every recipe value a trial trains with, defaults filled in; the seed comes from the cell.

    >>> resolve_recipe({"epochs": 3})["epochs"], resolve_recipe({"epochs": 3})["optimizer"]
    (3, 'adadelta')
    """
    from sweeper.contract import Recipe

    return {k: v for k, v in Recipe.from_dict(train).to_dict().items() if k != "seed"}


def recipe_digest(train: dict[str, Any]) -> str:
    """A short digest of the resolved recipe: part of every trial's identity, so a changed
    recipe is a new row, never mixed into the old one's.

    >>> recipe_digest({"epochs": 3}) == recipe_digest({"epochs": 3, "optimizer": "adadelta"})
    True
    """
    values = {k: v for k, v in resolve_recipe(train).items() if k not in OPERATIONAL_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def decision_metric(metric: str, val_fraction: float) -> str:
    """The per-epoch metric that the Optuna value, pruning and search read.

    >>> decision_metric("top1_error", 0.1), decision_metric("top1_error", 0.0)
    ('val_top1_error', 'top1_error')
    """
    return VAL_METRICS[metric] if val_fraction else metric


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

    check_name(name, path)
    _check_keys(raw, TOP_KEYS, "top level", fail)
    top = {key: raw.get(key, default) for key, default in TOP_DEFAULTS.items()}
    _check_rules(top, TOP_RULES, "", fail)

    grid = raw.get("grid")
    if not isinstance(grid, dict):
        raise fail("[grid]", 'missing; it lists variant, dataset and seed values, e.g. variant = ["standard"]')
    _check_keys(grid, GRID_KEYS, "[grid]", fail)
    variants = _parse_variants(raw.get("variants", {}), fail)
    allowed = {"variant": [*VARIANTS, *variants], "dataset": list(DATASETS)}
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
        check_table(train, RECIPE_RULES, "recipe key")
    except BadValue as e:
        raise fail(f"train.{e.key}", e.problem) from None

    search = raw.get("search")
    if search is not None:
        search = _parse_search(search, fail)
        train = {**train, "val_fraction": train.get("val_fraction", DEFAULT_SEARCH_VAL_FRACTION)}

    _check_split(train, grid["dataset"], fail)
    policy = _parse_policy(raw.get("policy", {}), fail)
    cells = tuple(Cell(v, d, s) for v, d, s in itertools.product(grid["variant"], grid["dataset"], grid["seed"]))
    return StudySpec(
        name,
        path,
        top["description"],
        top["metric"],
        top["direction"],
        grid,
        dict(train),
        search,
        cells,
        variants,
        policy,
    )


def _check_split(train: dict[str, Any], datasets: list[str], fail) -> None:
    """A validation slice that would leave a side empty: ``round(fraction x n)`` images of each
    class are held out (n about the training images over the classes), so every trial would fail."""
    fraction = train.get("val_fraction") or 0
    if not fraction:
        return
    for name in datasets:
        info = DATASETS[name]
        images = min(train.get("limit_train") or info.num_train, info.num_train)
        per_class = images / info.num_classes
        held_out = round(per_class * fraction)
        side = "no training image" if per_class - held_out < 1 else "no validation image" if held_out < 1 else None
        if side:
            raise fail(
                "train.val_fraction",
                f"{fraction:g} of {images} training images leaves {side} ({name}: {info.num_classes} classes, about "
                f"{per_class:.0f} images each); {'lower' if side.endswith('training image') else 'raise'} "
                "val_fraction or raise limit_train",
            )


def _parse_variants(table: Any, fail) -> dict[str, dict[str, Any]]:
    """[variants.NAME] tables: Inception modules by stage, as the built-in variants are declared."""
    from sweeper.contract import MODULES

    if not isinstance(table, dict):
        raise fail("[variants]", 'must hold tables like [variants.mine] with stages = [["a3"], ["c4"], ["b5"]]')
    out = {}
    for name, raw in table.items():
        where = f"variants.{name}"
        if name in VARIANTS:
            raise fail(where, f"{name!r} is a built-in variant; give yours another name")
        if not NAME_PATTERN.fullmatch(name):
            raise fail(where, "a variant name may hold only letters, digits, '.', '_' and '-'")
        if not isinstance(raw, dict):
            raise fail(where, "must be a table with stages = [[...], ...] and optionally block")
        _check_keys(raw, VARIANT_KEYS, f"[{where}]", fail)
        stages = raw.get("stages")
        example = '[["a3"], ["c4"], ["b5"]]'
        if not isinstance(stages, list) or not stages or not all(isinstance(st, list) and st for st in stages):
            raise fail(f"{where}.stages", f"must be a non-empty list of non-empty lists of modules, e.g. {example}")
        for stage in stages:
            for module in stage:
                if module not in MODULES:
                    raise fail(f"{where}.stages", f"unknown module {module!r}; allowed: {', '.join(MODULES)}")
        block = raw.get("block", "bottleneck")
        if block not in BLOCKS:
            raise fail(f"{where}.block", f"must be one of: {', '.join(BLOCKS)}, got {block!r}")
        description = raw.get("description", f"declared in the study spec: {len(sum(stages, []))} modules")
        if not isinstance(description, str):
            raise fail(f"{where}.description", "must be a string")
        out[name] = {"stages": [list(st) for st in stages], "block": block, "description": description}
    return out


def variant_cfgs(spec: StudySpec | dict[str, Any]) -> dict[str, Any]:
    """Every variant a study can build: the built-in ones and those its spec declares.

    >>> cfgs = variant_cfgs({"variants": {"mine": {"stages": [["a3"], ["b5"]], "block": "bottleneck"}}})
    >>> cfgs["mine"].inception_modules, "standard" in cfgs
    (2, True)
    """
    from sweeper.contract import VariantCfg

    declared = spec.variants if isinstance(spec, StudySpec) else (spec.get("variants") or {})
    return {
        **VARIANTS,
        **{
            name: VariantCfg(tuple(tuple(st) for st in v["stages"]), v["block"], v.get("description", ""))
            for name, v in declared.items()
        },
    }


def check_name(name: str, path: str = "<spec>") -> None:
    """A study name becomes a folder name (checkpoints) and an experiment name: no paths."""
    if not NAME_PATTERN.fullmatch(name) or set(name) <= {"."}:
        raise SpecError(
            f"{path}: the study name {name!r} (the file's name without .toml) may hold only letters, digits, "
            "'.', '_' and '-', must start with a letter or digit and be at most 100 characters; rename the file"
        )


def check_stored(stored: dict[str, Any], study: str) -> None:
    """Check a spec as a storage holds it (a worker does before it trains: the storage may hold
    one written by an older sweeper or by hand); raises SpecError naming the study and key."""
    raw = {k: v for k, v in stored.items() if k != "name"}
    parse(raw, name=study, path=f"the spec stored in study {study!r}")


def _check_rules(values: dict[str, Any], rules: dict[str, Rule], prefix: str, fail) -> None:
    try:
        check_table(values, rules)
    except BadValue as e:
        raise fail(f"{prefix}{e.key}", e.problem) from None


def _parse_policy(policy: Any, fail) -> dict[str, Any]:
    if not isinstance(policy, dict):
        raise fail("[policy]", f"must be a table of: {', '.join(POLICY_RULES)}")
    _check_rules(policy, POLICY_RULES, "policy.", fail)
    return dict(policy)


def _parse_search(search: Any, fail) -> dict[str, Any]:
    if not isinstance(search, dict):
        raise fail("[search]", "must be a table")
    _check_keys(search, SEARCH_KEYS, "[search]", fail)
    values = {key: search.get(key, default) for key, default in SEARCH_DEFAULTS.items()}
    _check_rules(values, SEARCH_RULES, "search.", fail)
    space = search.get("space")
    if not isinstance(space, dict) or not space:
        raise fail("[search.space]", f"must name at least one of: {', '.join(SEARCHABLE)}")
    for key, dist in space.items():
        where = f"search.space.{key}"
        if key not in SEARCHABLE:
            raise fail(where, f"cannot be searched; allowed: {', '.join(SEARCHABLE)}")
        try:
            check_distribution(key, dist, RECIPE_RULES[key])
        except BadValue as e:
            raise fail(where, str(e)) from None
    return {**values, "space": space}


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str, fail) -> None:
    for key in table:
        if key not in allowed:
            raise fail(
                f"{where} key {key!r}" if where != "top level" else repr(key),
                f"unknown key; allowed: {', '.join(allowed)}",
            )
