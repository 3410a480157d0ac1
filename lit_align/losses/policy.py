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
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from lit_align.losses.advantages import masked_mean

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
GRPO_LOSS_TYPES: tuple[str, ...] = get_args(GRPOLossType)
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = get_args(ImportanceSamplingLevel)


@dataclass(frozen=True)
class GRPOLossConfig:
    """GRPO's loss settings under TRL's names, checked once when built (``GRPO`` builds it from
    its arguments). ``loss_type`` picks a surrogate from :data:`SURROGATES` and a normalisation
    from :data:`NORMALISATIONS`."""

    loss_type: GRPOLossType = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None  # cap of the unclipped ratio (two-sided clipping)
    importance_sampling_level: ImportanceSamplingLevel = "token"
    beta: float = 0.0  # weight of the k3 KL to the reference
    use_bias_correction_kl: bool = True  # the KL times the importance ratio
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    max_completion_length: int | None = None  # dr_grpo's constant normaliser

    def __post_init__(self) -> None:
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {self.importance_sampling_level!r}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")


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


class Surrogate(NamedTuple):
    per_token: Tensor  # (N, T) loss per token before normalisation
    ratio: Tensor  # the ratio the clip metrics read
    low_clipped: Tensor | None
    high_clipped: Tensor | None


def clipped_surrogate(ratio: Tensor, adv: Tensor, logps: Tensor, cfg: GRPOLossConfig) -> Surrogate:
    """PPO's clipped objective ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, the unclipped
    ratio capped at ``delta`` when set (the clip metrics then read the capped ratio, as TRL's do)."""
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    if cfg.delta is not None:
        ratio = torch.clamp(ratio, max=cfg.delta)
    low = (ratio < 1 - cfg.epsilon_low) & (adv < 0)
    high = (ratio > 1 + cfg.epsilon_high) & (adv > 0)
    return Surrogate(-torch.min(ratio * adv, clipped * adv), ratio, low, high)


def cispo_surrogate(ratio: Tensor, adv: Tensor, logps: Tensor, cfg: GRPOLossConfig) -> Surrogate:
    """CISPO: the clipped ratio as a detached weight of ``A * log p`` (``-min(r, eps_high).sg A logp``)."""
    return Surrogate(-torch.clamp(ratio, max=cfg.epsilon_high).detach() * adv * logps, ratio, None,
                     (ratio > cfg.epsilon_high) & (adv > 0))


def sapo_surrogate(ratio: Tensor, adv: Tensor, logps: Tensor, cfg: GRPOLossConfig) -> Surrogate:
    """SAPO: a soft gate ``-(sigmoid(tau (r - 1)) * 4 / tau) A``, ``tau`` by the sign of ``A``."""
    tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    return Surrogate(-(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv, ratio, None, None)


def sequence_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """Each completion's token mean, then the mean over completions (grpo, sapo)."""
    return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def token_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """The micro-batch's token mean (bnpo)."""
    return masked.sum() / mask.sum().clamp(min=1.0)


def constant_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """Over ``N * max_completion_length``, whatever the lengths (dr_grpo)."""
    return masked.sum() / (masked.size(0) * cfg.max_completion_length)


def global_batch_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """Over the loss tokens of the global batch per device (dapo, cispo; the local ones if not given)."""
    num_items = mask.sum() if num_items is None else num_items
    return masked.sum() / torch.as_tensor(num_items, dtype=masked.dtype).clamp(min=1.0)


SURROGATES = {"grpo": clipped_surrogate, "bnpo": clipped_surrogate, "dr_grpo": clipped_surrogate,
              "dapo": clipped_surrogate, "cispo": cispo_surrogate, "sapo": sapo_surrogate}
NORMALISATIONS = {"grpo": sequence_mean, "sapo": sequence_mean, "bnpo": token_mean, "dr_grpo": constant_mean,
                "dapo": global_batch_mean, "cispo": global_batch_mean}
CLIPPED = tuple(name for name, surrogate in SURROGATES.items() if surrogate is clipped_surrogate)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOLossConfig,
    *,
    ref_logps: Tensor | None = None,
    token_mask: Tensor | None = None,
    num_items: Tensor | float | None = None,
) -> PolicyLoss:
    """GRPO's loss on one micro-batch, exactly as TRL's ``GRPOTrainer._compute_loss``
    (docs/methods.md §6): the importance ratio (per token, or per sequence for GSPO), the
    variant's surrogate, the optional k3 KL to the reference, and the variant's normalisation.

    Args:
        logps, old_logps: Per-token log-probs under the policy (with grad) and at sampling time.
        advantages: ``(N,)`` group-relative advantages.
        mask: ``(N, T)`` completion tokens that count (0 after EOS, on masked truncations).
        cfg: The settings (:class:`GRPOLossConfig`).
        ref_logps: Reference log-probs (needed when ``cfg.beta != 0``).
        token_mask: Optional extra multiplier of the per-token loss (the high-entropy mask).
        num_items: ``dapo``/``cispo``'s normaliser: the loss tokens of the global batch divided by
            the number of devices (DDP then averages the per-device gradients).
    """
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logps - old_logps
    if cfg.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    kl = None
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference log-probs")
        kl = k3_kl(logps, ref_logps)
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
    per_token, ratio, low, high = SURROGATES[cfg.loss_type](ratio, adv, logps, cfg)
    if token_mask is not None:
        per_token = per_token * token_mask
    if kl is not None:
        per_token = per_token + cfg.beta * kl
    loss = NORMALISATIONS[cfg.loss_type](per_token * mask, mask, cfg, num_items)
    return PolicyLoss(loss, ratio.detach(), _detached(low), _detached(high), _detached(kl))


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


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
