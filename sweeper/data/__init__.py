"""Datasets by name: ``cifar10``, ``cifar100``, ``digits``, ``synthetic`` -> uint8 Splits.

>>> splits = load("synthetic", num_train=8, num_test=4)
>>> splits.train_x.dtype, tuple(splits.train_x.shape)
(torch.uint8, (8, 3, 32, 32))
"""

from __future__ import annotations

from pathlib import Path

from sweeper.contract import DATASETS, DatasetInfo
from sweeper.data.base import DatasetError, Splits
from sweeper.data.loader import BatchLoader


class UnknownDataset(ValueError):
    pass


def check_name(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UnknownDataset(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def load(
    name: str,
    data_dir: Path | None = None,
    *,
    download: bool = True,
    num_train: int | None = None,
    num_test: int | None = None,
) -> Splits:
    """Load a dataset's splits. ``num_train``/``num_test`` size the synthetic set."""
    check_name(name)
    if name == "digits":
        from sweeper.data import digits

        return digits.load()
    if name == "synthetic":
        from sweeper.data import synthetic

        return synthetic.load(num_train or synthetic.DEFAULT_TRAIN, num_test or synthetic.DEFAULT_TEST)
    from sweeper import settings
    from sweeper.data import cifar

    return cifar.load(name, data_dir or settings.data_dir(), download=download)


__all__ = ["DATASETS", "BatchLoader", "DatasetError", "DatasetInfo", "Splits", "UnknownDataset", "check_name", "load"]
