"""Classification heads on the backbone's hidden states, only where they are needed.

A reward model scores the last token of each sequence; a PRM classifies the tokens that
close a step. Reading positions from ``sequence_ids`` (instead of the pad token, as
transformers' classifiers do) makes both work on packed and padding-free batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_align.ops.forward import decoder_hidden
from lit_align.ops.packing import SequenceBatch


def last_token_positions(batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """Row and column of the last token of every sequence, ``(S,)`` each."""
    rows, width = batch.sequence_ids.shape
    flat = batch.sequence_ids.reshape(-1)  # (R*T,)
    real = flat >= 0
    index = torch.arange(flat.numel(), device=flat.device)[real]
    last = torch.full((batch.num_sequences,), -1, device=flat.device, dtype=torch.long)
    last = last.scatter_reduce(0, flat[real], index, reduce="amax")  # (S,) flat index of each last token
    return last // width, last % width


def sequence_scores(model: nn.Module, batch: SequenceBatch) -> Tensor:
    """The ``score`` head on each sequence's last token: ``(S, num_labels)``."""
    hidden = decoder_hidden(model, batch)  # (R, T, H)
    rows, cols = last_token_positions(batch)
    return model.score(hidden[rows, cols])  # (S, num_labels)


def labelled_token_scores(model: nn.Module, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
    """The ``score`` head on the tokens that carry a step label.

    Returns logits ``(n, num_labels)``, labels ``(n,)`` and each token's sequence index ``(n,)``,
    in row-major order (a sequence's steps in order).
    """
    hidden = decoder_hidden(model, batch)  # (R, T, H)
    where = batch.step_labels != -100  # (R, T)
    return model.score(hidden[where]), batch.step_labels[where], batch.sequence_ids[where]


def mean_pooled(model: nn.Module, batch: SequenceBatch, token_mask: Tensor) -> Tensor:
    """Mean of the final hidden states over the tokens of ``token_mask`` ``(R, T)``, per sequence:
    ``(S, H)`` (BCO's prompt embeddings for its density-ratio classifier)."""
    hidden = decoder_hidden(model, batch)  # (R, T, H)
    where = token_mask & (batch.sequence_ids >= 0)
    seq = batch.sequence_ids[where]
    sums = hidden.new_zeros(batch.num_sequences, hidden.shape[-1]).index_add(0, seq, hidden[where])
    counts = torch.bincount(seq, minlength=batch.num_sequences).clamp(min=1)
    return sums / counts[:, None].to(sums.dtype)
