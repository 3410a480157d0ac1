"""The model's own tokens of multi-turn completions, moved to the front of each row and back.

A multi-turn completion interleaves the model's turns with tool results (``Generations.model_mask``
marks the model's tokens). A per-token recursion that reads the completion as the model's sequence of
actions (PPO's per-token rewards and GAE, :mod:`lit_align.losses.advantages`) runs on the model's
tokens alone: :func:`compact` moves them to the front of each row, in order, so their mask is a prefix
as a single-turn completion's is; :func:`expand` puts the results back at their positions. Without tool
tokens (a prefix mask) both are the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor


def model_token_order(mask: Tensor) -> Tensor:
    """``(N, C)`` long: a permutation of each row's positions, the positions where ``mask`` is set first
    (in order), then the others (in order)."""
    width = mask.size(1)
    positions = torch.arange(width, device=mask.device).expand(mask.shape)
    return (positions + width * (mask == 0).long()).argsort(dim=1)


def compact(x: Tensor, order: Tensor) -> Tensor:
    """``x`` ``(N, C)`` rearranged by :func:`model_token_order`: the model's tokens first."""
    return x.gather(1, order)


def expand(x: Tensor, order: Tensor) -> Tensor:
    """The inverse of :func:`compact`: each compacted value back at its position."""
    return torch.empty_like(x).scatter(1, order, x)
