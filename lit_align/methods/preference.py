"""Metrics every preference method logs the same way (DPO, CPO, ORPO)."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_align.methods.base import AlignModule
from lit_align.ops.packing import SequenceBatch
from lit_align.ops.preference import SequenceLogps


def preference_metrics(
    module: AlignModule, policy: SequenceLogps, batch: SequenceBatch, stage: str, loss_metrics: dict[str, Tensor]
) -> dict[str, Tensor | float]:
    """The loss's per-pair metrics averaged over devices (equal batch sizes: TRL's gather-then-mean),
    plus the token metrics, weighted by tokens over devices:

    ``logits/chosen``, ``logits/rejected`` (mean logit per completion token), ``mean_token_accuracy``
    (chosen tokens), ``entropy`` (all completion tokens), ``num_tokens`` (cumulative in training).
    """
    e = batch.num_examples
    names = list(loss_metrics)
    means = module.global_sum(torch.stack([loss_metrics[n].detach().float() for n in names])) / module.world_size
    sums = torch.stack(
        [
            policy.logits[:e].sum(),
            policy.lengths[:e].sum(),
            policy.logits[e:].sum(),
            policy.lengths[e:].sum(),
            policy.correct[:e].sum(),
            policy.entropy.sum(),
            policy.lengths.sum(),
            torch.tensor(float(batch.num_tokens), device=policy.lengths.device),
        ]
    )
    logit_c, n_c, logit_r, n_r, correct, entropy, n, tokens = module.global_sum(sums)
    return {
        **dict(zip(names, means)),
        "logits/chosen": logit_c / n_c.clamp(min=1),
        "logits/rejected": logit_r / n_r.clamp(min=1),
        "mean_token_accuracy": correct / n_c.clamp(min=1),
        "entropy": entropy / n.clamp(min=1),
        "num_tokens": module.count_tokens(tokens, stage),
    }
