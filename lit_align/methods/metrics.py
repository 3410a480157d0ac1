"""Metrics the methods of one data family log the same way: paired preferences (DPO, CPO, ORPO:
``preference_metrics``), unpaired feedback (KTO, BCO: ``unpaired_metrics``, with the check that
both kinds of rows are present), and the online methods' generation-time metrics (TRL's
``reward*``, ``rewards/<name>/*`` and ``completions/*``, from the global batch's values)."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_align.losses.advantages import nanstd
from lit_align.losses.kto import UNPAIRED_SUM_KEYS, unpaired_metric_values
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


def check_unpaired_labels(datamodule, owner: str) -> None:
    """Both kinds of feedback must be present: a reward shift cannot be learned from one class."""
    if datamodule is None or "train" not in getattr(datamodule, "datasets", {}):
        return
    labels = datamodule.datasets["train"]["label"]
    if all(labels) or not any(labels):
        kind = "desirable" if labels and labels[0] else "undesirable"
        raise ValueError(
            f"{owner} needs both desirable and undesirable rows, but every one of the {len(labels)} training "
            f"rows of {datamodule.dataset_name_or_path} is {kind} (column 'label' is all {bool(labels and labels[0])})"
        )


def unpaired_metrics(module, policy: SequenceLogps, batch: SequenceBatch, sums, loss, stage) -> dict[str, Tensor | float]:
    """TRL's unpaired metrics from sums and counts over devices: ``rewards/*``, ``logps/*``,
    ``logits/chosen|rejected`` (mean logit per completion token of each class), ``entropy``,
    ``num_tokens``, and the loss averaged over devices."""
    e = batch.num_examples
    desirable = batch.labels.to(policy.logits.device)
    token_sums = torch.stack(
        [
            policy.logits[:e][desirable].sum(),
            policy.lengths[:e][desirable].sum(),
            policy.logits[:e][~desirable].sum(),
            policy.lengths[:e][~desirable].sum(),
            policy.entropy[:e].sum(),
            policy.lengths[:e].sum(),
            ((batch.sequence_ids >= 0) & (batch.sequence_ids < e)).sum().float(),  # the rows' tokens, not the KL pairs
            loss.detach() / module.world_size,
        ]
    )
    totals = module.global_sum(torch.cat([torch.stack([sums[k] for k in UNPAIRED_SUM_KEYS]), token_sums]))
    values = unpaired_metric_values(dict(zip(UNPAIRED_SUM_KEYS, totals[: len(UNPAIRED_SUM_KEYS)])))
    logit_c, n_c, logit_r, n_r, entropy, n, tokens, loss_mean = totals[len(UNPAIRED_SUM_KEYS) :]
    if n_c > 0:
        values["logits/chosen"] = logit_c / n_c
    if n_r > 0:
        values["logits/rejected"] = logit_r / n_r
    return {
        "loss": loss_mean,
        **values,
        "entropy": entropy / n.clamp(min=1),
        "num_tokens": module.count_tokens(tokens, stage),
    }


def reward_metrics(names: list[str], rewards: Tensor, weighted: Tensor, zero_std: Tensor | None) -> dict[str, float]:
    """``rewards/<name>/mean|std`` of the ``(N, K)`` rewards (one column per name), ``reward`` and
    ``reward_std`` of the ``(N,)`` weighted reward, ``frac_reward_zero_std`` of the groups' flags."""
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(rewards[:, k]).item()
        out[f"rewards/{name}/std"] = nanstd(rewards[:, k]).item()
    out["reward"] = torch.nanmean(weighted).item()
    out["reward_std"] = nanstd(weighted).item()
    if zero_std is not None:
        out["frac_reward_zero_std"] = zero_std.float().mean().item()
    return out


def completion_metrics(lengths: Tensor, truncated: Tensor) -> dict[str, float]:
    """``completions/*`` of the ``(N,)`` completion lengths and truncation flags."""
    done = lengths[truncated == 0]
    out = {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
    }
    for stat, fn in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
        out[f"completions/{stat}_terminated_length"] = fn(done).item() if done.numel() else 0.0
    return out
