"""Process reward model (TRL's removed ``PRMTrainer``, docs/methods.md §13).

Token classification with two classes on the backbone: each step of a solution is followed by
``step_separator`` and its label (correct or not) sits on the step's last token. The loss is the
cross-entropy over labelled tokens only; the head runs only on those tokens. ``score_steps``
gives per-step scores for new solutions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryPrecision, BinaryRecall

from lit_align.losses.reward import prm_loss, prm_metric_values
from lit_align.methods.base import AlignModule
from lit_align.models.heads import load_classifier
from lit_align.ops.heads import labelled_token_scores
from lit_align.ops.packing import SequenceBatch


class PRM(AlignModule):
    """A step-level reward model trained on stepwise supervision (``StepwiseDataModule``)."""

    default_lr = 1e-5
    peft_task_type = "TOKEN_CLS"

    def __init__(self, *args: Any, train_on_last_step_only: bool = False, **kwargs: Any) -> None:
        """
        Args:
            train_on_last_step_only: Train on the label of each solution's last step only (an outcome
                label), as TRL's option of the same name; validation still scores every step.
        """
        super().__init__(*args, **kwargs)
        self.train_on_last_step_only = train_on_last_step_only
        # Held-out step metrics accumulate over the whole epoch (and devices) before the ratio.
        self.eval_metrics = MetricCollection(
            {"accuracy": BinaryAccuracy(), "precision": BinaryPrecision(), "recall": BinaryRecall()}
        )

    def load_model(self) -> torch.nn.Module:
        return load_classifier(self.model_name_or_path, "token", 2, self.dtype_name, self.attn_implementation, **self.model_init.kwargs)

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        logits, labels, sequence_index = labelled_token_scores(self.model, batch)
        last_only = self.train_on_last_step_only and stage == "train"
        mean_loss, counts = prm_loss(logits, labels, sequence_index, train_on_last_step_only=last_only)
        loss_sum = torch.nan_to_num(mean_loss) * counts["total"]  # differentiable CE sum (0 when unlabelled)
        names = ["loss_sum", "total", "correct", "tp", "fp", "fn"]
        totals = dict(zip(names, self.global_sum(torch.stack([counts[n] for n in names]))))
        # TRL's normalisation: the cross-entropy sum over the labelled steps of every device; scaled by
        # the world size because DDP averages gradients.
        loss = self.global_token_mean(loss_sum, totals["total"])
        metrics = {"loss": totals["loss_sum"] / totals["total"].clamp(min=1)}
        if stage == "train":
            metrics.update(prm_metric_values(totals))
        else:
            self.eval_metrics.update(logits.detach().argmax(-1), labels)
            self.log_dict({f"{stage}/{k}": m for k, m in self.eval_metrics.items()}, on_epoch=True)
        self.log_metrics(metrics, stage, batch.num_examples)
        return loss

    @torch.no_grad()
    def score_steps(self, batch: SequenceBatch) -> list[list[float]]:
        """Probability that each step is correct, per sequence (steps in order)."""
        logits, _, sequence_index = labelled_token_scores(self.model, batch)
        probs = logits.float().softmax(-1)[:, 1]
        return [probs[sequence_index == s].tolist() for s in range(batch.num_sequences)]

    def predict_step(self, batch: SequenceBatch, batch_idx: int) -> list[list[float]]:
        return self.score_steps(batch)
