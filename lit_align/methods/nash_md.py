"""Nash-MD (Munos et al. 2023): learning towards the Nash equilibrium of the preference game.

Per prompt one sample from the policy and one from the geometric mixture of policy and
reference (``mixture_coef``); the judge's probability ``P`` that the policy's sample wins drives
a REINFORCE update with the 0.5 control variate, plus the KL to the reference as a REINFORCE
term (docs/methods.md §15; TRL removed it, this is its last algorithm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.online_preference import nash_md_loss
from lit_align.methods.online_preference import OnlinePreferenceModule, per_epoch
from lit_align.methods.tool_use import Sampler
from lit_align.rollout.mixture import GeometricMixture
from lit_align.rollout.types import Rollout


class NashMD(OnlinePreferenceModule):
    """Nash Mirror Descent on prompt-only data with a pairwise judge or reward functions."""

    samples_reference = True

    def __init__(self, *args: Any, mixture_coef: float | list[float] = 0.5, **kwargs: Any) -> None:
        """
        Args:
            mixture_coef: Weight of the reference in the geometric mixture (0: the policy, 1: the
                reference); a list gives one value per epoch.
        """
        super().__init__(*args, **kwargs)
        coefs = mixture_coef if isinstance(mixture_coef, (list, tuple)) else [mixture_coef]
        if any(not 0.0 <= c <= 1.0 for c in coefs):
            raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
        self.mixture_coef = mixture_coef

    @property
    def current_mixture_coef(self) -> float:
        return per_epoch(self.mixture_coef, self.current_epoch if self._trainer is not None else 0)

    def second_sampler(self) -> Sampler:
        """The geometric mixture of policy and reference (at this epoch's ``mixture_coef``); with tools it
        continues its own samples after each tool result, as the policy does its own."""
        # the reference forward runs in its context (LoRA: the policy's base, adapters off)
        mixture = GeometricMixture(self.model, self.reference_model, self.current_mixture_coef, self.reference_context)
        return lambda ids, mask, sampling: self.sample(mixture, ids, mask, policy=False, sampling=sampling)

    def first_wins(self, first: Tensor, second: Tensor) -> Tensor:
        return torch.sigmoid(first - second)  # TRL: P = sigmoid(score_model - score_mixture)

    def shared_step(self, batch: PromptBatch, stage: str) -> Tensor:
        r: Rollout = batch.rollout
        E = len(r) // 2
        beta = self.current_beta
        logps = self.policy_token_logps(r)[:E]
        mask, ref = r.loss_mask[:E], r.ref_logps[:E]
        loss, score, kl = nash_md_loss(logps, ref, mask, r.extras["preferences"], beta)
        seq, ref_seq = (logps * mask).sum(1).detach(), (ref * mask).sum(1)
        metrics = {
            "loss": loss.detach(), "loss/score": score.mean(), "loss/kl": kl.mean(),
            "logps/chosen": seq.mean(), "logps/rejected": ref_seq.mean(),
            "rewards/probabilities": r.extras["preferences"].mean(), "objective/entropy": -seq.mean(),
            "rewards/margins": (seq - ref_seq).mean(), "rewards/accuracies": (seq > ref_seq).float().mean(),
        }
        if not torch.isnan(r.rewards).any():
            metrics["rewards/chosen"], metrics["rewards/rejected"] = r.rewards[:E].mean(), r.rewards[E:].mean()
        self.log_pair_metrics({**metrics, "mixture_coef": self.current_mixture_coef}, r, stage)
        return loss
