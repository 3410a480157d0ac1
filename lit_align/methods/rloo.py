"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline, as TRL 1.16's ``RLOOTrainer``.

Each completion's baseline is the mean reward of the *other* completions of its prompt;
the KL to the reference (k1, summed over the completion) is subtracted from the reward at
rollout time; the update is a sequence-level clipped ratio (docs/methods.md §7).
Data: ``PromptOnlyDataModule``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.advantages import nanstd, rloo_advantages, weighted_rewards
from lit_align.losses.policy import rloo_loss
from lit_align.methods.generation_batches import GenerationBatches
from lit_align.methods.metrics import reward_metrics
from lit_align.methods.online import OnlineModule
from lit_align.methods.tool_use import ToolUse
from lit_align.rollout.types import Advantages, Rollout


class RLOO(ToolUse, GenerationBatches, OnlineModule):
    """REINFORCE Leave-One-Out on prompt-only data with reward functions."""

    default_lr = 1e-6

    def __init__(
        self,
        *args: Any,
        num_generations: int = 2,
        beta: float = 0.05,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        normalize_advantages: bool = False,
        reward_clip_range: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_generations: Completions per prompt (RLOO's k; TRL default 2).
            beta: Weight of the KL penalty folded into the reward (TRL default 0.05).
            epsilon: Lower clip range of the sequence ratio (``1 - epsilon``).
            epsilon_high: Upper clip range (default: ``epsilon``).
            normalize_advantages: Standardise advantages over the batch.
            reward_clip_range: Clip the weighted reward to ``(low, high)`` before the KL shaping.
        """
        super().__init__(*args, num_generations=num_generations, beta=beta, **kwargs)
        if self.num_generations < 2:
            raise ValueError(f"RLOO needs num_generations >= 2 (a baseline from the others), got {self.num_generations}")
        if reward_clip_range is not None and reward_clip_range[0] > reward_clip_range[1]:
            raise ValueError(f"reward_clip_range must be (low, high) with low <= high, got {reward_clip_range}")
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon_high if epsilon_high is not None else epsilon
        self.normalize_advantages = normalize_advantages
        self.reward_clip_range = reward_clip_range

    needs_old_logps = True  # the KL shaping and the ratio's denominator

    def advantages(self, rollout: Rollout, rewards: Tensor) -> Advantages:
        all_rewards, mine = self.gather(rewards)
        weighted = weighted_rewards(all_rewards, self.reward_weights)
        shaped = weighted if self.reward_clip_range is None else weighted.clamp(*self.reward_clip_range)
        metrics: dict[str, float] = {}
        if rollout.ref_logps is not None:
            log_ratio, mask = rollout.old_logps - rollout.ref_logps, rollout.loss_mask
            shaped = shaped - self.beta * self.gather((log_ratio * mask).sum(-1))[0]
            metrics["kl"] = float(self.global_mean(log_ratio, mask))
        adv = rloo_advantages(shaped, self.num_generations, self.normalize_advantages)
        zero_std = torch.isclose(nanstd(shaped.view(-1, self.num_generations), dim=1), torch.zeros(1, device=shaped.device))
        metrics.update(reward_metrics(self.reward_names, all_rewards, weighted, zero_std))
        return Advantages(adv[mine], shaped[mine], metrics)

    def shared_step(self, batch: PromptBatch, stage: str) -> Tensor:
        r: Rollout = batch.rollout
        logps, entropy = self.token_logps(self.model, r.sequences, r.generations, with_entropy=True)
        out = rloo_loss(logps, r.old_logps, r.advantages, r.loss_mask, self.epsilon_low, self.epsilon_high)
        ones = torch.ones_like(out.ratio)
        low, high = out.low_clipped.float(), out.high_clipped.float()
        metrics: dict[str, Tensor | float] = {
            "loss": self.global_sum(out.loss.detach()) / self.world_size,
            **r.metrics,
            "entropy": self.global_mean(entropy, r.loss_mask),
            "clip_ratio/low_mean": self.global_mean(low, ones),
            "clip_ratio/low_min": self.global_reduce(low.min(), "min"),
            "clip_ratio/high_mean": self.global_mean(high, ones),
            "clip_ratio/high_max": self.global_reduce(high.max(), "max"),
            "clip_ratio/region_mean": self.global_mean(torch.maximum(low, high), ones),
        }
        self.log_metrics(metrics, stage, len(r))
        return out.loss
