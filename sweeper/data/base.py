"""What every dataset loads into: whole splits as uint8 tensors, NCHW."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sweeper.contract import DatasetInfo

VAL_SEED = 0  # the validation slice is the same for every trial and every worker


class DatasetError(Exception):
    """A dataset that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Splits:
    info: DatasetInfo
    train_x: torch.Tensor  # uint8, (N, C, H, W)
    train_y: torch.Tensor  # int64, (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None  # a held-out slice of the training split (see split_validation)
    val_y: torch.Tensor | None = None

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

    def split_validation(self, fraction: float, seed: int = VAL_SEED) -> Splits:
        """Move a fixed, seeded, stratified ``fraction`` of the training images into a validation
        split (``round(fraction * n)`` images of each class). The slice depends on ``seed`` and the
        training split only, never on a trial's seed, so every trial of a study shares it.

        >>> import torch
        >>> y = torch.arange(10).repeat(10)
        >>> s = Splits(None, torch.zeros(100, 1, 2, 2, dtype=torch.uint8), y, y[:0], y[:0]).split_validation(0.1)
        >>> len(s.train_y), len(s.val_y), sorted(s.val_y.tolist()) == list(range(10))
        (90, 10, True)
        """
        if not fraction:
            return self
        if not 0 < fraction < 1:
            raise DatasetError(f"val_fraction must be in [0, 1), got {fraction}")
        order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(seed))
        picked = []
        for label in torch.unique(self.train_y):
            members = order[self.train_y[order] == label]
            picked.append(members[: round(len(members) * fraction)])
        val = torch.cat(picked).sort().values
        if len(val) == 0:
            raise DatasetError(
                f"val_fraction {fraction} of {len(self.train_y)} training images leaves no validation image; "
                "raise val_fraction or limit_train"
            )
        if len(val) == len(self.train_y):
            raise DatasetError(
                f"val_fraction {fraction} of {len(self.train_y)} training images leaves no training image; "
                "lower val_fraction or raise limit_train"
            )
        keep = torch.ones(len(self.train_y), dtype=torch.bool)
        keep[val] = False
        return replace(
            self,
            train_x=self.train_x[keep],
            train_y=self.train_y[keep],
            val_x=self.train_x[val],
            val_y=self.train_y[val],
        )
