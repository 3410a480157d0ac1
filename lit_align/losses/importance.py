"""GRPO's corrections for a sampler that is not the trained model (vLLM, a generation server): pure
functions of per-token log-probs, exactly as TRL 1.16's ``GRPOTrainer``.

- :func:`importance_sampling_ratio`: the truncated or masked importance weight between the trained
  model's log-probs at sampling time and the sampler's, per token or per sequence
  (``_generate_and_score_completions``, ``vllm_importance_sampling_*``); it multiplies the per-token
  loss (VESPO folds it into its own weight instead);
- :func:`sampling_stats` and :func:`sampling_metrics`: TRL's ``sampling/*`` metrics of it;
- :func:`off_policy_mask`: DeepSeek-V3.2's off-policy sequence mask (``get_off_policy_mask``, eq. 9):
  a completion with a negative advantage whose mean KL from the sampler exceeds the threshold is
  dropped from the loss.

Shapes: ``(N, T)`` per completion token (``N`` completions right-padded to ``T``), a mask ``(N, T)``
of 0/1, advantages ``(N,)`` or ``(N, T)``. Tokens the sampler could not score carry NaN log-probs: as
TRL, they get a ratio of 1 and count as zero KL, and stay out of the logged differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
IMPORTANCE_SAMPLING_MODES: tuple[str, ...] = get_args(ImportanceSamplingMode)


@dataclass(frozen=True)
class SamplerCorrection:
    """TRL's ``vllm_importance_sampling_*`` settings, checked once when built (TRL's checks, plus the
    mode's name, which TRL only reports at the first step)."""

    enabled: bool = True  # vllm_importance_sampling_correction
    mode: ImportanceSamplingMode = "sequence_mask"  # vllm_importance_sampling_mode
    clip_min: float | None = None  # vllm_importance_sampling_clip_min
    clip_max: float | None = 3.0  # vllm_importance_sampling_clip_max

    def __post_init__(self) -> None:
        if self.mode not in IMPORTANCE_SAMPLING_MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {IMPORTANCE_SAMPLING_MODES}, got {self.mode!r}")
        if self.clip_min is not None and self.clip_max is not None and self.clip_min >= self.clip_max:
            raise ValueError(
                f"vllm_importance_sampling_clip_min ({self.clip_min}) must be less than "
                f"vllm_importance_sampling_clip_max ({self.clip_max})."
            )
        if self.enabled and self.mode.endswith("_truncate") and self.clip_min is None and self.clip_max is None:
            raise ValueError(
                "At least one of `vllm_importance_sampling_clip_min` or `vllm_importance_sampling_clip_max` "
                "must be set when `vllm_importance_sampling_mode` is a `*_truncate` mode."
            )

    @property
    def sequence_level(self) -> bool:
        return self.mode.startswith("sequence_")

    def check_vespo(self) -> None:
        """VESPO folds per-token ratios into its sequence weight: TRL refuses the sequence modes with it."""
        if self.enabled and self.sequence_level:
            raise ValueError("VESPO loss requires `vllm_importance_sampling_mode` to be either 'token_truncate' or "
                             f"'token_mask'. Got: {self.mode}.")


def truncate(ratio: Tensor, clip_min: float | None, clip_max: float | None) -> Tensor:
    """Truncated IS: ``clamp(rho, C_min, C_max)``."""
    return torch.clamp(ratio, min=clip_min, max=clip_max)


def mask_outside(ratio: Tensor, clip_min: float | None, clip_max: float | None) -> Tensor:
    """Masked IS: ``rho`` where ``C_min <= rho <= C_max``, else 0 (a missing bound does not bind)."""
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


CONSTRAINTS = {"token_truncate": truncate, "sequence_truncate": truncate, "token_mask": mask_outside,
               "sequence_mask": mask_outside}


def importance_sampling_ratio(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, cfg: SamplerCorrection) -> Tensor:
    """The weight of each token's loss for the sampler's mismatch: ``(N, T)`` for the ``token_*`` modes,
    ``(N, 1)`` for the ``sequence_*`` ones (the product of the token ratios, ``exp(sum_t d_t)``), where
    ``d_t = log pi_old(y_t) - log pi_sampler(y_t)`` on the mask, 0 elsewhere and where NaN."""
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)  # (N, T)
    if cfg.sequence_level:
        diff = diff.sum(dim=-1, keepdim=True)  # (N, 1)
    return CONSTRAINTS[cfg.mode](torch.exp(diff), cfg.clip_min, cfg.clip_max)


def sampling_stats(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, ratio: Tensor, cfg: SamplerCorrection) -> Tensor:
    """One device's ``(5,)`` statistics: mean and max of ``|log pi_old - log pi_sampler|`` over its
    scored mask tokens, min, mean and max of the ratio (over mask tokens, or every sequence at sequence
    level); 0 where there is nothing to reduce, as TRL."""
    mask = mask.bool()
    delta = torch.abs(old_logps - sampling_logps)
    delta = delta[mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if cfg.sequence_level else ratio[mask]
    zero = ratio.new_zeros(())

    def reduce(x: Tensor, fn) -> Tensor:
        return fn(x).to(ratio.dtype) if x.numel() > 0 else zero

    return torch.stack([reduce(delta, torch.mean), reduce(delta, torch.max), reduce(flat, torch.min),
                        reduce(flat, torch.mean), reduce(flat, torch.max)])


def sampling_metrics(rank_stats: Tensor) -> dict[str, Tensor]:
    """TRL's ``sampling/*`` metrics from every device's :func:`sampling_stats` ``(W, 5)``: the mean of
    the devices' means, and the extremes of their extremes (NaN-ignoring for the ratio, as TRL)."""

    def nan_reduce(x: Tensor, fn) -> Tensor:
        kept = x[~torch.isnan(x)]
        return fn(kept) if kept.numel() > 0 else x.new_tensor(float("nan"))

    return {
        "sampling/sampling_logp_difference/mean": rank_stats[:, 0].mean(),
        "sampling/sampling_logp_difference/max": rank_stats[:, 1].max(),
        "sampling/importance_sampling_ratio/min": nan_reduce(rank_stats[:, 2], torch.min),
        "sampling/importance_sampling_ratio/mean": rank_stats[:, 3].nanmean(),
        "sampling/importance_sampling_ratio/max": nan_reduce(rank_stats[:, 4], torch.max),
    }


def off_policy_mask(advantages: Tensor, logps: Tensor, sampling_logps: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask ``(N, 1)`` (``(N, T)`` for per-token advantages): keep a
    completion if ``A >= 0`` or its mean KL ``mean_t(log pi_sampler - log pi_theta) <= threshold``."""
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)  # (N, T) forward KL per token
    mask = mask.to(kl.dtype)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (N, 1)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return ((adv >= 0) | (mean_kl <= threshold)).to(mask.dtype)
