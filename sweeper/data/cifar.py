"""CIFAR-10/100 (stub: being written)."""
from __future__ import annotations

from pathlib import Path

from sweeper.data.base import DatasetError, DatasetInfo, Splits

INFOS = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), hflip=True, description="CIFAR-10 (downloaded on first use)"),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), hflip=True, description="CIFAR-100 (downloaded on first use)"),
}


def load(name: str, data_dir: Path, download: bool = True) -> Splits:
    raise DatasetError("not yet")
