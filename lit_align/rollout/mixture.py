"""NashMD's geometric mixture of the policy and the reference, as a model the engines sample from.

``log pi_mix(y_t | y_<t) = log_softmax(alpha * ref_logits + (1 - alpha) * policy_logits)``
(Munos et al. 2023, Eq. 11; TRL's ``GeometricMixtureWrapper``), decoded token by token with
both models' KV caches.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn


class PairCache:
    """Two KV caches that the lean decoder handles as one (prefill copies apply to both)."""

    def __init__(self) -> None:
        from transformers import DynamicCache

        self.policy, self.ref = DynamicCache(), DynamicCache()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.policy.batch_repeat_interleave(repeats)
        self.ref.batch_repeat_interleave(repeats)


class GeometricMixture(nn.Module):
    """``forward`` returns the mixture's log-probabilities as ``logits``; ``new_cache`` gives the
    cache pair the decoder threads through. ``alpha = 0`` is the policy, ``1`` the reference."""

    def __init__(self, policy: nn.Module, ref: nn.Module, alpha: float, ref_context=None) -> None:
        """``ref_context()``: a context manager the reference forward runs in (a LoRA policy's
        base with adapters disabled is its reference: then ``ref`` is the policy itself)."""
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"mixture_coef must be in [0, 1], got {alpha}")
        self.policy, self.ref, self.alpha = policy, ref, alpha
        self.ref_context = ref_context
        from lit_align.rollout.engines import decoder_cache_argument

        # Resolved once: forward runs once per decoded token.
        self.cache_args = (decoder_cache_argument(policy), decoder_cache_argument(ref))
        self.config = policy.config
        self.generation_config = getattr(policy, "generation_config", None)

    def new_cache(self) -> PairCache:
        return PairCache()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
        cache: PairCache | None = None, use_cache: bool = True, logits_to_keep: int = 0, **kwargs: Any,
    ) -> SimpleNamespace:
        common = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": use_cache, "logits_to_keep": logits_to_keep}
        policy = self.policy(**common, **{self.cache_args[0]: cache.policy if cache else None}).logits
        with self.ref_context() if self.ref_context is not None else contextlib.nullcontext():
            ref = self.ref(**common, **{self.cache_args[1]: cache.ref if cache else None}).logits
        mixed = self.alpha * ref.float() + (1 - self.alpha) * policy.float()
        return SimpleNamespace(logits=torch.log_softmax(mixed, dim=-1))
