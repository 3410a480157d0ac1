"""XPO (Xie et al. 2024): DPO on a policy sample against a reference sample, plus exploration.

Per prompt one sample from the policy and one from the frozen reference; the judge ranks
them; the loss is DPO (``sigmoid`` / ``ipo``) on the ranked pair plus ``alpha`` times the
policy's log-probability of the reference's sample (docs/methods.md §15; TRL removed it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.online_preference import xpo_loss
from lit_align.methods.online_preference import OnlinePreferenceModule, per_epoch
from lit_align.methods.tool_use import Sampler
from lit_align.rollout.engines import Generations, SamplingParams
from lit_align.rollout.types import Rollout


class XPO(OnlinePreferenceModule):
    """Exploratory Preference Optimization on prompt-only data with a pairwise judge or reward functions."""

    samples_reference = True

    def __init__(self, *args: Any, alpha: float | list[float] = 1e-5, **kwargs: Any) -> None:
        """
        Args:
            alpha: Weight of the exploration term; a list gives one value per epoch.
        """
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    @property
    def current_alpha(self) -> float:
        return per_epoch(self.alpha, self.current_epoch if self._trainer is not None else 0)

    def second_sampler(self) -> Sampler:
        """The frozen reference (in its context: a LoRA policy's base, adapters off); with tools it
        continues its own samples after each tool result, as the policy does its own."""

        def reference(ids: Tensor, mask: Tensor, sampling: SamplingParams) -> Generations:
            with self.reference_context():
                return self.sample(self.reference_model, ids, mask, policy=False, sampling=sampling)

        return reference

    def shared_step(self, batch: PromptBatch, stage: str) -> Tensor:
        r: Rollout = batch.rollout
        E = len(r) // 2
        beta = self.current_beta
        seq = (self.policy_token_logps(r) * r.loss_mask).sum(1)
        ref = (r.ref_logps * r.loss_mask).sum(1)
        model_wins = r.extras["preferences"] >= 0.5
        loss, dpo, xpo, metrics = xpo_loss(seq[:E], ref[:E], seq[E:], ref[E:], model_wins, beta, self.current_alpha, self.loss_type)
        kl = (seq - ref).detach()
        metrics = {"loss": loss.detach(), "loss/dpo": dpo, "loss/xpo": xpo, **metrics,
                   "objective/kl": kl.mean(), "objective/entropy": -seq.detach().mean()}
        if not torch.isnan(r.rewards).any():
            metrics["objective/model_scores"], metrics["objective/ref_scores"] = r.rewards[:E].mean(), r.rewards[E:].mean()
            metrics["objective/scores_margin"] = (r.rewards[:E] - r.rewards[E:]).mean()
        self.log_pair_metrics({**metrics, "alpha": self.current_alpha}, r, stage)
        return loss
