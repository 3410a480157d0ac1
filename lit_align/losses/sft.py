"""SFT losses on per-target log-probs (TRL ``SFTTrainer.compute_loss``, docs/methods.md §2).

Both return the *sum* over targets; the caller divides by the global target count
(over devices, as TRL's ``num_items_in_batch`` with ``average_tokens_across_devices``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

SFTLossType = Literal["nll", "dft"]


def nll_sum(logps: Tensor) -> Tensor:
    """Negative log-likelihood: sum_t -log p(y_t)."""
    return -logps.sum()


def dft_sum(logps: Tensor) -> Tensor:
    """Dynamic Fine-Tuning (Wu et al. 2025): each token's NLL weighted by its detached probability,
    sum_t -sg(p(y_t)) log p(y_t)."""
    return -(logps * logps.detach().exp()).sum()


SFT_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {"nll": nll_sum, "dft": dft_sum}


def sft_loss_sum(logps: Tensor, loss_type: SFTLossType = "nll") -> Tensor:
    """Summed SFT loss of the target log-probs ``(n,)`` for ``loss_type``."""
    if loss_type not in SFT_LOSSES:
        raise ValueError(f"unknown SFT loss_type {loss_type!r}: expected one of {sorted(SFT_LOSSES)}")
    return SFT_LOSSES[loss_type](logps)
