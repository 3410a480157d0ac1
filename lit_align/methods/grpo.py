"""GRPO (Shao et al. 2024) and its variants: DAPO, Dr. GRPO, BNPO, CISPO, SAPO, GSPO, LUSPO, VESPO.

Each prompt gets ``num_generations`` completions; a completion's advantage is its reward
relative to its group; the policy follows a clipped importance-weighted surrogate,
optionally with the k3 KL to a reference and an entropy bonus (fixed or adaptive). When the
sampler is not the trained model (vLLM, a generation server), its log-probs correct the loss
(truncated or masked importance sampling, the off-policy sequence mask). Loss types,
normalisations and metric names are TRL's ``GRPOTrainer`` (docs/methods.md §6). Data:
``PromptOnlyDataModule``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.advantages import (
    AGGREGATIONS,
    SCALE_REWARDS,
    Aggregation,
    ScaleRewards,
    group_advantages,
)
from lit_align.losses.importance import (
    ImportanceSamplingMode,
    SamplerCorrection,
    importance_sampling_ratio,
    off_policy_mask,
    sampling_metrics,
    sampling_stats,
)
from lit_align.losses.policy import (
    CLIPPED,
    GRPOLossConfig,
    GRPOLossType,
    ImportanceSamplingLevel,
    entropy_mask,
    grpo_loss,
)
from lit_align.methods.dynamic_sampling import DynamicSampling
from lit_align.methods.entropy_bonus import EntropyBonus
from lit_align.methods.generation_batches import GenerationBatches
from lit_align.methods.metrics import reward_metrics
from lit_align.methods.online import OnlineModule
from lit_align.methods.tool_use import ToolUse
from lit_align.rollout.types import Advantages, Rollout


class GRPO(ToolUse, DynamicSampling, GenerationBatches, EntropyBonus, OnlineModule):
    """Group Relative Policy Optimization on prompt-only data with reward functions.

    Also TRL 1.16's ``luspo`` and ``vespo`` (``vespo_*``), the entropy bonus (``entropy_coef``, adaptive
    with ``use_adaptive_entropy`` and ``entropy_coef_min|max|delta``, ``entropy_target``; kept in
    checkpoints), the sampler correction (``vllm_importance_sampling_*``) and the off-policy sequence
    mask (``off_policy_mask_threshold``)."""

    default_lr = 1e-6

    def __init__(
        self,
        *args: Any,
        loss_type: GRPOLossType = "dapo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        importance_sampling_level: ImportanceSamplingLevel = "token",
        scale_rewards: ScaleRewards | bool = "group",
        multi_objective_aggregation: Aggregation = "sum_then_normalize",
        top_entropy_quantile: float = 1.0,
        use_bias_correction_kl: bool = True,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_mode: ImportanceSamplingMode = "sequence_mask",
        vllm_importance_sampling_clip_min: float | None = None,
        vllm_importance_sampling_clip_max: float | None = 3.0,
        vllm_importance_sampling_cap: float | None = None,
        off_policy_mask_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            loss_type: ``dapo`` (TRL's default: token sum over the global batch's tokens), ``grpo``
                (per-sequence means), ``bnpo`` (token mean of the micro-batch), ``dr_grpo`` (over
                ``N * max_completion_length``), ``cispo`` (clipped IS weight times log-prob), ``sapo``
                (soft gate instead of the clip), ``luspo`` (per-sequence token sums, then their mean; meant
                for ``importance_sampling_level="sequence"``), ``vespo`` (a smooth Gamma weight of the
                sequence ratio times the log-prob, normalised as ``dapo``).
            epsilon: Lower clip range of the ratio (``1 - epsilon``).
            epsilon_high: Upper clip range (default: ``epsilon``; DAPO uses 0.28; CISPO's upper bound
                on the weight, about 5).
            delta: Upper clip of the unclipped ratio (INTELLECT-2 two-sided clipping); None: off.
            importance_sampling_level: ``token`` or ``sequence`` (GSPO: the geometric mean ratio).
            scale_rewards: Divide advantages by the ``group`` std, the ``batch`` std, or ``none``
                (True means group, False none, as TRL accepts).
            multi_objective_aggregation: ``sum_then_normalize`` or ``normalize_then_sum`` (GDPO).
            top_entropy_quantile: Train on the tokens whose entropy is in this top fraction (1: all).
            use_bias_correction_kl: Multiply the KL by the importance ratio.
            sapo_temperature_pos: SAPO's gate temperature for positive advantages.
            sapo_temperature_neg: SAPO's gate temperature for negative advantages.
            vespo_k_pos: VESPO's power ``k`` for advantages >= 0 (down-weights ratios below 1).
            vespo_lambda_pos: VESPO's decay ``lambda`` for advantages >= 0 (down-weights ratios above 1).
            vespo_k_neg: VESPO's ``k`` for negative advantages.
            vespo_lambda_neg: VESPO's ``lambda`` for negative advantages.
            vllm_importance_sampling_correction: When the sampler is not the trained model (vLLM, a server)
                and reports log-probs, weigh the loss by the ratio of the policy's to the sampler's.
            vllm_importance_sampling_mode: ``token_truncate``/``token_mask`` (per-token ratios clipped to,
                or zeroed outside, ``[clip_min, clip_max]``), ``sequence_truncate``/``sequence_mask``.
            vllm_importance_sampling_clip_min: Lower bound of the ratio (None: none).
            vllm_importance_sampling_clip_max: Upper bound of the ratio (None: none).
            vllm_importance_sampling_cap: Deprecated name of ``vllm_importance_sampling_clip_max``.
            off_policy_mask_threshold: Drop the completions with a negative advantage and a mean KL from the
                sampler above this (DeepSeek-V3.2's off-policy mask; e.g. 0.5). None: off.
        """
        super().__init__(*args, **kwargs)
        if isinstance(scale_rewards, bool):
            scale_rewards = "group" if scale_rewards else "none"
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        if multi_objective_aggregation not in AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {AGGREGATIONS}, got {multi_objective_aggregation!r}")
        if self.num_generations < 2:
            raise ValueError(f"GRPO needs num_generations >= 2 (a group to compare with), got {self.num_generations}")
        if not 0.0 < top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
        self.loss_config = GRPOLossConfig(  # checked here, once
            loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high if epsilon_high is not None else epsilon,
            delta=delta, importance_sampling_level=importance_sampling_level, beta=self.beta,
            use_bias_correction_kl=use_bias_correction_kl, sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, max_completion_length=self.max_completion_length,
        )
        if vllm_importance_sampling_cap is not None:
            warnings.warn("The `vllm_importance_sampling_cap` argument is deprecated and will be removed in v2.0.0. "
                          "Use `vllm_importance_sampling_clip_max` instead.", FutureWarning, stacklevel=2)
            vllm_importance_sampling_clip_max = vllm_importance_sampling_cap
        self.sampler_correction = SamplerCorrection(vllm_importance_sampling_correction, vllm_importance_sampling_mode,
                                                    vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max)
        if loss_type == "vespo" and self.use_vllm:
            self.sampler_correction.check_vespo()
        self.off_policy_mask_threshold = off_policy_mask_threshold
        for message in self.loss_config.unusual_settings():
            rank_zero_warn(message)
        self.loss_type = loss_type
        self.scale_rewards = scale_rewards
        self.multi_objective_aggregation = multi_objective_aggregation
        self.top_entropy_quantile = top_entropy_quantile

    # -- rollout -----------------------------------------------------------------------------------
    def advantages(self, rollout: Rollout, rewards: Tensor) -> Advantages:
        all_rewards, mine = self.gather(rewards)
        adv = group_advantages(all_rewards, self.reward_weights, self.num_generations, self.scale_rewards, self.multi_objective_aggregation)
        out = Advantages(
            adv.advantages[mine], adv.rewards[mine],
            metrics=reward_metrics(self.reward_names, all_rewards, adv.rewards, adv.zero_std),
            # dapo, cispo, vespo: the generation batch's tokens per device and per step it serves (TRL's normaliser)
            extras={"num_items": self.global_sum(rollout.loss_mask.sum()) / (self.world_size * self.generation_steps)},
        )
        sampling = self.sampler_logps(rollout)
        if sampling is not None and self.sampler_correction.enabled:  # TRL's _generate_and_score_completions
            cfg = self.sampler_correction
            if self.loss_type == "vespo":
                cfg.check_vespo()
            ratio = importance_sampling_ratio(rollout.old_logps, sampling, rollout.loss_mask, cfg)
            out.extras["importance_sampling_ratio"] = ratio  # (N, C) or (N, 1)
            stats = sampling_stats(rollout.old_logps, sampling, rollout.loss_mask, ratio, cfg)
            out.metrics.update({k: v.item() for k, v in sampling_metrics(self.gather(stats[None])[0]).items()})
        return out

    @property
    def needs_old_logps(self) -> bool:
        """TRL also keeps them to correct a sampler that is not the trained model."""
        return super().needs_old_logps or (self.sampler_correction.enabled and not self.engine.samples_any_model)

    def sampler_logps(self, rollout: Rollout) -> Tensor | None:
        """The sampler's log-probs of the completions ``(N, C)`` when the sampler is not the trained model
        (an engine with its own copy of the policy): what the correction and the off-policy mask read."""
        return None if self.engine.samples_any_model else rollout.generations.sampling_logps

    # -- loss --------------------------------------------------------------------------------------
    def shared_step(self, batch: PromptBatch, stage: str) -> Tensor:
        r: Rollout = batch.rollout
        logps, entropy = self.token_logps(self.model, r.sequences, r.generations, with_entropy=True)
        token_mask = None
        if self.top_entropy_quantile < 1.0:
            token_mask = entropy_mask(entropy.detach(), r.loss_mask, self.entropy_threshold(entropy.detach(), r.loss_mask))
        old = r.old_logps if r.old_logps is not None else logps.detach()
        keep = None
        if self.off_policy_mask_threshold is not None:  # the sampler's log-probs when it is another model, else old
            sampling = self.sampler_logps(r)
            keep = off_policy_mask(r.advantages, logps, old if sampling is None else sampling, r.loss_mask,
                                   self.off_policy_mask_threshold)
        out = grpo_loss(logps, old, r.advantages, r.loss_mask, self.loss_config, ref_logps=r.ref_logps,
                        token_mask=token_mask, num_items=r.extras["num_items"],
                        importance_sampling_ratio=r.extras.get("importance_sampling_ratio"), off_policy_mask=keep)
        loss, metrics = out.loss, {}
        if self.entropy_control.enabled:
            loss = loss - self.entropy_term(entropy, r.loss_mask if token_mask is None else r.loss_mask * token_mask, stage)
            metrics["policy_loss"] = self.global_sum(out.loss.detach()) / self.world_size
        metrics = {"loss": self.global_sum(loss.detach()) / self.world_size, **metrics, **r.metrics}
        metrics["entropy"] = self.global_mean(entropy.detach(), r.loss_mask)
        if out.kl is not None:
            metrics["kl"] = self.global_mean(out.kl, r.loss_mask)
        metrics.update(self.clip_metrics(out, r.loss_mask))
        self.log_metrics(metrics, stage, len(r))
        return loss

    def entropy_threshold(self, entropy: Tensor, mask: Tensor) -> Tensor:
        """The ``1 - top_entropy_quantile`` quantile of every rank's valid-token entropies."""
        local = entropy[mask.bool()].float()
        if self.world_size > 1:
            width = int(self.global_reduce(torch.tensor(local.numel(), device=self.device), "max"))
            padded = torch.full((width,), -1.0, device=self.device)
            padded[: local.numel()] = local
            local = self.all_gather(padded).reshape(-1)
            local = local[local >= 0]
        if local.numel() == 0:
            return torch.tensor(float("inf"), device=entropy.device)
        return torch.quantile(local, 1 - self.top_entropy_quantile)

    def clip_metrics(self, out, mask: Tensor) -> dict[str, Tensor]:
        """TRL's ``clip_ratio/*`` (or ``cispo_clip_ratio``): token means over all ranks, and the
        extremes of the per-sequence means."""
        if self.loss_type == "cispo":
            return {"cispo_clip_ratio": self.token_or_sequence_mean(out.high_clipped, mask)}
        if self.loss_type == "vespo":
            return {"vespo/phi_seq_mean": self.token_or_sequence_mean(out.phi, mask)}
        if self.loss_type not in CLIPPED:
            return {}
        low, high = out.low_clipped.float(), out.high_clipped.float()

        def seq_mean(x: Tensor) -> Tensor:
            return x.squeeze(1) if x.size(1) == 1 else (x * mask).sum(-1) / mask.sum(-1)

        return {
            "clip_ratio/low_mean": self.token_or_sequence_mean(low, mask),
            "clip_ratio/high_mean": self.token_or_sequence_mean(high, mask),
            "clip_ratio/region_mean": self.token_or_sequence_mean(torch.maximum(low, high), mask),
            "clip_ratio/low_min": self.global_reduce(seq_mean(low).nan_to_num(nan=float("inf")).min(), "min"),
            "clip_ratio/high_max": self.global_reduce(seq_mean(high).nan_to_num(nan=float("-inf")).max(), "max"),
        }

    def token_or_sequence_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        if x.size(1) == 1:  # sequence-level importance sampling: one value per completion
            return self.global_mean(x.float().squeeze(1), torch.ones_like(x.float().squeeze(1)))
        return self.global_mean(x.float(), mask)
