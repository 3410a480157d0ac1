"""Supervised fine-tuning (TRL ``SFTTrainer``, docs/methods.md §2).

loss = sum over target tokens of -log p(y_t) (``nll``) or -sg(p) log p (``dft``), divided by
the number of target tokens over all devices. Targets are the completion tokens of
prompt-completion data (``completion_only_loss``), the assistant tokens of conversations
(``assistant_only_loss``), or every token of plain text.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.losses.sft import SFT_LOSSES, SFTLossType, sft_loss_sum
from lit_align.methods.base import AlignModule
from lit_align.ops.forward import target_logprobs, target_mask
from lit_align.ops.packing import SequenceBatch


class SFT(AlignModule):
    """Supervised fine-tuning on language-modeling or prompt-completion data."""

    default_lr = 2e-5
    disable_dropout_default = False

    def __init__(
        self,
        *args: Any,
        loss_type: SFTLossType = "nll",
        completion_only_loss: bool | None = None,
        assistant_only_loss: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            loss_type: ``nll`` (negative log-likelihood) or ``dft`` (each token's loss weighted by
                its probability, Dynamic Fine-Tuning).
            completion_only_loss: Train on completion tokens only (prompt-completion data). None: yes
                when the data has a prompt, as TRL.
            assistant_only_loss: Train on assistant turns only (conversational data): where the chat
                template marks them with ``{% generation %}``, those tokens; otherwise the data finds each
                assistant turn by rendering the conversation turn by turn (a warning says which).
        """
        super().__init__(*args, **kwargs)
        if loss_type not in SFT_LOSSES:
            raise ValueError(f"unknown SFT loss_type {loss_type!r}: expected one of {sorted(SFT_LOSSES)}")
        self.loss_type = loss_type
        self.completion_only_loss = completion_only_loss
        self.assistant_only_loss = assistant_only_loss

    def data_requirements(self) -> DataRequirements:
        return replace(super().data_requirements(), assistant_masks=self.assistant_only_loss)

    def token_mask(self, batch: SequenceBatch) -> Tensor:
        """Tokens trained on, ``(R, T)`` bool."""
        mask = batch.sequence_ids >= 0
        if self.completion_only_loss is not False:
            mask = mask & batch.completion_mask
        if self.assistant_only_loss:
            if batch.assistant_mask is None:
                raise ValueError(
                    "assistant_only_loss=True needs conversational data ('messages', or prompt and completion "
                    "as message lists) prepared for this module; this batch has no assistant mask"
                )
            mask = mask & batch.assistant_mask
        return mask

    def shared_step(self, batch: SequenceBatch, stage: str) -> Tensor:
        mask = target_mask(batch, self.token_mask(batch))  # (R, T-1)
        stats, _ = target_logprobs(self.model, batch, mask, chunk_size=self.chunk_size)
        loss_sum = sft_loss_sum(stats.logps, self.loss_type)
        local = torch.stack(
            [
                loss_sum.detach(),
                stats.entropy.sum(),
                stats.correct.sum().float(),
                mask.sum().float(),
                torch.tensor(float(batch.num_tokens), device=mask.device),
            ]
        )
        total_loss, total_entropy, total_correct, n_targets, n_tokens = self.global_sum(local)
        n = n_targets.clamp(min=1)
        loss = self.global_token_mean(loss_sum, n_targets)
        metrics = {
            "loss": total_loss / n,
            "entropy": total_entropy / n,
            "mean_token_accuracy": total_correct / n,
            "num_tokens": self.count_tokens(n_tokens, stage),
        }
        self.log_metrics(metrics, stage, batch_size=batch.num_examples)
        return loss
