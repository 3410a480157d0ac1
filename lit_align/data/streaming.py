"""Streamed splits (``datasets.IterableDataset``): read, tokenized and packed as they are iterated,
sharded over ranks, and resumed exactly from a checkpoint."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader


class StreamLoader(DataLoader):
    """The loader of a streamed split.

    Each rank reads every ``world_size``-th example of the one stream (after its seeded shuffle
    buffer), so the ranks together see, step by step, the global batches one process would see.
    A checkpoint holds the epoch and how many of its batches reached the training step (the
    DataModule counts them in ``on_after_batch_transfer``: Lightning's look-ahead at the end of a
    stream does not count); resumed, the loader reads the epoch again and skips them.
    """

    epoch = 0
    trained = 0
    _skip = 0
    _fresh = True  # no pass started since it was made or restored

    @classmethod
    def over(cls, ds: datasets.IterableDataset, dm: Any, split: str, train: bool) -> StreamLoader:
        trainer = dm.trainer
        if trainer is not None and trainer.world_size > 1:
            ds = split_dataset_by_node(ds, rank=trainer.global_rank, world_size=trainer.world_size)
        loader = cls(ds, batch_size=dm.loader_batch_size(train), collate_fn=functools.partial(dm.collate, split=split),
                     num_workers=dm.num_workers)
        if train:
            dm.stream_loader = loader  # the DataModule counts the batches trained on
        return loader

    def __iter__(self) -> Iterator[Any]:
        # A pass is an epoch. It is counted when the next one starts, not when this one runs out:
        # Lightning looks one batch ahead in a stream, so the last batch is trained after that.
        if not self._fresh:
            self.epoch += 1
        self._fresh = False
        self.dataset.set_epoch(self.epoch)  # the shuffle buffer's seed moves with the epoch
        skip, self._skip = self._skip, 0
        self.trained = skip
        # Resumed mid-epoch, the uninterrupted run drew the loader's base seed before the checkpoint's
        # generator state was taken; drawing it again would shift every later random number.
        with torch.random.fork_rng(devices=[], enabled=bool(skip)):
            batches = super().__iter__()
        for i, batch in enumerate(batches):
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.trained}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self._skip, self._fresh = int(state_dict["epoch"]), int(state_dict["batches"]), True
