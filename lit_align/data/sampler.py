"""Length-grouped sampling: batches of similar lengths, so little of a batch is padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, cut into mega-batches of ``batch_size * mega_batch_factor``, sort each by length.

    Under DDP Lightning wraps this sampler and deals its indices out round-robin, so every
    rank still sees neighbours of similar length. The order depends on ``seed`` and the
    epoch only, identical on every rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        mega_batch_factor: int = 50,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        n = len(self.lengths)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        size = self.batch_size * self.mega_batch_factor
        for start in range(0, n, size):
            chunk = order[start : start + size]
            yield from sorted(chunk, key=lambda i: -self.lengths[i])
        self.epoch += 1  # a wrapper that does not forward set_epoch still gets a new order
