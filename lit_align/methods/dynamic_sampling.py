"""DAPO's dynamic sampling for GRPO: groups whose completions all got the same reward carry no
signal, so their prompts are sampled again (up to ``max_resample_rounds`` times) before the update,
and the groups that now have reward spread take their place."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.rollout.engines import Generations
from lit_align.rollout.types import Rollout


class DynamicSampling:
    """Mixin of a group-based online module (before it in the bases): its ``make_rollout`` resamples flat groups."""

    def __init__(self, *args: Any, dynamic_sampling: bool = False, max_resample_rounds: int = 3, **kwargs: Any) -> None:
        """
        Args:
            dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal (no signal)
                are sampled again, up to ``max_resample_rounds`` times, before the update.
            max_resample_rounds: Most rounds of resampling per rollout.
        """
        super().__init__(*args, **kwargs)
        if max_resample_rounds < 0:
            raise ValueError(f"max_resample_rounds must be >= 0, got {max_resample_rounds}")
        self.dynamic_sampling = dynamic_sampling
        self.max_resample_rounds = max_resample_rounds

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
                              {k: [v for v, f in zip(vals, flat.tolist()) if f] for k, vals in batch.extras.items()},
                              vision_rows=None if batch.vision_rows is None else
                              [v for v, f in zip(batch.vision_rows, flat.tolist()) if f])
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
