"""Advantage estimators of the online methods: pure functions of rewards (and values).

- :func:`group_advantages`: GRPO's group-relative advantages (docs/methods.md §6), both
  multi-objective aggregations and the three reward scalings;
- :func:`rloo_advantages`: RLOO's leave-one-out baseline (§7);
- :func:`gae`: PPO's generalised advantage estimation (§14) with :func:`masked_whiten`.

Rewards are ``(N, K)`` (``N`` completions, ``K`` reward functions; NaN where a function
returned None) with the ``G`` completions of a prompt in consecutive rows. These functions
see the *global* batch: under DDP the caller gathers the rewards first, as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["sum_then_normalize", "normalize_then_sum"]
SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewards)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
_EPS = 1e-4  # TRL's std epsilon


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased standard deviation ignoring NaNs (NaN where fewer than two values remain)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    out = var.sqrt()
    if dim is None:
        return out.reshape(())
    return out if keepdim else out.squeeze(dim)


def weighted_rewards(rewards: Tensor, weights: Tensor) -> Tensor:
    """``sum_k w_k R[:, k]`` ignoring NaNs; NaN where every function returned None: ``(N,)``."""
    total = (rewards * weights.to(rewards)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards).all(dim=1), float("nan"))


@dataclass
class GroupAdvantages:
    """GRPO's advantages ``(N,)`` plus what the metrics need."""

    advantages: Tensor  # (N,), 0 for unscorable completions
    rewards: Tensor  # (N,) the weighted reward (NaN where unscorable)
    zero_std: Tensor  # (N,) bool: the group (or batch) std that scaled this row is 0


def group_advantages(
    rewards: Tensor,
    weights: Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    aggregation: Aggregation = "sum_then_normalize",
) -> GroupAdvantages:
    """GRPO's advantages: the reward minus its group mean, over the group (or batch) std.

    ``sum_then_normalize`` weights and sums the reward functions first; ``normalize_then_sum``
    (GDPO) normalises each function within its group, sums, then normalises over the batch.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    n, k = rewards.shape
    G = num_generations
    unscorable = torch.isnan(rewards).all(dim=1)
    if aggregation == "sum_then_normalize":
        total = weighted_rewards(rewards, weights)
        grouped = total.view(-1, G)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
        if scale_rewards == "batch":
            std = nanstd(total).expand(n) if n > 1 else torch.zeros_like(total)
        else:
            std = nanstd(grouped, dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(total)
        adv = total - mean
        if scale_rewards != "none":
            adv = adv / (std + _EPS)
    else:
        grouped = rewards.view(-1, G, k)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        normed = ((grouped - mean_k) / (std_k + _EPS)).view(n, k)
        total = (normed * weights.to(normed)).nansum(dim=1).masked_fill(unscorable, float("nan"))
        std = nanstd(total).expand(n) if n > 1 else torch.zeros_like(total)
        adv = (total - torch.nanmean(total)) / (std + _EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return GroupAdvantages(torch.nan_to_num(adv, nan=0.0), weighted_rewards(rewards, weights), zero_std)


def rloo_advantages(rewards: Tensor, num_generations: int, normalize: bool = False) -> Tensor:
    """RLOO: each reward minus the mean of the *other* scorable rewards of its group.

    ``rewards`` is ``(N,)`` (already weighted, clipped and KL-shaped; NaN where unscorable).
    A group with a single scorable completion gives it advantage 0, as unscorable rows get.
    """
    G = num_generations
    if G < 2:
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, G)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (count - 1)
    adv = rewards - baseline.view(-1)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + _EPS)
    return torch.nan_to_num(adv, nan=0.0)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance over the masked entries (TRL's PPO ``masked_var``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if n < 2:
        raise ValueError("whitening needs at least two valid tokens; use a larger (mini-)batch")
    return var * n / (n - 1)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, total: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries; ``shift_mean=False`` adds the mean back.

    ``total`` sums statistics over devices (for example ``LightningModule``'s all-reduce), so the
    mean and variance are those of the global batch; None: this batch's (TRL's choice).
    """
    if total is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        n, s, sq = total(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()]))
        if n < 2:
            raise ValueError("whitening needs at least two valid tokens; use a larger (mini-)batch")
        mean = s / n
        var = (sq / n - mean**2) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_penalised_rewards(
    scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float, estimator: str = "k1"
) -> tuple[Tensor, Tensor]:
    """PPO's per-token rewards ``(N, C)``: ``-kl_coef * KL`` on every completion token plus the
    ``(N,)`` score on the last one; and the per-token KL estimate (``k1``: ``log p - log ref``;
    ``k3``: ``exp(r) - 1 - r`` with ``r = log ref - log p``), 0 outside ``mask``."""
    log_ratio = ref_logps - logps
    kl = (-log_ratio if estimator == "k1" else log_ratio.exp() - 1 - log_ratio) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over completion tokens ``(N, T)``.

    ``values[t]`` is the critic's value of the state before token ``t``; positions outside
    ``mask`` (after the completion's end) have value 0 and reward 0, so the last token
    bootstraps from 0. Returns ``(advantages, returns)`` with ``returns = advantages + values``.
    The recursion runs backwards over ``T`` (at most ``max_completion_length`` steps) with
    vector operations over the batch.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = torch.empty_like(rewards)
    for t in range(T - 1, -1, -1):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out[:, t] = last
    return out * mask, (out + values) * mask
