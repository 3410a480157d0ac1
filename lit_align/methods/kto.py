"""Kahneman-Tversky Optimization (TRL ``KTOTrainer``, docs/methods.md §4).

Unpaired feedback: each completion is desirable or not. With ``r = log pi(y|x) - log pi_ref(y|x)``
and ``z`` the batch estimate of KL(pi || pi_ref) from mismatched pairs (prompt ``x_i`` with
completion ``y_{i-1}``; averaged over devices, clamped at 0, detached):
``L_d = 1 - sigmoid(beta (r - z))``, ``L_u = 1 - sigmoid(beta (z - r))`` (``kto``), or
``apo_zero_unpaired`` without ``z``. One forward covers the rows and their KL pairs; the KL
pairs carry no gradient.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.losses.kto import (
    KTOLossConfig,
    KTOLossType,
    check_kto_weights,
    clamp_kl,
    kl_estimate,
    kto_loss,
)
from lit_align.methods.metrics import check_unpaired_labels, unpaired_metrics
from lit_align.methods.reference import ReferenceModule
from lit_align.ops.packing import SequenceBatch


class KTO(ReferenceModule):
    """KTO on unpaired feedback (``UnpairedPreferenceDataModule``; preference pairs are unpaired)."""

    default_lr = 1e-6

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: KTOLossType = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            beta: Strength of the KL constraint to the reference.
            loss_type: ``kto`` or ``apo_zero_unpaired`` (no KL term).
            desirable_weight: Weight of the desirable rows' losses.
            undesirable_weight: Weight of the undesirable rows' losses. Eq. 8 of the paper asks
                ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in [1, 4/3];
                a warning says so at the start of training, as TRL's.
        """
        super().__init__(*args, **kwargs)
        self.loss_config = KTOLossConfig(loss_type, beta, desirable_weight, undesirable_weight)  # checked here, once
        self.beta = beta
        self.loss_type = loss_type
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    @property
    def needs_kl_pairs(self) -> bool:
        return self.loss_config.needs_kl

    def data_requirements(self) -> DataRequirements:
        return replace(super().data_requirements(), kl_pairs=self.needs_kl_pairs)  # the data adds the mismatched pairs

    def on_fit_start(self) -> None:
        check_unpaired_labels(self.trainer.datamodule, type(self).__name__)
        labels = self.trainer.datamodule.datasets["train"]["label"]
        message = check_kto_weights(sum(labels), len(labels) - sum(labels), self.desirable_weight, self.undesirable_weight)
        if message:
            warnings.warn(message, stacklevel=2)
        super().on_fit_start()

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        e = batch.num_examples
        if self.needs_kl_pairs and batch.num_sequences != 2 * e:
            raise ValueError("loss_type='kto' needs the KL pairs: use UnpairedPreferenceDataModule (kl_pairs=None or True)")
        policy = self.sequence_logps(self.model, batch, with_extras=True)
        ref = self.reference_sequence_logps(batch)
        kl = None
        if self.needs_kl_pairs:  # z: mean over devices of each device's batch mean, clamped, no gradient
            kl = clamp_kl(self.global_sum(kl_estimate(policy.logps[e:].detach(), ref[e:])) / self.world_size)
        loss, sums = kto_loss(policy.logps[:e], ref[:e], batch.labels, kl, cfg=self.loss_config)
        metrics = unpaired_metrics(self, policy, batch, sums, loss, stage)
        metrics["kl"] = sums["kl"]
        self.log_metrics(metrics, stage, e)
        return loss
