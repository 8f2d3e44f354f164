"""scikit-learn's bundled UCI handwritten digits: 8x8 grayscale, 10 classes, offline."""

from __future__ import annotations

import numpy as np
import torch

from sweeper.contract import DATASETS
from sweeper.data.base import Splits

INFO = DATASETS["digits"]
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split never depends on the trial's seed


def load() -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = int(len(labels) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return Splits(
        INFO,
        torch.from_numpy(images[train]),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test]),
        torch.from_numpy(labels[test]),
    )
