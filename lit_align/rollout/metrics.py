"""TRL's generation-time metrics of an online method, from the global batch's values."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_align.losses.advantages import nanstd


def reward_metrics(names: list[str], rewards: Tensor, weighted: Tensor, zero_std: Tensor | None) -> dict[str, float]:
    """``rewards/<name>/mean|std`` of the ``(N, K)`` rewards (one column per name), ``reward`` and
    ``reward_std`` of the ``(N,)`` weighted reward, ``frac_reward_zero_std`` of the groups' flags."""
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(rewards[:, k]).item()
        out[f"rewards/{name}/std"] = nanstd(rewards[:, k]).item()
    out["reward"] = torch.nanmean(weighted).item()
    out["reward_std"] = nanstd(weighted).item()
    if zero_std is not None:
        out["frac_reward_zero_std"] = zero_std.float().mean().item()
    return out


def completion_metrics(lengths: Tensor, truncated: Tensor) -> dict[str, float]:
    """``completions/*`` of the ``(N,)`` completion lengths and truncation flags."""
    done = lengths[truncated == 0]
    out = {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
    }
    for stat, fn in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
        out[f"completions/{stat}_terminated_length"] = fn(done).item() if done.numel() else 0.0
    return out
