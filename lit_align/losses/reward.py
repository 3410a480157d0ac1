"""Reward-model losses: the outcome reward model's Bradley-Terry loss (TRL 1.16
``RewardTrainer.compute_loss``, docs/methods.md §5) and the process reward model's per-step
classification loss (TRL 0.29.1 ``trl.experimental.prm``, removed from TRL in 1.x; §13).

Bradley-Terry: with scalar rewards ``r_c``, ``r_r`` ``(E,)`` of the chosen and rejected sequence of
each pair (the ``num_labels=1`` head at the last attended token) and an optional per-pair margin
``m`` (Llama 2, Touvron et al. 2023, Eq. 2)::

    loss = mean_i -log sigma(r_c - r_r - m)  [+ c * mean_i (r_c + r_r)^2]      (Eisenstein et al. 2023)

The centring term is added whenever the coefficient is not None (0.0 adds 0). Under DDP each device
takes its own mean and the gradients are averaged.

PRM: a 2-class token classifier; each step's label (1 = good step) sits on the step's last token
(the separator) and every other position is -100. The loss is the mean cross-entropy (in fp32) over
labelled positions. TRL reaches it through transformers' ``ForTokenClassification`` loss, which
divides the summed CE by ``num_items_in_batch``: the labelled count over all micro-batches of the
optimizer step and all devices; :func:`prm_loss` returns the sum and count for that.

Departure from TRL: PRM's ``train_on_last_step_only`` is applied here to the labels as they reach
the loss (see :func:`prm_loss`); TRL applies it when tokenising the training split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# How to combine each Bradley-Terry metric across devices to get TRL's value: "mean" = average of
# the per-device values (all-reduce SUM / world size; TRL: gather_for_metrics(x).mean(), and for
# mean_reward the mean of all gathered rewards, the same since accelerate gives every device the
# same batch size), "min"/"max" = all-reduce MIN/MAX of the per-device values.
REWARD_METRIC_REDUCTIONS: dict[str, Literal["mean", "min", "max"]] = {
    "accuracy": "mean",
    "margin": "mean",
    "mean_reward": "mean",
    "min_reward": "min",
    "max_reward": "max",
}


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss on ``(E,)`` rewards (and ``(E,)`` margins), and TRL's metrics.

    Metrics (detached, this device; combine with :data:`REWARD_METRIC_REDUCTIONS`):
    ``accuracy`` = mean(r_c > r_r) (a tie counts as wrong), ``margin`` = mean(r_c - r_r) (the
    margin column is not subtracted), ``mean_reward``/``min_reward``/``max_reward`` over the ``2E``
    rewards of both sides.
    """
    diff = chosen_rewards - rejected_rewards  # (E,)
    if margin is not None:
        loss = -F.logsigmoid(diff - margin).mean()  # Touvron et al. 2023, Eq. 2
    else:
        loss = -F.logsigmoid(diff).mean()  # Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)

    with torch.no_grad():
        rewards = torch.cat((chosen_rewards, rejected_rewards)).detach()  # (2E,)
        metrics = {
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": diff.detach().mean(),
            "mean_reward": rewards.mean(),
            "min_reward": rewards.min(),
            "max_reward": rewards.max(),
        }
    return loss, metrics


# --- process reward model ---


def last_labelled(step_labels: Tensor, sequence_index: Tensor) -> Tensor:
    """Bool mask ``(n,)`` of the last labelled position (``!= -100``) of each sequence, for flat
    positions ``(n,)`` in sequence order and their non-negative sequence index ``(n,)``."""
    labelled = step_labels != -100  # (n,)
    if not labelled.any():
        return labelled
    position = torch.arange(step_labels.numel(), device=step_labels.device)  # (n,)
    seq = sequence_index.to(step_labels.device).long()
    last = torch.full((int(seq.max()) + 1,), -1, dtype=torch.long, device=step_labels.device)
    last = last.scatter_reduce(0, seq[labelled], position[labelled], reduce="amax")  # (S,)
    return labelled & (position == last[seq])


def prm_loss(
    logits: Tensor,
    step_labels: Tensor,
    sequence_index: Tensor | None = None,
    *,
    train_on_last_step_only: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean 2-class cross-entropy over the labelled steps, and the counts behind TRL's accuracy.

    ``logits`` ``(..., 2)`` and ``step_labels`` ``(...)`` in {0, 1, -100}, any leading shape: a
    padded batch ``(B, T, 2)``/``(B, T)``, a packed row ``(1, T, 2)``/``(1, T)``, or positions
    already gathered ``(n, 2)``/``(n,)``. ``sequence_index`` (same shape as ``step_labels``) says
    which sequence each position belongs to; it is needed only by ``train_on_last_step_only`` and
    defaults, for a 2-D ``step_labels``, to the row. ``train_on_last_step_only`` keeps the last
    labelled position of each sequence. TRL keeps the label of the *final step before truncation*
    (at tokenisation, train split only), so the two differ for a row whose last step was cut off
    (TRL: no label left; here: the last surviving step's).

    The loss is NaN when nothing is labelled (as ``cross_entropy``). Metrics (detached):
    ``loss_sum`` and ``total`` (the CE sum and labelled count: sum both over micro-batches and
    devices for TRL's normalisation), ``correct``, ``tp``, ``fp``, ``fn`` (argmax prediction, class
    1 positive; ties predict 0, as ``np.argmax``), and ``accuracy`` = correct / total here.
    """
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # (n, 2), fp32 as transformers
    labels = step_labels.reshape(-1).to(flat_logits.device)  # (n,)
    if train_on_last_step_only:
        if sequence_index is None:
            if step_labels.dim() != 2:
                raise ValueError("train_on_last_step_only needs sequence_index unless step_labels is (B, T)")
            sequence_index = torch.arange(step_labels.size(0), device=step_labels.device)[:, None].expand_as(
                step_labels
            )
        keep = last_labelled(labels, sequence_index.reshape(-1))
        labels = torch.where(keep, labels, torch.full_like(labels, -100))

    labelled = labels != -100  # (n,)
    losses = F.cross_entropy(flat_logits, labels, ignore_index=-100, reduction="none")  # (n,), 0 off labels
    loss_sum = losses.sum()
    num_steps = labelled.sum()
    loss = loss_sum / num_steps

    with torch.no_grad():
        pred = flat_logits.argmax(-1)[labelled]  # (k,)
        target = labels[labelled]
        count = num_steps.float()
        correct = (pred == target).sum().float()
        metrics = {
            "loss_sum": loss_sum.detach(),
            "total": count,
            "correct": correct,
            "tp": ((pred == 1) & (target == 1)).sum().float(),
            "fp": ((pred == 1) & (target == 0)).sum().float(),
            "fn": ((pred == 0) & (target == 1)).sum().float(),
            "accuracy": correct / count,
        }
    return loss, metrics


def prm_metric_values(sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``accuracy``, ``precision``, ``recall`` of the good-step class from :func:`prm_loss`'s counts
    summed over batches and devices (TRL 0.29.1 reports accuracy only, over the whole eval set);
    a ratio with a zero denominator is left out."""
    out: dict[str, Tensor] = {}
    for name, num, den in (
        ("accuracy", "correct", ("total",)),
        ("precision", "tp", ("tp", "fp")),
        ("recall", "tp", ("tp", "fn")),
    ):
        denominator = sum(sums[key] for key in den)
        if denominator > 0:
            out[name] = sums[num] / denominator
    return out
