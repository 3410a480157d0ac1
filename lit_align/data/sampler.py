"""The training sampler: shuffled, length-grouped, and sharded over ranks in one place.

It subclasses ``DistributedSampler`` so Lightning keeps it as it is: Lightning would
otherwise wrap a custom sampler in a *shuffling* distributed wrapper, undoing the length
grouping, and swap a sequential one for a shuffled one. Rank ``r`` of ``W`` takes
positions ``r, r+W, r+2W, ...`` of one global order, so the ``W`` local batches of a step
together are exactly the global batch one process would see with ``batch_size * W``.
Online methods that reuse a rollout for several steps (``num_iterations``) get each
batch ``repeat_batches`` times in a row.

:class:`ResumableLoader` makes the position in the epoch part of the checkpoint: resumed after
a kill, training continues with the batch after the last one trained, none seen twice or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


class ShardedSampler(DistributedSampler):
    """Global order: a seeded permutation (``shuffle``) whose mega-batches of
    ``batch_size * world * mega_batch_factor`` are sorted by length (``group_by_length``),
    so a batch holds sequences of similar length and little padding."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        group_by_length: bool = True,
        seed: int = 0,
        mega_batch_factor: int = 50,
        repeat_batches: int = 1,
    ) -> None:
        # DistributedSampler.__init__ is skipped on purpose: rank and world size are read
        # when iterating, after the strategy has set up the process group.
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        if repeat_batches < 1:
            raise ValueError(f"repeat_batches must be >= 1, got {repeat_batches}")
        self.repeat_batches = repeat_batches
        self.epoch = 0
        self.skip = 0  # indices of this rank's order to leave out, once (set by ResumableLoader)

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_rank(self) -> int:
        world, _ = self._world()
        return -(-len(self.lengths) // world)

    def __len__(self) -> int:
        n = self._per_rank()
        if self.repeat_batches == 1:
            return n
        return n // self.batch_size * self.batch_size * self.repeat_batches

    def global_order(self) -> list[int]:
        n = len(self.lengths)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        if self.group_by_length:
            world, _ = self._world()
            size = self.batch_size * world * self.mega_batch_factor
            order = [i for s in range(0, n, size) for i in sorted(order[s : s + size], key=lambda i: -self.lengths[i])]
        return order

    def __iter__(self) -> Iterator[int]:
        world, rank = self._world()
        order = self.global_order()
        order += order[: self._per_rank() * world - len(order)]  # pad so every rank gets as many (as DistributedSampler)
        mine = order[rank::world]
        if self.repeat_batches > 1:
            # Each whole batch k times in a row (an incomplete last batch is dropped: repeated, it would
            # merge with its own copy into one batch of the loader).
            size = self.batch_size
            batches = [mine[s : s + size] for s in range(0, len(mine) - size + 1, size)]
            mine = [i for b in batches for _ in range(self.repeat_batches) for i in b]
        skip, self.skip = self.skip, 0
        return iter(mine[skip:])


class ResumableLoader(DataLoader):
    """The training loader, with its place in the epoch in the checkpoint.

    Lightning saves ``state_dict()`` of a loader that has one: here the sampler's epoch and how many
    batches of it were handed out. ``load_state_dict`` (on resume) makes the next pass over that
    epoch start after them. Batches are counted where they leave the loader, so worker prefetching
    does not count; Lightning takes no batch ahead from a loader whose length it knows.
    """

    _resume: dict[int, int] | None = None
    _position: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        epoch = sampler.epoch
        done = (self._resume or {}).get(epoch, 0)
        self._resume = None
        sampler.skip = done * self.batch_size
        self._position = (epoch, done)
        # Starting an epoch draws the workers' base seed from torch's generator. Resumed mid-epoch, the
        # uninterrupted run drew it before the checkpoint's generator state was taken; drawing it
        # again would shift every later sample and dropout mask of the resumed run.
        with torch.random.fork_rng(devices=[], enabled=bool(done)):
            batches = super().__iter__()
        for batch in batches:
            done += 1
            self._position = (epoch, done)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._position or (self.sampler.epoch, 0)
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {int(state_dict["epoch"]): int(state_dict["batches"])}
