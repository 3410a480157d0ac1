"""Policy-gradient losses of the online methods: pure functions of per-token log-probs.

Shapes: completion tokens ``(N, T)`` (``N`` completions, right-padded to ``T``), a loss
mask ``(N, T)`` of 0/1, advantages ``(N,)`` (GRPO, RLOO) or ``(N, T)`` (PPO).

- :func:`grpo_loss`: the clipped surrogate of GRPO and its variants (``loss_type``), token
  or sequence (GSPO) importance sampling, the k3 KL to the reference, and each variant's
  normalisation exactly as TRL's ``GRPOTrainer._compute_loss`` (docs/methods.md §6);
- :func:`rloo_loss`: RLOO's sequence-level clipped surrogate (§7);
- :func:`ppo_policy_loss`, :func:`ppo_value_loss`: PPO's clipped policy and value losses (§14).

Gradient accumulation is Lightning's (it divides the returned loss), so no ``/ GA`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lit_align.losses.advantages import masked_mean

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per token: ``exp(r - p) - (r - p) - 1 >= 0``."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def entropy_mask(entropy: Tensor, mask: Tensor, threshold: Tensor | float) -> Tensor:
    """Tokens whose entropy is at least ``threshold`` (a quantile of all valid tokens): ``(N, T)`` bool."""
    return ((entropy * mask) >= threshold) & mask.bool()


@dataclass
class PolicyLoss:
    """A policy loss and the detached tensors its metrics are made of."""

    loss: Tensor  # scalar, differentiable
    ratio: Tensor  # (N, T) or (N, 1) importance ratio, detached
    low_clipped: Tensor | None = None  # bool, same shape as ratio
    high_clipped: Tensor | None = None
    kl: Tensor | None = None  # (N, T) per-token k3 KL, detached


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: GRPOLossType = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    token_mask: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
) -> PolicyLoss:
    """GRPO's loss on one micro-batch.

    Args:
        logps, old_logps: Per-token log-probs under the policy (with grad) and at sampling time.
        advantages: ``(N,)`` group-relative advantages.
        mask: ``(N, T)`` completion tokens that count (0 after EOS, on masked truncations).
        token_mask: Optional extra multiplier of the per-token loss (the high-entropy mask).
        max_completion_length: ``dr_grpo``'s constant normaliser ``N * max_completion_length``.
        num_items: ``dapo``/``cispo``'s normaliser: the loss tokens of the global batch divided by
            the number of devices (DDP then averages the per-device gradients).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference log-probs")
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * ratio
    low = high = None
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logps
        high = (ratio > epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:  # the clip metrics below then read the capped ratio, as TRL's do
            ratio = torch.clamp(ratio, max=delta)
        per_token = -torch.min(ratio * adv, clipped * adv)
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
    if token_mask is not None:
        per_token = per_token * token_mask
    if kl is not None:
        per_token = per_token + beta * kl
    loss = _aggregate(per_token * mask, mask, loss_type, max_completion_length, num_items)
    return PolicyLoss(loss, ratio.detach(), _detached(low), _detached(high), _detached(kl))


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _aggregate(masked: Tensor, mask: Tensor, loss_type: str, max_len: int | None, num_items) -> Tensor:
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_len is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return masked.sum() / (masked.size(0) * max_len)
    if num_items is None:  # dapo, cispo: tokens of the global batch per device
        num_items = mask.sum()
    return masked.sum() / torch.as_tensor(num_items, dtype=masked.dtype).clamp(min=1.0)


def rloo_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2
) -> PolicyLoss:
    """RLOO's clipped surrogate on sequence log-probs ``sum_t logp * mask``: mean over completions."""
    mask = mask.to(logps.dtype)
    seq = (logps * mask).sum(-1)
    old = (old_logps * mask).sum(-1)
    ratio = torch.exp(seq - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return PolicyLoss(loss, ratio.detach(), low, high)


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, cliprange: float = 0.2, num_items=None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, a masked token mean (over ``num_items`` tokens when given: the
    global count per device, so DDP's gradient average is the global mean); metrics
    ``clipfrac``, ``approxkl``, ``ratio``."""
    diff = logps - old_logps
    ratio = torch.exp(diff)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _token_mean(torch.max(loss1, loss2), mask, num_items)
    with torch.no_grad():
        stats = {
            "clipfrac": _token_mean((loss2 > loss1).float(), mask, num_items),
            "approxkl": 0.5 * _token_mean(diff**2, mask, num_items),
            "ratio": _token_mean(ratio, mask, num_items),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float = 0.2, num_items=None
) -> tuple[Tensor, Tensor]:
    """``0.5 * masked_mean(max((v - R)^2, (clip(v, v_old +- c) - R)^2))`` and the clipped fraction."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * _token_mean(torch.max(loss1, loss2), mask, num_items)
    return loss, _token_mean((loss2 > loss1).float(), mask, num_items).detach()


def _token_mean(x: Tensor, mask: Tensor, num_items) -> Tensor:
    if num_items is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / num_items
