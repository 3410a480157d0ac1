"""Policy-gradient losses of the online methods: pure functions of per-token log-probs.

Shapes: completion tokens ``(N, T)`` (``N`` completions, right-padded to ``T``), a loss
mask ``(N, T)`` of 0/1, advantages ``(N,)`` (GRPO, RLOO) or ``(N, T)`` (PPO).

- :func:`grpo_loss`: the clipped surrogate of GRPO and its variants (``loss_type``), token
  or sequence (GSPO) importance sampling, the k3 KL to the reference, and each variant's
  normalisation exactly as TRL's ``GRPOTrainer._compute_loss`` (docs/methods.md §6); the
  sampler corrections it takes come from :mod:`lit_align.losses.importance`;
- :func:`entropy_bonus`, :class:`AdaptiveEntropy`: GRPO's entropy bonus and Skywork-OR1's
  adaptive coefficient, as TRL's (the chunked log-prob op's entropies carry its gradient);
- :func:`rloo_loss`: RLOO's sequence-level clipped surrogate (§7);
- :func:`ppo_policy_loss`, :func:`ppo_value_loss`: PPO's clipped policy and value losses (§14).

Gradient accumulation is Lightning's (it divides the returned loss), so no ``/ GA`` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from lit_align.losses.advantages import masked_mean

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
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
    vespo_k_pos: float = 2.0  # VESPO's Gamma weight phi(w) = e^lambda w^k e^(-lambda w), for A >= 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # ... and for A < 0
    vespo_lambda_neg: float = 2.0
    max_completion_length: int | None = None  # dr_grpo's constant normaliser

    def __post_init__(self) -> None:
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {self.importance_sampling_level!r}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # negative: a weight that grows without bound
                raise ValueError(f"{name} must be a finite number >= 0 (VESPO's Gamma weight), got {value}")

    def unusual_settings(self) -> list[str]:
        """TRL's warnings for a loss type with an importance sampling level its paper does not use."""
        out = []
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            out.append("When using `'luspo'` loss, `importance_sampling_level` should be set to `'sequence'` to mirror "
                       "the paper's setup.")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            out.append("VESPO computes sequence-level importance weights internally. `importance_sampling_level` "
                       "should be set to `'token'` (the default).")
        return out


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
    phi: Tensor | None = None  # (N, 1) VESPO's sequence weight, detached


class RatioInputs(NamedTuple):
    """What a surrogate may read."""

    ratio: Tensor  # (N, T) or (N, 1) pi / pi_old at cfg.importance_sampling_level
    log_ratio: Tensor  # (N, T) per-token log(pi / pi_old) (VESPO builds its own sequence weight from it)
    adv: Tensor  # (N, 1) or (N, T)
    logps: Tensor  # (N, T) with grad
    mask: Tensor  # (N, T) float
    sampling_ratio: Tensor | None  # the sampler correction (importance.importance_sampling_ratio), or None


class Surrogate(NamedTuple):
    per_token: Tensor  # (N, T) loss per token before normalisation
    ratio: Tensor  # the ratio the clip metrics read
    low_clipped: Tensor | None
    high_clipped: Tensor | None
    phi: Tensor | None = None


def clipped_surrogate(x: RatioInputs, cfg: GRPOLossConfig) -> Surrogate:
    """PPO's clipped objective ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, the unclipped
    ratio capped at ``delta`` when set (the clip metrics then read the capped ratio, as TRL's do)."""
    ratio, adv = x.ratio, x.adv
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    if cfg.delta is not None:
        ratio = torch.clamp(ratio, max=cfg.delta)
    low = (ratio < 1 - cfg.epsilon_low) & (adv < 0)
    high = (ratio > 1 + cfg.epsilon_high) & (adv > 0)
    return Surrogate(-torch.min(ratio * adv, clipped * adv), ratio, low, high)


def cispo_surrogate(x: RatioInputs, cfg: GRPOLossConfig) -> Surrogate:
    """CISPO: the clipped ratio as a detached weight of ``A * log p`` (``-min(r, eps_high).sg A logp``)."""
    return Surrogate(-torch.clamp(x.ratio, max=cfg.epsilon_high).detach() * x.adv * x.logps, x.ratio, None,
                     (x.ratio > cfg.epsilon_high) & (x.adv > 0))


def sapo_surrogate(x: RatioInputs, cfg: GRPOLossConfig) -> Surrogate:
    """SAPO: a soft gate ``-(sigmoid(tau (r - 1)) * 4 / tau) A``, ``tau`` by the sign of ``A``."""
    tau = torch.where(x.adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    return Surrogate(-(torch.sigmoid(tau * (x.ratio - 1)) * 4 / tau) * x.adv, x.ratio, None, None)


@torch.no_grad()
def vespo_weights(log_ratio: Tensor, adv: Tensor, mask: Tensor, sampling_ratio: Tensor | None, cfg: GRPOLossConfig) -> Tensor:
    """VESPO's Gamma weight ``phi(w) = e^lambda w^k e^(-lambda w)`` (``phi(1) = 1``) of the sequence
    ratio ``w = prod_t pi / pi_old`` (times the sampler correction's ratios when given), ``(k, lambda)``
    by the sign of ``A``; in log space with TRL's clamps (``log w`` in ``[log 1e-8, 20]``), no gradient."""
    floor = math.log(1e-8)
    log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(dim=-1, keepdim=True)  # (N, 1) a sum, not a mean
    if sampling_ratio is not None:  # log w = log(pi / pi_old) + log(pi_old / pi_sampler)
        log_w = log_w + torch.clamp(torch.log(sampling_ratio), floor, 20.0).sum(dim=-1, keepdim=True)
    log_w = torch.clamp(log_w, floor, 20.0)
    nonneg = adv >= 0
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_surrogate(x: RatioInputs, cfg: GRPOLossConfig) -> Surrogate:
    """VESPO: ``-phi(w).sg A log p``, a smooth asymmetric weight of the sequence instead of a clip."""
    phi = vespo_weights(x.log_ratio, x.adv, x.mask, x.sampling_ratio, cfg)
    return Surrogate(-phi * x.adv * x.logps, x.ratio, None, None, phi)


def sequence_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """Each completion's token mean, then the mean over completions (grpo, sapo)."""
    return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def sequence_sum_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """Each completion's token sum, then the mean over completions (luspo: a sequence weighs its length)."""
    return masked.sum(-1).mean()


def token_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """The micro-batch's token mean (bnpo)."""
    return masked.sum() / mask.sum().clamp(min=1.0)


def constant_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """Over ``N * max_completion_length``, whatever the lengths (dr_grpo)."""
    return masked.sum() / (masked.size(0) * cfg.max_completion_length)


def global_batch_mean(masked: Tensor, mask: Tensor, cfg: GRPOLossConfig, num_items) -> Tensor:
    """Over the loss tokens of the global batch per device (dapo, cispo, vespo; the local ones if not given)."""
    num_items = mask.sum() if num_items is None else num_items
    return masked.sum() / torch.as_tensor(num_items, dtype=masked.dtype).clamp(min=1.0)


SURROGATES = {"grpo": clipped_surrogate, "bnpo": clipped_surrogate, "dr_grpo": clipped_surrogate,
              "dapo": clipped_surrogate, "cispo": cispo_surrogate, "sapo": sapo_surrogate,
              "luspo": clipped_surrogate, "vespo": vespo_surrogate}
NORMALISATIONS = {"grpo": sequence_mean, "sapo": sequence_mean, "bnpo": token_mean, "dr_grpo": constant_mean,
                  "dapo": global_batch_mean, "cispo": global_batch_mean, "luspo": sequence_sum_mean,
                  "vespo": global_batch_mean}
CLIPPED = tuple(name for name, surrogate in SURROGATES.items() if surrogate is clipped_surrogate)
WEIGHS_SAMPLER_INSIDE = ("vespo",)  # the sampler correction enters the surrogate, not the per-token loss


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
    importance_sampling_ratio: Tensor | None = None,
    off_policy_mask: Tensor | None = None,
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
        num_items: ``dapo``/``cispo``/``vespo``'s normaliser: the loss tokens of the global batch
            divided by the number of devices (DDP then averages the per-device gradients).
        importance_sampling_ratio: The sampler correction ``(N, T)`` or ``(N, 1)``
            (:func:`lit_align.losses.importance.importance_sampling_ratio`): a weight of the per-token
            loss, or, for ``vespo``, a factor of its sequence ratio.
        off_policy_mask: ``(N, 1)`` keep (1) or drop (0) each completion
            (:func:`lit_align.losses.importance.off_policy_mask`).
    """
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logps - old_logps
    log_weights = log_ratio
    if cfg.importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_weights)
    kl = None
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs reference log-probs")
        kl = k3_kl(logps, ref_logps)
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
    inputs = RatioInputs(ratio, log_ratio, adv, logps, mask, importance_sampling_ratio)
    per_token, ratio, low, high, phi = SURROGATES[cfg.loss_type](inputs, cfg)
    if off_policy_mask is not None:
        per_token = per_token * off_policy_mask
    if token_mask is not None:
        per_token = per_token * token_mask
    if importance_sampling_ratio is not None and cfg.loss_type not in WEIGHS_SAMPLER_INSIDE:
        per_token = per_token * importance_sampling_ratio
    if kl is not None:
        per_token = per_token + cfg.beta * kl
    loss = NORMALISATIONS[cfg.loss_type](per_token * mask, mask, cfg, num_items)
    return PolicyLoss(loss, ratio.detach(), _detached(low), _detached(high), _detached(kl), _detached(phi))


def entropy_bonus(entropy: Tensor, mask: Tensor) -> Tensor:
    """The mean entropy of the tokens in ``mask`` (the policy loss's tokens, high-entropy ones only
    under ``top_entropy_quantile``): TRL's ``L = L_policy - entropy_coef * H``, whatever the loss type's
    normalisation. ``(N, T)`` each; a scalar, differentiable where ``entropy`` is."""
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class AdaptiveEntropy:
    """The entropy bonus's coefficient (TRL's ``entropy_coef``): fixed, or Skywork-OR1's adaptive
    control (``use_adaptive_entropy``). Adaptive: after each optimizer step :meth:`update` moves it by
    ``delta`` within ``[coef_min, coef_max]``, up when that step's token-weighted entropy (over every
    micro-batch and device) was at most ``target``, down otherwise; a step applies the coefficient of
    the step before, and only while that step's entropy was at most ``target`` (none before the first)."""

    coef: float = 0.0  # entropy_coef (adaptive: the initial value)
    adaptive: bool = False  # use_adaptive_entropy
    coef_min: float = 0.0  # entropy_coef_min
    coef_max: float = 1.0  # entropy_coef_max
    delta: float = 0.005  # entropy_coef_delta
    target: float = 0.2  # entropy_target
    last_world_entropy: float = math.inf
    window: Tensor | None = field(default=None, repr=False)  # [sum of entropies, tokens] of this step's micro-batches

    def __post_init__(self) -> None:
        if not math.isfinite(self.coef):
            raise ValueError(f"entropy_coef must be finite, got {self.coef}")
        if self.adaptive and not self.coef_min <= self.coef_max:
            raise ValueError(f"entropy_coef_min ({self.coef_min}) must be <= entropy_coef_max ({self.coef_max})")
        if self.adaptive and not self.delta >= 0:
            raise ValueError(f"entropy_coef_delta must be >= 0, got {self.delta}")

    @property
    def enabled(self) -> bool:
        """Whether the loss has the bonus at all (adaptive: always, so that the coefficient can recover)."""
        return self.coef != 0.0 or self.adaptive

    @property
    def applied(self) -> float:
        """The coefficient this step's loss uses."""
        if not self.adaptive:
            return self.coef
        return self.coef if self.last_world_entropy <= self.target else 0.0

    def update(self, world_entropy: float) -> None:
        """At an optimizer step: the entropy it measured sets the next step's coefficient."""
        if world_entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_world_entropy = world_entropy

    def observe(self, entropy: Tensor, mask: Tensor) -> None:
        """A training micro-batch's entropies ``(N, T)`` over the bonus's tokens, into this step's window."""
        if self.adaptive:
            stats = torch.stack([(entropy.detach() * mask).sum(), mask.sum()]).float()
            self.window = stats if self.window is None else self.window + stats

    def end_step(self, global_sum: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        """At an optimizer step: :meth:`update` from the window's token-weighted entropy, summed over
        devices by ``global_sum``, then a new window."""
        if self.adaptive and self.window is not None:
            total = global_sum(self.window)
            self.update((total[0] / total[1].clamp(min=1.0)).item())
            self.window = None

    def state_dict(self) -> dict[str, float]:
        """TRL's ``entropy_ctrl_state.json``."""
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_world_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.last_world_entropy = float(state["entropy_coef"]), float(state["last_world_entropy"])


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
