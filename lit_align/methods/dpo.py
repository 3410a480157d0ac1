"""Direct Preference Optimization and its variants (TRL ``DPOTrainer``, docs/methods.md §3).

One forward over ``[chosen; rejected]`` (any layout: padded, packed or padding-free, which
TRL turns off for DPO), the reference log-probs from :class:`ReferenceModule`, and the loss
from ``lit_align.losses.dpo``: every TRL ``loss_type``, alone or as a weighted list.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_align.losses.dpo import DPOLossConfig, DPOLossType, FDivergence, PairLogps, dpo_loss
from lit_align.methods.metrics import preference_metrics
from lit_align.methods.reference import ReferenceModule
from lit_align.ops.packing import SequenceBatch
from lit_align.ops.preference import SequenceLogps, sequence_logps


class DPO(ReferenceModule):
    """DPO on preference pairs (``PreferenceDataModule``)."""

    default_lr = 1e-6

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: DPOLossType | list[DPOLossType] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        f_divergence_type: FDivergence = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        discopop_tau: float = 0.05,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            beta: Strength of the KL constraint to the reference (tau for IPO).
            loss_type: One of TRL's 15 loss types, or a list combined with ``loss_weights``
                (RPO is ``[sigmoid, sft]``, MPO ``[sigmoid, bco_pair, sft]``).
            loss_weights: One weight per loss type (default all 1).
            label_smoothing: Label noise for ``robust`` and ``aot``/``aot_unpaired``, epsilon of ``exo_pair``
                (``sigmoid`` ignores it, as in TRL 1.16).
            f_divergence_type: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence`` or ``alpha_divergence``.
            f_alpha_divergence_coef: Alpha of ``alpha_divergence``.
            ld_alpha: LD-DPO: weight of the completion tokens beyond the shorter completion's length.
            use_weighting: WPO: weight each pair by the policy's probability of its completions.
            discopop_tau: Temperature of the ``discopop`` loss.
        """
        super().__init__(*args, **kwargs)
        self.loss_config = DPOLossConfig(  # checked here, once
            loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau, use_weighting=use_weighting, ld_alpha=ld_alpha,
        )
        self.beta = beta
        self.loss_type = loss_type
        self.ld_alpha = ld_alpha  # LD-DPO and WPO act on the log-probs, before the loss
        self.use_weighting = use_weighting

    def sequence_logps(self, model: torch.nn.Module, batch: SequenceBatch, with_extras: bool = False) -> SequenceLogps:
        wpo = self.use_weighting and with_extras  # the policy's pass only; the reference needs no weights
        return sequence_logps(
            model, batch, ld_alpha=self.ld_alpha, with_extras=with_extras, wpo=wpo, chunk_size=self.chunk_size
        )

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        policy = self.sequence_logps(self.model, batch, with_extras=True)
        ref = self.reference_sequence_logps(batch)
        e = batch.num_examples
        chosen, rejected = slice(0, e), slice(e, 2 * e)
        pairs = PairLogps(
            chosen=policy.logps[chosen],
            rejected=policy.logps[rejected],
            ref_chosen=ref[chosen],
            ref_rejected=ref[rejected],
            chosen_len=policy.lengths[chosen],
            rejected_len=policy.lengths[rejected],
            chosen_token_logps_mean=policy.plain_logps[chosen].sum() / policy.lengths[chosen].sum().clamp(min=1),
            wpo_weight=policy.wpo_weight,
        )
        loss, metrics = dpo_loss(pairs, self.loss_config)
        self.log_metrics(preference_metrics(self, policy, batch, stage, {"loss": loss, **metrics}), stage, e)
        return loss
