"""docs/SPEC.md, generated from the rules the spec is checked against (sweeper.contract, sweeper.spec).

    python -m sweeper.specdoc > docs/SPEC.md

Keys, types, defaults and allowed values come from the rule tables; only the one-line meaning of
each key is written here. A key added to a rule table without a line here fails render() (and so
tests/test_specdoc.py), as does a docs/SPEC.md that differs from what render() gives.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from sweeper.contract import DATASETS, MODULES, VARIANTS, Recipe
from sweeper.spec import (
    BLOCKS,
    DEFAULT_SEARCH_VAL_FRACTION,
    GRID_KEYS,
    POLICY_RULES,
    RECIPE_RULES,
    SEARCH_DEFAULTS,
    SEARCH_RULES,
    SEARCHABLE,
    TOP_DEFAULTS,
    TOP_RULES,
    VAL_METRICS,
)
from sweeper.validation import Rule

# study.MAX_RETRY, without importing Optuna; tests/test_specdoc.py checks the two agree.
POLICY_DEFAULTS = {"max_retries": 3, "max_failed_cells": None, "trial_timeout": None}

MEANING = {
    # top level
    "description": "Free text shown by `sweeper studies` and in MLflow; not part of the study's identity.",
    "metric": "What the study ranks cells by (report, `--register-best`, search). With `val_fraction` > 0 "
    "the validation twin is read for every decision: " + ", ".join(f"{k} -> {v}" for k, v in VAL_METRICS.items()) + ".",
    "direction": "Whether a lower or a higher `metric` is better.",
    # [grid]
    "variant": "Model variants; every combination of variant, dataset and seed is one cell.",
    "dataset": "Datasets by name.",
    "seed": "Seeds; each is a cell of its own (the seed of weights, data order and split).",
    # [train]
    "epochs": "Passes over the training images.",
    "batch_size": "Images per optimizer step.",
    "optimizer": "The optimizer.",
    "lr": "Learning rate.",
    "lr_gamma": "StepLR: the learning rate is multiplied by this every `lr_step` epochs.",
    "lr_step": "Epochs between two learning-rate decays.",
    "momentum": "SGD momentum (sgd only).",
    "nesterov": "Nesterov momentum (sgd only).",
    "weight_decay": "L2 weight decay (decoupled for adamw).",
    "eval_batch_size": "Images per forward pass when evaluating (memory, not results).",
    "limit_train": "Train on the first N training images only; unset: the whole split.",
    "limit_test": "Evaluate on the first N test images only; unset: the whole split.",
    "val_fraction": "Share of the training images held out for validation; > 0 makes every decision "
    f"(search, pruning, `metric`) read it. With [search] the default is {DEFAULT_SEARCH_VAL_FRACTION}.",
    "checkpoint_every": 'Seconds of training between checkpoints (taken at the next epoch end), or "epoch". '
    "The last epoch is never checkpointed: the trial ends with its model. Operational: not part of the recipe digest.",
    # [search]
    "trials_per_cell": "Trials Optuna samples for every cell.",
    "sampler": "Optuna sampler.",
    "pruner": "Optuna pruner (reads the per-epoch `metric`); none trains every trial to the end.",
    # [policy]
    "max_retries": "Retries of a cell whose trial failed (worker lost, MLflow outage, timeout).",
    "max_failed_cells": "The study pauses itself once this many cells failed for good; unset: never.",
    "trial_timeout": "Seconds; a trial running longer is checkpointed and handed back. Unset: no limit.",
    # [variants.NAME]
    "stages": "Inception modules per stage, a max-pool between stages.",
    "block": "bottleneck: the seed's Inception (1x1 reductions); naive: no 1x1 bottlenecks.",
}

EXAMPLES = {
    "description": '"GoogLeNet depth on CIFAR-100"',
    "metric": '"top1_error"',
    "direction": '"minimize"',
    "variant": '["standard", "short4"]',
    "dataset": '["cifar100"]',
    "seed": "[1, 2, 3]",
    "epochs": "14",
    "batch_size": "64",
    "optimizer": '"adadelta"',
    "lr": "1.0",
    "lr_gamma": "0.7",
    "lr_step": "1",
    "momentum": "0.9",
    "nesterov": "true",
    "weight_decay": "5e-4",
    "eval_batch_size": "1000",
    "limit_train": "512",
    "limit_test": "500",
    "val_fraction": "0.1",
    "checkpoint_every": '"epoch"',
    "trials_per_cell": "20",
    "sampler": '"tpe"',
    "pruner": '"median"',
    "max_retries": "3",
    "max_failed_cells": "2",
    "trial_timeout": "3600",
    "stages": '[["a3"], ["c4"], ["b5"]]',
    "block": '"bottleneck"',
}

EXAMPLE_SPEC = """\
description = "TPE search of the learning rate for standard and a declared variant"
metric = "top1_error"
direction = "minimize"

[grid]
variant = ["standard", "tiny"]
dataset = ["cifar100"]
seed = [1, 2]

[variants.tiny]
stages = [["a3"], ["c4"], ["b5"]]
block = "bottleneck"

[train]
epochs = 14
optimizer = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
checkpoint_every = "epoch"

[policy]
max_retries = 2
max_failed_cells = 1
trial_timeout = 7200

[search]
trials_per_cell = 20
sampler = "tpe"
pruner = "median"

[search.space]
lr = { low = 0.01, high = 0.5, log = true }
batch_size = { choices = [64, 128] }
"""


def _type(rule: Rule) -> str:
    name = {int: "integer", float: "number", bool: "boolean", str: "string"}[rule.kind]
    return name + "".join(f' or "{w}"' for w in rule.also)


def _allowed(rule: Rule) -> str:
    if rule.choices:
        return ", ".join(f"`{c}`" for c in rule.choices)
    bounds = [
        f"{op} {v:g}" for op, v in ((">=", rule.ge), (">", rule.gt), ("<=", rule.le), ("<", rule.lt)) if v is not None
    ]
    return " and ".join(bounds) or "any"


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value}`"


def _row(key: str, type_: str, default: str, allowed: str) -> str:
    return f"| `{key}` | {type_} | {default} | {allowed} | `{EXAMPLES[key]}` | {MEANING[key]} |"


HEADER = "| key | type | default | allowed | example | meaning |\n|---|---|---|---|---|---|"


def _rule_rows(rules: dict[str, Rule], defaults: dict[str, Any]) -> list[str]:
    return [_row(k, _type(r), _default(defaults[k]), _allowed(r)) for k, r in rules.items()]


def _space_section() -> list[str]:
    space = ", ".join(f"`{k}`" for k in SEARCHABLE)
    return [
        "### [search.space]",
        "",
        f"At least one of {space}, each either a range or a list of choices, within the key's [train] rule:",
        "",
        "- `{ low = L, high = H }`: uniform in [L, H] (integers for integer keys);",
        "- `{ low = L, high = H, log = true }`: log-uniform (needs L > 0);",
        "- `{ low = L, high = H, step = S }`: in steps of S (not with `log`);",
        "- `{ choices = [A, B, ...] }`: one of the listed values.",
        "",
    ]


def render() -> str:
    """The whole of docs/SPEC.md."""
    recipe_defaults = {f.name: f.default for f in fields(Recipe)}
    train_rules = {k: r for k, r in RECIPE_RULES.items() if k != "seed"}
    grid_rows = [
        _row(
            "variant", "list of strings", "required", ", ".join(f"`{v}`" for v in VARIANTS) + ", or a [variants.NAME]"
        ),
        _row("dataset", "list of strings", "required", ", ".join(f"`{d}`" for d in DATASETS)),
        _row("seed", "list of integers", "`[1]`", "any integer, each once"),
    ]
    assert [k for k in GRID_KEYS] == ["variant", "dataset", "seed"], "a new [grid] key needs its row here"
    variant_rows = [
        _row("stages", "list of lists of strings", "required", ", ".join(f"`{m}`" for m in MODULES)),
        _row("block", "string", '`"bottleneck"`', ", ".join(f"`{b}`" for b in BLOCKS)),
    ]
    parts = [
        "# Study spec reference",
        "",
        "<!-- Generated by `python -m sweeper.specdoc > docs/SPEC.md` from sweeper/contract.py and "
        "sweeper/spec.py; tests/test_specdoc.py fails when this file and the code differ. -->",
        "",
        "A study spec is a TOML file: `experiments/NAME.toml` (the study is named after the file) or any "
        "path passed as `--study path/to/NAME.toml`. A key not listed here is refused with a message "
        "naming it and the allowed keys; so is a value outside its allowed range (exit 2, nothing "
        "enqueued). Only `[grid]` variant and dataset (and a declared variant's stages) are required.",
        "",
        "## Top level",
        "",
        HEADER,
        *_rule_rows(TOP_RULES, TOP_DEFAULTS),
        "",
        "## [grid]",
        "",
        "Every combination of the three lists is one cell, trained once (or `trials_per_cell` times with [search]).",
        "",
        HEADER,
        *grid_rows,
        "",
        "## [train]",
        "",
        "The recipe every trial trains with; the defaults are the seed post's recipe. The seed comes "
        "from [grid]. A changed recipe value makes new rows (a new recipe digest), never mixed with the old ones.",
        "",
        HEADER,
        *_rule_rows(train_rules, recipe_defaults),
        "",
        "## [search] (optional)",
        "",
        "Without it each cell is one trial with the [train] recipe. With it, Optuna samples the keys "
        "of [search.space] for every trial and `val_fraction` defaults to "
        f"{DEFAULT_SEARCH_VAL_FRACTION}, so the test split decides nothing.",
        "",
        HEADER,
        *_rule_rows(SEARCH_RULES, SEARCH_DEFAULTS),
        "",
        *_space_section(),
        "## [policy] (optional)",
        "",
        "What to do about failures. Not part of the study's identity: `launch` again with a changed [policy] "
        "applies it, no `--force-update` needed.",
        "",
        HEADER,
        *_rule_rows(POLICY_RULES, POLICY_DEFAULTS),
        "",
        "## [variants.NAME] (optional)",
        "",
        "Declares a variant of your own from the Inception modules of the seed's table; NAME (letters, "
        "digits, `.`, `_`, `-`, not a built-in variant's name) can then be listed in [grid] variant.",
        "`description` (a string) is optional.",
        "",
        HEADER,
        *variant_rows,
        "",
        "## A complete example",
        "",
        "```toml",
        EXAMPLE_SPEC.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
