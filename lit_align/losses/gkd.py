"""The GKD loss on full logits (TRL ``GKDTrainer.generalized_jsd_loss``, docs/methods.md §11).

The readable definition, for small inputs and as the reference of the chunked op
:func:`lit_align.ops.distill.chunked_generalized_jsd` (which the GKD module uses: it never builds
the ``[B, T, V]`` fp32 distributions). Eq. 1 of Agarwal et al. 2024, with TRL's choice of the two
ends: ``beta = 0`` is the forward KL(teacher || student), ``beta = 1`` the reverse KL(student || teacher).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_align.ops.distill import divergence_kind

IGNORE_INDEX = -100


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Per-position divergence ``(...)`` of logits ``(..., V)``, log-softmaxed in fp32 after ``/ temperature``."""
    kind = divergence_kind(beta)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student logits have {student_logits.shape[-1]} classes and teacher logits "
            f"{teacher_logits.shape[-1]}: distillation needs a shared vocabulary"
        )
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    s = torch.log_softmax(student_logits.to(acc) / temperature, dim=-1)  # (..., V) S
    u = torch.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)  # (..., V) U
    if kind == "forward_kl":
        return (u.exp() * (u - s)).sum(-1)  # KL(teacher || student)
    if kind == "reverse_kl":
        return (s.exp() * (s - u)).sum(-1)  # KL(student || teacher)
    m = torch.logaddexp(s + math.log1p(-beta), u + math.log(beta))  # log((1-beta) p_s + beta p_t)
    return beta * (u.exp() * (u - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)  # Eq. 1


def gkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's ``batchmean`` over trained positions: ``sum(jsd[labels != -100]) / max(#valid, 1)``.

    ``student_logits``/``teacher_logits`` ``(B, T, V)`` are already shifted to line up with
    ``labels`` ``(B, T)`` (logits at ``t`` predict label ``t``).
    """
    jsd = generalized_jsd(student_logits, teacher_logits, beta, temperature)  # (B, T)
    valid = labels != IGNORE_INDEX  # (B, T)
    loss = jsd[valid].sum() / valid.sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "num_targets": valid.sum().detach()}
