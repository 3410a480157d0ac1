"""Contrastive Preference Optimization, with SimPO and AlphaPO (TRL ``trl.experimental.cpo``, docs/methods.md §8).

Reference-free: ``mean_i L(beta * (r_c - r_r)) + cpo_alpha * NLL(chosen)``, ``r`` the summed
completion log-probs (per-token averages for ``ipo``/``simpo``), shaped by AlphaPO's ``alpha``.
SimPO is ``loss_type="simpo"`` with ``cpo_alpha=0``; ``alphapo`` is SimPO with ``alpha``.
As TRL's, every prompt starts with the tokenizer's BOS token when it has one (``add_bos_to_prompt``:
``PreferenceDataModule`` adds it where the tokenizer or the chat template did not).
Departures from TRL: ``logits/*`` average the logits of completion tokens, as DPO's do (TRL's
CPO averages every position of the padded batch, padding included); conversational rows are
tokenized as DPO's, so they do not get the second EOS that TRL's legacy CPO pipeline appends
after the chat template's closing newline.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from torch import Tensor

from lit_align.losses.odds import CPOLossConfig, CPOLossType, cpo_loss
from lit_align.methods.base import AlignModule
from lit_align.methods.eval_samples import GenerateDuringEval
from lit_align.methods.metrics import preference_metrics
from lit_align.ops.packing import SequenceBatch
from lit_align.ops.preference import sequence_logps


class CPO(GenerateDuringEval, AlignModule):
    """CPO / SimPO / AlphaPO on preference pairs (``PreferenceDataModule``)."""

    default_lr = 1e-6
    # TRL's CPOTrainer.tokenize_row puts the tokenizer's BOS token before every prompt that does not
    # start with it (add_bos_token_if_needed); PreferenceDataModule(add_bos_to_prompt=None) follows this.
    add_bos_to_prompt: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: CPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            beta: Temperature of the preference term.
            loss_type: ``sigmoid`` (CPO), ``hinge``, ``ipo``, ``simpo`` or ``alphapo`` (SimPO with ``alpha``).
            label_smoothing: Conservative label noise for ``sigmoid``/``simpo``.
            cpo_alpha: Weight of the NLL on the chosen completions (set 0 for pure SimPO; ``alphapo`` forces 0).
            simpo_gamma: SimPO's target reward margin.
            alpha: AlphaPO's reward shape ``(1 - p^-alpha) / alpha`` (0: log-probs as they are).
        """
        super().__init__(*args, **kwargs)
        self.loss_config = CPOLossConfig(loss_type, beta, label_smoothing, simpo_gamma, cpo_alpha, alpha)  # checked here, once
        if loss_type in ("hinge", "ipo") and label_smoothing > 0:
            warnings.warn(f"label_smoothing has no effect with loss_type={loss_type!r}", stacklevel=2)
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.cpo_alpha = cpo_alpha
        self.simpo_gamma = simpo_gamma
        self.alpha = alpha

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        policy = sequence_logps(self.model, batch, with_extras=True, chunk_size=self.chunk_size)
        e = batch.num_examples
        chosen_nll = None
        if self.loss_config.cpo_alpha != 0:  # the token mean over every device's chosen completions, not this device's
            chosen_nll = self.global_token_mean(-policy.logps[:e].sum(), self.global_sum(policy.lengths[:e].sum()))
        loss, metrics = cpo_loss(policy.logps[:e], policy.logps[e:], policy.lengths[:e], policy.lengths[e:],
                                 cfg=self.loss_config, chosen_nll=chosen_nll)
        self.log_metrics(preference_metrics(self, policy, batch, stage, {"loss": loss, **metrics}), stage, e)
        return loss
