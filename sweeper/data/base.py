"""What every dataset loads into: whole splits as uint8 tensors, NCHW."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sweeper.contract import DatasetInfo


class DatasetError(Exception):
    """A dataset that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Splits:
    info: DatasetInfo
    train_x: torch.Tensor  # uint8, (N, C, H, W)
    train_y: torch.Tensor  # int64, (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.info.shape[0]

    def limit(self, train: int | None = None, test: int | None = None) -> Splits:
        """The first ``train``/``test`` images of each split (the splits are already shuffled)."""
        return replace(
            self,
            train_x=self.train_x[:train] if train else self.train_x,
            train_y=self.train_y[:train] if train else self.train_y,
            test_x=self.test_x[:test] if test else self.test_x,
            test_y=self.test_y[:test] if test else self.test_y,
        )
