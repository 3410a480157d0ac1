"""The one forward that DPO, CPO and ORPO share: per-sequence log-probs of ``[chosen; rejected]``.

A preference batch holds ``2E`` sequences (``s < E`` chosen, ``s >= E`` rejected; any
layout). One decoder pass runs over all of them, the LM head only over completion tokens,
and the per-token results are summed per sequence with ``index_add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_align.ops.forward import target_logprobs, target_mask
from lit_align.ops.packing import SequenceBatch


@dataclass
class SequenceLogps:
    """Per-sequence sums over completion tokens, ``(S,)`` each (``S = 2E`` for pairs)."""

    logps: Tensor  # summed log-probs, differentiable (LD-DPO weighted when asked)
    plain_logps: Tensor  # summed log-probs without LD-DPO weighting, differentiable
    lengths: Tensor  # completion tokens per sequence (float)
    entropy: Tensor  # summed token entropies (detached)
    correct: Tensor  # top-1 hits (detached)
    logits: Tensor | None = None  # summed per-token mean logits (detached)
    wpo_logps: Tensor | None = None  # summed log p - log sum p^2 (detached; WPO weights)


def positions_in_sequence(sequence_index: Tensor, num_sequences: int) -> Tensor:
    """1-based position of each target within its sequence's completion, ``(n,)``.

    Targets of one sequence are contiguous in row-major order, whatever the layout.
    """
    n = sequence_index.numel()
    order = torch.arange(n, device=sequence_index.device)
    first = torch.full((num_sequences,), n, device=sequence_index.device, dtype=torch.long)
    first = first.scatter_reduce(0, sequence_index, order, reduce="amin")  # (S,) first target of each sequence
    return order - first[sequence_index] + 1


def ld_token_weights(sequence_index: Tensor, lengths: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024): weight 1 on the first ``min(len_c, len_r)`` completion tokens of
    each sequence of a pair and ``ld_alpha`` on the tail beyond it, ``(n,)``."""
    pairs = lengths.numel() // 2
    shared = torch.minimum(lengths[:pairs], lengths[pairs:]).repeat(2)  # (S,) shared length of the pair
    pos = positions_in_sequence(sequence_index, lengths.numel())  # (n,)
    weights = torch.ones(pos.shape, dtype=lengths.dtype, device=pos.device)
    return weights.masked_fill(pos > shared[sequence_index], ld_alpha)


def sequence_logps(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    ld_alpha: float | None = None,
    with_extras: bool = False,
    chunk_size: int = 1024,
) -> SequenceLogps:
    """Completion log-probs of every sequence of ``batch`` in one forward."""
    mask = target_mask(batch, batch.completion_mask)  # (R, T-1)
    stats, seq = target_logprobs(model, batch, mask, chunk_size=chunk_size, with_extras=with_extras)
    s = batch.num_sequences

    def total(values: Tensor) -> Tensor:
        return values.new_zeros(s).index_add(0, seq, values)

    lengths = total(torch.ones_like(stats.logps.detach()))
    token_logps = stats.logps * ld_token_weights(seq, lengths, ld_alpha) if ld_alpha is not None else None
    plain = total(stats.logps)
    return SequenceLogps(
        logps=total(token_logps) if ld_alpha is not None else plain,
        plain_logps=plain,
        lengths=lengths,
        entropy=total(stats.entropy),
        correct=total(stats.correct.float()),
        logits=total(stats.mean_logit) if with_extras else None,
        wpo_logps=total(stats.logps.detach() - stats.log_sum_sq_probs) if with_extras else None,
    )
