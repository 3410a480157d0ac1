"""Reductions over the devices of a run, for metrics and losses that must not depend on how
many devices share the batch (one process and N processes log and step the same)."""

from __future__ import annotations

import torch
from torch import Tensor


class Distributed:
    """Mixed into :class:`~lit_align.methods.base.AlignModule`; reads the module's ``trainer``
    and ``num_tokens_seen`` and uses ``LightningModule.all_gather``."""

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def global_sum(self, values: Tensor) -> Tensor:
        """Sum a tensor of statistics over all devices (one collective for all of them)."""
        return self.global_reduce(values, "sum")

    def global_reduce(self, values: Tensor, op: str) -> Tensor:
        """Reduce over all devices with ``op``: ``sum``, ``min`` or ``max``."""
        if self.world_size == 1:
            return values
        return self.trainer.strategy.reduce(values.clone(), reduce_op=op)

    def gather(self, local: Tensor) -> tuple[Tensor, slice]:
        """Every rank's rows of ``local`` in rank order (the global batch), and this rank's slice."""
        n = local.size(0)
        if self.world_size == 1:
            return local, slice(0, n)
        gathered = self.all_gather(local).reshape(-1, *local.shape[1:])
        return gathered, slice(self.global_rank * n, (self.global_rank + 1) * n)

    def gather_objects(self, local: object) -> list:
        """Every rank's ``local`` (any picklable value), in rank order."""
        if self.world_size == 1:
            return [local]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, local)
        return out

    def global_mean(self, values: Tensor, mask: Tensor) -> Tensor:
        """Masked mean over every rank's tokens."""
        totals = self.global_sum(torch.stack([(values * mask).sum(), mask.sum()]).float())
        return totals[0] / totals[1].clamp(min=1.0)

    def global_token_mean(self, local_sum: Tensor, global_count: Tensor) -> Tensor:
        """The loss to backward for a mean over every device's tokens: this device's sum over the
        global count, times the world size because DDP averages the devices' gradients (one
        process and N then take the same step)."""
        return local_sum / global_count.clamp(min=1) * self.world_size

    def count_tokens(self, tokens: Tensor | float, stage: str) -> Tensor | float:
        """The ``num_tokens`` metric from a batch's global token count: the running total in
        training (kept in checkpoints), the batch's own count in validation and test."""
        if stage != "train":
            return tokens
        self.num_tokens_seen += int(tokens)
        return float(self.num_tokens_seen)
