"""The one forward that DPO, CPO and ORPO share: per-sequence log-probs of ``[chosen; rejected]``.

A preference batch holds ``2E`` sequences (``s < E`` chosen, ``s >= E`` rejected; any
layout). One decoder pass runs over all of them, the LM head only over completion tokens,
and the per-token results are summed per sequence with ``index_add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_align.ops.forward import sequence_sum, target_logprobs, target_mask
from lit_align.ops.logprobs import TokenStats
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
    wpo_weight: Tensor | None = None  # (E,) WPO pair weights w_c * w_r (detached), when asked
    nll_logps: Tensor | None = None  # summed log-probs over the ``nll_mask`` targets, differentiable
    nll_lengths: Tensor | None = None  # number of ``nll_mask`` targets per sequence


def positions_in_sequence(sequence_index: Tensor, num_sequences: int) -> Tensor:
    """1-based rank ``(n,)`` of each target among its sequence's targets, in the given order."""
    order = torch.argsort(sequence_index, stable=True)  # (n,) groups each sequence, keeping its order
    counts = torch.bincount(sequence_index, minlength=num_sequences)  # (S,)
    starts = torch.cumsum(counts, 0) - counts  # (S,) first slot of each sequence in `order`
    ranks = torch.arange(sequence_index.numel(), device=sequence_index.device) - starts[sequence_index[order]]
    return torch.empty_like(ranks).scatter_(0, order, ranks) + 1


def ld_weights(sequence_index: Tensor, num_sequences: int, ld_alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024) per-target weights ``(n,)``: 1 up to the pair's shared length, ``ld_alpha`` after.

    The shared length of pair ``i`` is ``min(len_c, len_r)`` in target tokens; TRL computes
    ``logps = sum_{pos<=shared} lp + ld_alpha * sum_{pos>shared} lp`` for policy and reference alike,
    so the weighted log-prob is ``sequence_sum(w * lp)``.
    """
    lengths = torch.bincount(sequence_index, minlength=num_sequences)  # (2E,)
    num_pairs = num_sequences // 2
    shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)  # (2E,)
    inside = positions_in_sequence(sequence_index, num_sequences) <= shared[sequence_index]  # (n,)
    one = torch.ones((), dtype=torch.get_default_dtype(), device=sequence_index.device)
    return torch.where(inside, one, one * ld_alpha)


def wpo_weights(
    token_logps: Tensor, token_log_sum_sq_probs: Tensor, sequence_index: Tensor, num_sequences: int
) -> Tensor:
    """WPO pair weights ``(E,)`` = w_c * w_r, no grad (Zhou et al. 2024, Eq. 2, TRL's variant).

    ``w_s = exp(mean_t [log p(y_t) - log sum_v p_v^2])`` over the targets of sequence ``s``: the
    sequence's length-normalised probability relative to the policy's own (greedy-like) sampling,
    from the unweighted per-token ``token_logps`` and ``token_log_sum_sq_probs`` ``(n,)``.
    """
    with torch.no_grad():
        aligned = token_logps - token_log_sum_sq_probs  # (n,)
        sums = aligned.new_zeros(num_sequences).index_add(0, sequence_index, aligned)  # (2E,)
        lengths = torch.bincount(sequence_index, minlength=num_sequences).clamp_min(1)  # (2E,)
        weights = torch.exp(sums / lengths)  # (2E,)
        num_pairs = num_sequences // 2
        return weights[:num_pairs] * weights[num_pairs:]


def sequence_logps(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    ld_alpha: float | None = None,
    with_extras: bool = False,
    wpo: bool = False,
    nll_mask: Tensor | None = None,
    chunk_size: int = 1024,
) -> SequenceLogps:
    """Completion log-probs of every sequence of ``batch`` in one forward.

    ``with_extras``: also the mean logits; ``wpo``: also WPO's pair weights; ``ld_alpha``:
    LD-DPO weighted sums; ``nll_mask`` ``(R, T)``: more target tokens (ORPO's NLL covers the
    prompt too), summed separately into ``nll_logps``/``nll_lengths``.
    """
    completion = batch.completion_mask
    mask = target_mask(batch, completion if nll_mask is None else completion | nll_mask)  # (R, T-1)
    stats, seq = target_logprobs(model, batch, mask, chunk_size=chunk_size, with_extras=with_extras or wpo)
    s = batch.num_sequences
    nll_sums = None
    if nll_mask is not None:  # targets beyond the completions: sum them apart, then keep completions only
        nll_sums = (
            sequence_sum(stats.logps * nll_mask[:, 1:][mask], seq, s),
            sequence_sum(nll_mask[:, 1:][mask].float(), seq, s),
        )
        keep = completion[:, 1:][mask]  # (n,)
        stats = TokenStats(*(t[keep] if t is not None else None for t in vars(stats).values()))
        seq = seq[keep]
    lengths = sequence_sum(torch.ones_like(stats.logps.detach()), seq, s)
    plain = sequence_sum(stats.logps, seq, s)
    weighted = None
    if ld_alpha is not None:
        weighted = sequence_sum(stats.logps * ld_weights(seq, s, ld_alpha).to(stats.logps.dtype), seq, s)
    return SequenceLogps(
        logps=plain if weighted is None else weighted,
        plain_logps=plain,
        lengths=lengths,
        entropy=sequence_sum(stats.entropy, seq, s),
        correct=sequence_sum(stats.correct.float(), seq, s),
        logits=sequence_sum(stats.mean_logit, seq, s) if with_extras else None,
        wpo_weight=wpo_weights(stats.logps, stats.log_sum_sq_probs, seq, s) if wpo else None,
        nll_logps=nll_sums[0] if nll_sums else None,
        nll_lengths=nll_sums[1] if nll_sums else None,
    )
