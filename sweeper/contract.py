"""The names and choices every layer agrees on, importable without torch, Optuna or MLflow.

The recipe and its choices, the GoogLeNet variants as a table of Inception modules, the
datasets by name, and the heartbeat defaults. A spec is checked against this module alone,
so refusing a bad spec costs no engine imports; ``sweeper.models``, ``sweeper.data``,
``sweeper.train`` and ``sweeper.trials`` build on the same objects.

>>> Recipe.from_dict({"epochs": 3}).epochs
3
>>> list(VARIANTS)[:2], sorted(DATASETS)[:2]
(['naive', 'standard'], ['cifar10', 'cifar100'])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from sweeper.validation import Rule, check_table

# --- the recipe ------------------------------------------------------------------------------

OPTIMIZERS = ("adadelta", "sgd", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    """The seed post's recipe as defaults. Every value can be overridden."""

    epochs: int = 14
    batch_size: int = 64  # images per optimizer step
    optimizer: str = "adadelta"  # adadelta | sgd | adamw
    lr: float = 1.0
    lr_gamma: float = 0.7  # StepLR: lr *= lr_gamma every lr_step epochs
    lr_step: int = 1  # epochs
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    eval_batch_size: int = 1000  # images per evaluation forward pass
    seed: int = 1
    limit_train: int | None = None  # images; None = the whole split
    limit_test: int | None = None
    val_fraction: float = 0.0  # of the training images, held out; > 0 makes every decision use it
    # For the worker, not fit(): seconds of training between checkpoints (taken at the first epoch
    # end after that long; the last epoch needs none: the trial ends with its model), or "epoch".
    checkpoint_every: float | str = 60.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        """Build from plain values; raises ValueError (BadValue) naming a refused key or value."""
        check_table(values, RECIPE_RULES, "recipe key")
        kinds = {f.name: f.type for f in fields(cls)}
        return cls(
            **{
                k: (float(v) if kinds[k] == "float" or kinds[k] == "float | str" and v != "epoch" else v)
                for k, v in values.items()
            }
        )

    def validate(self) -> None:
        check_table(self.to_dict(), RECIPE_RULES, "recipe key")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What each recipe key accepts (in [train], in a search range, as a search choice); a new
# Recipe field needs its row here (tests/test_train.py checks the two agree).
MAX_BATCH = 65_536  # images per batch: more is a typo (and a dry run's probe would try to allocate it)
RECIPE_RULES: dict[str, Rule] = {
    "epochs": Rule(int, ge=1),
    "batch_size": Rule(int, ge=1, le=MAX_BATCH),
    "optimizer": Rule(str, choices=OPTIMIZERS),
    "lr": Rule(float, gt=0),
    "lr_gamma": Rule(float, gt=0),
    "lr_step": Rule(int, ge=1),
    "momentum": Rule(float, ge=0, lt=1),
    "nesterov": Rule(bool),
    "weight_decay": Rule(float, ge=0),
    "eval_batch_size": Rule(int, ge=1, le=MAX_BATCH),
    "seed": Rule(int),
    "limit_train": Rule(int, ge=1, optional=True),
    "limit_test": Rule(int, ge=1, optional=True),
    "val_fraction": Rule(float, ge=0, lt=1),
    "checkpoint_every": Rule(float, gt=0, also=("epoch",)),
}


# --- the variants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InceptionCfg:
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n5x5_reduce: int
    n5x5: int
    pool_proj: int


# The seed's Inception(in, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_proj) without `in`.
MODULES: dict[str, InceptionCfg] = {
    "a3": InceptionCfg(64, 96, 128, 16, 32, 32),
    "b3": InceptionCfg(128, 128, 192, 32, 96, 64),
    "a4": InceptionCfg(192, 96, 208, 16, 48, 64),
    "b4": InceptionCfg(160, 112, 224, 24, 64, 64),
    "c4": InceptionCfg(128, 128, 256, 24, 64, 64),
    "d4": InceptionCfg(112, 144, 288, 32, 64, 64),
    "e4": InceptionCfg(256, 160, 320, 32, 128, 128),
    "a5": InceptionCfg(256, 160, 320, 32, 128, 128),
    "b5": InceptionCfg(384, 192, 384, 48, 128, 128),
}


@dataclass(frozen=True)
class VariantCfg:
    stages: tuple[tuple[str, ...], ...]
    block: str = "bottleneck"  # "bottleneck" (the seed's Inception) or "naive"
    description: str = ""

    @property
    def inception_modules(self) -> int:
        return sum(len(stage) for stage in self.stages)


FULL = (("a3", "b3"), ("a4", "b4", "c4", "d4", "e4"), ("a5", "b5"))

# Order is the seed post's table order. Short3 and Short4 are not specified in the post; these
# are the nearest shallow arrangements of its modules (see docs/MODELS.md).
VARIANTS: dict[str, VariantCfg] = {
    "naive": VariantCfg(FULL, block="naive", description="all nine modules, no 1x1 bottlenecks"),
    "standard": VariantCfg(FULL, description="GoogLeNet as in the seed (9 modules)"),
    "long": VariantCfg((FULL[0], FULL[1], ("a5", "a5", "a5", "a5", "b5")), description="a5 repeated: 12 modules"),
    "short": VariantCfg((FULL[0], ("a4", "d4", "e4"), FULL[2]), description="7 modules"),
    "short2": VariantCfg((FULL[0], ("a4", "e4"), ("b5",)), description="5 modules"),
    "short3": VariantCfg((("a3",), ("c4",), ("b5",)), description="3 modules"),
    "short4": VariantCfg((("a4",), ("b5",)), description="2 modules"),
}


STEM_CHANNELS = 192  # the 3x3 convolution before the first stage


def count_macs(cfg: VariantCfg, input_shape: tuple[int, int, int], num_classes: int) -> int:
    """Multiply-accumulates of one forward pass of one image, from the table alone (no torch):
    every convolution (all 'same'-padded, stride 1) and the classifier; ``sweeper.models.count_macs``
    is this function, and tests/test_models.py checks it against torch's flop counter on the built model.

    >>> count_macs(VARIANTS["short4"], (1, 8, 8), 10)
    37935104
    """
    channels, height, width = input_shape
    macs = height * width * channels * STEM_CHANNELS * 9
    channels = STEM_CHANNELS
    for i, stage in enumerate(cfg.stages):
        if i > 0:  # max-pool 3/2/1 between stages
            height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        for name in stage:
            m = MODULES[name]
            if cfg.block == "naive":
                per_pixel = channels * (m.n1x1 + 9 * m.n3x3 + 9 * m.n5x5)
                out = m.n1x1 + m.n3x3 + m.n5x5 + channels
            else:
                per_pixel = (
                    channels * (m.n1x1 + m.n3x3_reduce + m.n5x5_reduce + m.pool_proj)
                    + 9 * m.n3x3_reduce * m.n3x3
                    + 9 * m.n5x5_reduce * m.n5x5
                    + 9 * m.n5x5 * m.n5x5
                )
                out = m.n1x1 + m.n3x3 + m.n5x5 + m.pool_proj
            macs += height * width * per_pixel
            channels = out
    return macs + channels * num_classes


# --- the datasets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (channels, height, width)
    hflip: bool  # whether a horizontal flip keeps the label (not so for digits)
    description: str
    num_train: int = 0  # images in the training split (synthetic: its default size)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("cifar10", 10, (3, 32, 32), True, "CIFAR-10 (downloaded on first use)", num_train=50_000),
        DatasetInfo("cifar100", 100, (3, 32, 32), True, "CIFAR-100 (downloaded on first use)", num_train=50_000),
        DatasetInfo("digits", 10, (1, 8, 8), False, "UCI handwritten digits (scikit-learn, offline)", num_train=1438),
        DatasetInfo("synthetic", 10, (3, 32, 32), True, "CIFAR-shaped synthetic classes", num_train=2000),
    )
}


# --- workers ---------------------------------------------------------------------------------

DEFAULT_HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
DEFAULT_GRACE_PERIOD = 60  # seconds without a heartbeat before a trial counts as dead
