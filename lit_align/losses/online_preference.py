"""Losses of the online preference methods (docs/methods.md §10, §15): pure functions of
per-sequence log-probs.

- OnlineDPO: the DPO ``sigmoid`` / ``ipo`` loss on the judged pair of two policy samples, with
  sequence *sums* (IPO unnormalised): :func:`lit_align.losses.dpo.dpo_loss` with unit lengths;
- NashMD (Munos et al. 2023): REINFORCE towards the Nash mixture, ``(P - 0.5) * log pi(y)`` with
  the 0.5 control variate, plus the KL to the reference as a REINFORCE term;
- XPO (Xie et al. 2024): DPO on the judged (policy, reference) pair plus ``alpha`` times the
  policy's log-prob of the reference sample (exploration).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_align.losses.dpo import DPOLossConfig, PairLogps, dpo_loss

OnlineLossType = Literal["sigmoid", "ipo"]
ONLINE_LOSS_TYPES = ("sigmoid", "ipo")


def check_online_loss_type(loss_type: str) -> None:
    if loss_type not in ONLINE_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {ONLINE_LOSS_TYPES}, got {loss_type!r}")


def pair_dpo_loss(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float, loss_type: OnlineLossType = "sigmoid"
) -> tuple[Tensor, dict[str, Tensor]]:
    """OnlineDPO's loss on summed log-probs ``(E,)``: the mean of ``-log sigma(b * logits)`` or
    ``(logits - 1/(2b))^2`` with ``logits = (c - r) - (ref_c - ref_r)``, and TRL's
    ``rewards/*``/``logps/*`` metrics."""
    check_online_loss_type(loss_type)
    ones = torch.ones_like(chosen)  # unit lengths: IPO on sums, as the online trainers use it
    return dpo_loss(PairLogps(chosen, rejected, ref_chosen, ref_rejected, ones, ones), DPOLossConfig(loss_type, beta=beta))


def nash_md_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, probability: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """NashMD on the policy's own samples ``(N, T)``: ``mean(beta * sum_t (lp - ref).detach() * lp - (P - 0.5) * sum_t lp)``.

    ``probability`` ``(N,)`` is the judged probability that the policy's sample beats the mixture's.
    Returns the loss, the per-sample REINFORCE score and the per-sample KL ``sum_t (lp - ref)`` (detached).
    """
    mask = mask.to(logps.dtype)
    lp = logps * mask
    score = (probability - 0.5) * lp.sum(1)
    log_ratio = ((logps - ref_logps) * mask).detach()
    kl_loss = (log_ratio * lp).sum(1)
    return (beta * kl_loss - score).mean(), score.detach(), log_ratio.sum(1)


def xpo_loss(
    model_logps: Tensor,
    model_ref_logps: Tensor,
    ref_sample_logps: Tensor,
    ref_sample_ref_logps: Tensor,
    model_wins: Tensor,
    beta: float,
    alpha: float,
    loss_type: OnlineLossType = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """XPO on summed log-probs ``(E,)`` of the policy's sample and the reference's sample.

    ``model_*``: the policy's sample under the policy / the reference; ``ref_sample_*``: the
    reference's sample under the policy / the reference; ``model_wins`` (bool): the policy's sample
    was judged better. Returns the loss, its DPO and exploration parts (``loss/dpo``, ``loss/xpo``)
    and the DPO metrics.
    """
    chosen = torch.where(model_wins, model_logps, ref_sample_logps)
    rejected = torch.where(model_wins, ref_sample_logps, model_logps)
    ref_chosen = torch.where(model_wins, model_ref_logps, ref_sample_ref_logps)
    ref_rejected = torch.where(model_wins, ref_sample_ref_logps, model_ref_logps)
    dpo, metrics = pair_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type)
    exploration = alpha * ref_sample_logps.mean()
    return dpo + exploration, dpo.detach(), exploration.detach(), metrics
