"""Reference models: a frozen copy, the PEFT base with adapters disabled, TR-DPO syncing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

from lit_align.models.loading import load_causal_lm
from lit_align.ops.sharding import fsdp_units


def frozen_copy(name_or_path: str, dtype: str, attn_implementation: str | None, **kwargs: Any) -> nn.Module:
    """A reference policy: loaded like the policy (``kwargs``: ``from_pretrained``'s), dropout off
    (also if someone calls ``.train()`` on the module), in eval mode, without gradients."""
    model = load_causal_lm(name_or_path, dtype, attn_implementation, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.requires_grad_(False).eval()


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The PEFT base model (adapters off): the reference for a LoRA run, at no memory cost."""
    with model.disable_adapter():
        yield model


@torch.no_grad()
def mix_into(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024): ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter."""
    for unit in fsdp_units(reference) + fsdp_units(policy):  # FSDP2: both as shards (a forward may have left them whole)
        unit.reshard()
    for ref_p, pol_p in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_p.mul_(1.0 - alpha).add_(pol_p.detach().to(ref_p.dtype), alpha=alpha)


class SyncReferenceModel(L.Callback):
    """Every ``sync_steps`` optimizer steps, mix the policy into ``pl_module.ref_model`` (TR-DPO).

    Added by a module's ``configure_callbacks`` when ``sync_ref_model=True``.
    """

    def __init__(self, alpha: float = 0.6, sync_steps: int = 512) -> None:
        self.alpha = alpha
        self.sync_steps = sync_steps
        self._last_step = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.sync_steps == 0:
            mix_into(pl_module.ref_model, pl_module.model, self.alpha)
        self._last_step = step
