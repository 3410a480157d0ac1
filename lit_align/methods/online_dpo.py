"""OnlineDPO (Guo et al. 2024): DPO on pairs the policy samples itself, ranked online.

Two samples per prompt from the policy; the judge (or reward functions / models) picks the
better; the DPO ``sigmoid`` or ``ipo`` loss on the pair against the reference (docs/methods.md §10).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.online_preference import pair_dpo_loss
from lit_align.methods.online_preference import OnlinePreferenceModule
from lit_align.rollout.types import Rollout


class OnlineDPO(OnlinePreferenceModule):
    """Online DPO on prompt-only data with a pairwise judge or reward functions; a vision-language model
    samples both completions of a pair from its prompt's images (TRL's OnlineDPO with a VLM)."""

    images_in_rollouts = True

    # Both samples of a pair are the policy's: the base's second_sampler (None), one call per prompt batch.

    def shared_step(self, batch: PromptBatch, stage: str) -> Tensor:
        r: Rollout = batch.rollout
        E = len(r) // 2
        beta = self.current_beta
        logps = self.policy_token_logps(r)
        seq, ref = (logps * r.loss_mask).sum(1), (r.ref_logps * r.loss_mask).sum(1)
        first = r.extras["preferences"] >= 0.5
        pick = lambda a, b: torch.where(first, a, b)  # noqa: E731
        loss, metrics = pair_dpo_loss(
            pick(seq[:E], seq[E:]), pick(seq[E:], seq[:E]), pick(ref[:E], ref[E:]), pick(ref[E:], ref[:E]), beta, self.loss_type
        )
        kl = (seq - ref).detach()  # (2E,) sum_t log pi - log ref
        metrics = {"loss": loss.detach(), **metrics, "objective/kl": kl.mean(), "objective/entropy": -seq.detach().mean(),
                   "objective/non_score_reward": (-beta * kl).mean()}
        if not torch.isnan(r.rewards).any():
            scores = r.rewards
            chosen_scores = pick(scores[:E], scores[E:])
            metrics["objective/scores"] = scores.mean()
            metrics["objective/scores_margin"] = (chosen_scores - pick(scores[E:], scores[:E])).mean()
            metrics["objective/rlhf_reward"] = (scores - beta * kl).mean()
        ended = (~r.generations.is_truncated).float().mean()
        self.log_pair_metrics({**metrics, "val/contain_eos_token": ended}, r, stage)
        return loss
