"""CIFAR-shaped synthetic images, deterministic from a seed and learnable.

Each class has a smooth colour pattern; an image is its class pattern at a random contrast,
plus noise. A model gets far below chance error within an epoch or two.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from sweeper.contract import DATASETS, DatasetInfo
from sweeper.data.base import Splits

DEFAULT_TRAIN = 2000
DEFAULT_TEST = 500
DEFAULT_CLASSES = 10


def info(num_classes: int = DEFAULT_CLASSES) -> DatasetInfo:
    return replace(DATASETS["synthetic"], num_classes=num_classes)


def _images(prototypes: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = prototypes.shape[0]
    labels = torch.randint(num_classes, (n,), generator=g)
    x = prototypes[labels]
    x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + 0.25 * torch.randn(x.shape, generator=g)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), labels


def load(
    num_train: int = DEFAULT_TRAIN, num_test: int = DEFAULT_TEST, num_classes: int = DEFAULT_CLASSES, seed: int = 0
) -> Splits:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g) * 2 - 1
    prototypes = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    train_x, train_y = _images(prototypes, num_train, g)
    test_x, test_y = _images(prototypes, num_test, g)
    return Splits(info(num_classes), train_x, train_y, test_x, test_y)
