"""Odds Ratio Preference Optimization (TRL ``trl.experimental.orpo``, docs/methods.md §9).

Reference-free, single stage: ``NLL(chosen sequence) - beta * mean_i log sigma(log_odds_i)``
with the odds of the per-token average log-probs of chosen and rejected (Hong et al. 2024).
As TRL, the NLL covers the whole chosen sequence, prompt included, and every prompt starts with
the tokenizer's BOS token when it has one (``add_bos_to_prompt``: ``PreferenceDataModule`` adds it
where the tokenizer or the chat template did not), so the prompt's first token is a target too; one
forward gives both terms (the LM head runs over the chosen prompts and all completions). Departures from TRL:
``logits/*`` as DPO's (completion tokens only); conversational rows get no second EOS after the
chat template's closing newline (TRL's legacy ORPO pipeline appends one).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from lit_align.losses.odds import orpo_loss
from lit_align.methods.base import AlignModule
from lit_align.methods.eval_samples import GenerateDuringEval
from lit_align.methods.metrics import preference_metrics
from lit_align.ops.packing import SequenceBatch
from lit_align.ops.preference import sequence_logps


class ORPO(GenerateDuringEval, AlignModule):
    """ORPO on preference pairs (``PreferenceDataModule``)."""

    default_lr = 1e-6
    # TRL's ORPOTrainer.tokenize_row puts the tokenizer's BOS token before every prompt that does not
    # start with it (add_bos_token_if_needed); PreferenceDataModule(add_bos_to_prompt=None) follows this.
    add_bos_to_prompt: ClassVar[bool] = True

    def __init__(self, *args: Any, beta: float = 0.1, **kwargs: Any) -> None:
        """
        Args:
            beta: The paper's lambda, the weight of the odds-ratio term.
        """
        super().__init__(*args, **kwargs)
        self.beta = beta

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        e = batch.num_examples
        chosen_tokens = (batch.sequence_ids >= 0) & (batch.sequence_ids < e)  # (R, T) whole chosen sequences
        policy = sequence_logps(self.model, batch, with_extras=True, nll_mask=chosen_tokens, chunk_size=self.chunk_size)
        # the token mean over every device's chosen sequences (one process and N step alike), not this device's
        nll = self.global_token_mean(-policy.nll_logps.sum(), self.global_sum(policy.nll_lengths.sum()))
        loss, metrics = orpo_loss(
            policy.logps[:e], policy.logps[e:], policy.lengths[:e], policy.lengths[e:], nll, beta=self.beta
        )
        self.log_metrics(preference_metrics(self, policy, batch, stage, {"loss": loss, **metrics}), stage, e)
        return loss
