"""Batches from a whole split held as one uint8 tensor, augmented with batched tensor ops.

No per-image PIL work: each epoch draws one seeded permutation and one set of flip coins, then
every batch is an index, a flip and a normalisation on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MEAN = 0.5  # the seed's Normalize((0.5,)*3, (0.5,)*3), for every channel
STD = 0.5


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - MEAN) / STD


class BatchLoader:
    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        hflip: bool,
        generator: torch.Generator | None = None,
        channels_last: bool = False,
    ):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.hflip = shuffle, hflip
        self.generator = generator
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.y), self.x.device
        # Random draws happen on the CPU generator, so the stream is the same on every device.
        order = torch.randperm(n, generator=self.generator).to(device) if self.shuffle else None
        flips = (torch.rand(n, generator=self.generator) < 0.5).to(device) if self.hflip else None
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            xb = normalize(self.x[idx])
            if flips is not None:
                flip = flips[start : start + self.batch_size].view(-1, 1, 1, 1)
                xb = torch.where(flip, xb.flip(3), xb)
            yield xb.contiguous(memory_format=self.memory_format), self.y[idx]
