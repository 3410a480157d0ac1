"""GRPO (Shao et al. 2024) and its variants: DAPO, Dr. GRPO, BNPO, CISPO, SAPO, GSPO.

Each prompt gets ``num_generations`` completions; a completion's advantage is its reward
relative to its group; the policy follows a clipped importance-weighted surrogate,
optionally with the k3 KL to a reference. Loss types, normalisations and metric names are
TRL's ``GRPOTrainer`` (docs/methods.md §6). Data: ``PromptOnlyDataModule``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.advantages import (
    AGGREGATIONS,
    SCALE_REWARDS,
    Aggregation,
    ScaleRewards,
    group_advantages,
)
from lit_align.losses.policy import (
    CLIPPED,
    GRPOLossConfig,
    GRPOLossType,
    ImportanceSamplingLevel,
    entropy_mask,
    grpo_loss,
)
from lit_align.methods.metrics import reward_metrics
from lit_align.methods.online import OnlineModule
from lit_align.rollout.engines import Generations
from lit_align.rollout.types import Advantages, Rollout


class GRPO(OnlineModule):
    """Group Relative Policy Optimization on prompt-only data with reward functions."""

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
        dynamic_sampling: bool = False,
        max_resample_rounds: int = 3,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            loss_type: ``dapo`` (TRL's default: token sum over the global batch's tokens), ``grpo``
                (per-sequence means), ``bnpo`` (token mean of the micro-batch), ``dr_grpo`` (over
                ``N * max_completion_length``), ``cispo`` (clipped IS weight times log-prob), ``sapo``
                (soft gate instead of the clip).
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
            dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal (no signal)
                are sampled again, up to ``max_resample_rounds`` times, before the update.
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
            sapo_temperature_neg=sapo_temperature_neg, max_completion_length=self.max_completion_length,
        )
        self.loss_type = loss_type
        self.scale_rewards = scale_rewards
        self.multi_objective_aggregation = multi_objective_aggregation
        self.top_entropy_quantile = top_entropy_quantile
        self.dynamic_sampling = dynamic_sampling
        self.max_resample_rounds = max_resample_rounds

    # -- rollout -----------------------------------------------------------------------------------
    def make_rollout(self, batch: PromptBatch, stage: str) -> Rollout:
        if not self.dynamic_sampling or stage != "train":
            return super().make_rollout(batch, stage)
        self.check_prompt_budget(batch)
        gens = self.sample_batch(batch)
        completions, rewards = self.score(batch, gens)
        for _ in range(self.max_resample_rounds):
            flat = self.flat_groups(rewards)
            if not flat.any():
                break
            sub = PromptBatch(batch.prompt_ids[flat], batch.prompt_mask[flat], [p for p, f in zip(batch.prompts, flat.tolist()) if f],
                              {k: [v for v, f in zip(vals, flat.tolist()) if f] for k, vals in batch.extras.items()})
            new = self.sample_batch(sub)
            new_completions, new_rewards = self.score(sub, new)
            useful = ~self.flat_groups(new_rewards)
            gens, completions, rewards = replace_groups(
                gens, completions, rewards, new, new_completions, new_rewards, flat, useful, self.pad_token_id
            )
        return self.build_rollout(batch, gens, completions, rewards, stage)

    def flat_groups(self, rewards: Tensor) -> Tensor:
        """Prompts whose completions all got the same weighted reward: ``(prompts,)`` bool."""
        total = (rewards * self.reward_weights.to(rewards)).nansum(dim=1).view(-1, self.num_generations)
        return (total.max(dim=1).values - total.min(dim=1).values).abs() < 1e-8

    def advantages(self, rollout: Rollout, rewards: Tensor) -> Advantages:
        all_rewards, mine = self.gather(rewards)
        adv = group_advantages(all_rewards, self.reward_weights, self.num_generations, self.scale_rewards, self.multi_objective_aggregation)
        return Advantages(
            adv.advantages[mine], adv.rewards[mine],
            metrics=reward_metrics(self.reward_names, all_rewards, adv.rewards, adv.zero_std),
            extras={"num_items": self.global_sum(rollout.loss_mask.sum()) / self.world_size},  # dapo, cispo
        )

    # -- loss --------------------------------------------------------------------------------------
    def shared_step(self, batch: PromptBatch, stage: str) -> Tensor:
        r: Rollout = batch.rollout
        logps, entropy = self.token_logps(self.model, r.sequences, r.generations, with_entropy=True)
        token_mask = None
        if self.top_entropy_quantile < 1.0:
            token_mask = entropy_mask(entropy, r.loss_mask, self.entropy_threshold(entropy, r.loss_mask))
        old = r.old_logps if r.old_logps is not None else logps.detach()
        out = grpo_loss(logps, old, r.advantages, r.loss_mask, self.loss_config, ref_logps=r.ref_logps,
                        token_mask=token_mask, num_items=r.extras["num_items"])
        metrics: dict[str, Tensor | float] = {"loss": self.global_sum(out.loss.detach()) / self.world_size, **r.metrics}
        metrics["entropy"] = self.global_mean(entropy, r.loss_mask)
        if out.kl is not None:
            metrics["kl"] = self.global_mean(out.kl, r.loss_mask)
        metrics.update(self.clip_metrics(out, r.loss_mask))
        self.log_metrics(metrics, stage, len(r))
        return out.loss

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


def replace_groups(
    gens: Generations, completions: list, rewards: Tensor, new: Generations, new_completions: list,
    new_rewards: Tensor, flat: Tensor, useful: Tensor, pad_token_id: int,
) -> tuple[Generations, list, Tensor]:
    """Swap the groups of the prompts marked ``flat`` for their resampled groups (``new``, one per
    flat prompt, in order) where those are ``useful`` (have reward spread)."""
    G = gens.completion_ids.size(0) // flat.numel()
    targets = flat.nonzero().squeeze(1)[useful]
    if targets.numel() == 0:
        return gens, completions, rewards
    rows = torch.arange(len(gens))  # into gens, then new, joined
    for j, p in zip(useful.nonzero().squeeze(1).tolist(), targets.tolist()):
        rows[p * G : (p + 1) * G] = len(gens) + torch.arange(j * G, (j + 1) * G)
    joined = [*completions, *new_completions]
    return (gens.cat(new, pad_token_id).select(rows.to(gens.completion_ids.device)), [joined[i] for i in rows.tolist()],
            torch.cat([rewards, new_rewards])[rows.to(rewards.device)])
