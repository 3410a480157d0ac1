"""Outcome reward model (TRL ``RewardTrainer``, docs/methods.md §5).

A causal LM's backbone with a one-output ``score`` head, trained with the Bradley-Terry loss
``-log sigmoid(r_c - r_r - margin)`` (+ ``center_rewards_coefficient * mean((r_c + r_r)^2)``).
The reward of a sequence is the head on its last token, read from ``sequence_ids`` so packed
batches work. The export is an ``AutoModelForSequenceClassification`` directory that the
online methods load as a reward model (``lit_align.rewards.RewardModelScorer``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.losses.reward import REWARD_METRIC_REDUCTIONS, bradley_terry_loss
from lit_align.methods.base import AlignModule
from lit_align.models.heads import load_classifier
from lit_align.ops.heads import sequence_scores
from lit_align.ops.packing import SequenceBatch


class RewardModel(AlignModule):
    """A scalar reward model trained on preference pairs (``PreferenceDataModule``)."""

    default_lr = 1e-4
    peft_task_type = "SEQ_CLS"

    def __init__(self, *args: Any, center_rewards_coefficient: float | None = None, **kwargs: Any) -> None:
        """
        Args:
            center_rewards_coefficient: Weight of ``mean((r_c + r_r)^2)``, which keeps rewards centred
                on zero (Eisenstein et al. 2023); None: off. A per-pair ``margin`` column of the data
                is subtracted inside the sigmoid.
        """
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient

    def data_requirements(self) -> DataRequirements:
        # TRL's RewardTrainer drops the pairs longer than max_length rather than cutting them
        return replace(super().data_requirements(), drop_overlong=True)

    def load_model(self) -> torch.nn.Module:
        return load_classifier(self.model_name_or_path, "sequence", 1, self.dtype_name, self.attn_implementation, **self.model_init.kwargs)

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        rewards = sequence_scores(self.model, batch)[:, 0]  # (2E,)
        e = batch.num_examples
        loss, metrics = bradley_terry_loss(rewards[:e], rewards[e:], batch.margin, self.center_rewards_coefficient)
        self.log_metrics(self.global_pair_metrics(loss, metrics, batch, stage), stage, e)
        return loss

    def global_pair_metrics(self, loss, metrics, batch, stage) -> dict[str, Tensor | float]:
        """TRL's aggregation: per-device means averaged over devices, extremes over every device."""
        out: dict[str, Tensor | float] = {"loss": self.global_sum(loss.detach()) / self.world_size}
        for name, op in REWARD_METRIC_REDUCTIONS.items():
            value = self.global_reduce(metrics[name], "sum" if op == "mean" else op)
            out[name] = value / self.world_size if op == "mean" else value
        tokens = self.global_sum(torch.tensor(float(batch.num_tokens), device=loss.device))
        out["num_tokens"] = self.count_tokens(tokens, stage)
        return out

    def predict_step(self, batch: SequenceBatch, batch_idx: int) -> Tensor:
        """Rewards of every sequence of the batch, ``(S,)`` (for pairs: chosen first, then rejected)."""
        return sequence_scores(self.model, batch)[:, 0]
