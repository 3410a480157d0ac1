"""Several optimizer steps inside one ``training_step`` (PPO's mini-batches), on one device or
under DDP, with Lightning's manual optimisation."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel


class ManualSteps:
    """``manual_step(loss, ...)``: one optimizer step of a module with ``automatic_optimization = False``."""

    def manual_step(self, loss: Tensor, optimizer, scheduler, max_grad_norm: float | None) -> None:
        """Backward (gradients averaged over devices), clip to ``max_grad_norm`` (None: no clip), step."""
        optimizer.zero_grad()
        with self.no_gradient_sync():
            self.manual_backward(loss)
        self.sync_gradients()
        if max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # sync_gradients all-reduces every gradient itself under DDP; FSDP2 (ModelParallelStrategy, the
        # module's sharded_submodules) reduce-scatters them in each backward. Other sharded strategies
        # would reduce them twice.
        strategy = self.trainer.strategy
        if self.world_size > 1 and not isinstance(strategy.model, DistributedDataParallel) and not self.sharded_submodules:
            raise ValueError(
                f"{type(self).__name__} runs on one device, under DDP (strategy='ddp') or sharded by ModelParallelStrategy, "
                f"not {type(strategy).__name__}: it syncs the gradients of its several optimizer steps per rollout itself"
            )

    def no_gradient_sync(self):
        """DDP reduces gradients in the backward of each forward it wraps; the module takes several
        steps per ``training_step`` (one DDP forward), so it reduces them itself (:meth:`sync_gradients`)."""
        wrapper = self.trainer.strategy.model
        return wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else contextlib.nullcontext()

    def sync_gradients(self) -> None:
        if self.world_size == 1 or self.sharded_submodules:  # FSDP2 has reduce-scattered them in backward
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
