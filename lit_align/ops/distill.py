"""The generalized Jensen-Shannon divergence between a student and a teacher, chunked, from hidden states.

Why this exists: knowledge distillation compares the student's and the teacher's *whole* next-token
distributions at every trained position. The obvious route (TRL ``GKDTrainer.compute_loss``) builds
both ``[B, T, V]`` logit tensors, their fp32 log-softmaxes and, for the mixture, a stacked
``[2, B, T, V]`` logsumexp, and autograd keeps several of them for backward. Only one number per
position is wanted, so this module streams over the ``n`` trained positions in chunks of
``chunk_size`` rows: each chunk's two ``[C, V]`` logit blocks are formed (student and teacher LM heads
on their own hidden states), reduced to the per-token divergence, and dropped. The backward (a custom
``torch.autograd.Function``) recomputes both blocks from the saved hidden states and head weights, so
peak memory is ``O(C * V)`` rather than ``O(n * V)``. Gradients flow to the student's hidden states,
head weight and bias only: the teacher is frozen.

Per position, with ``S = log_softmax(z_s / T)`` and ``U = log_softmax(z_t / T)`` (fp32), the divergence of
TRL's ``GKDTrainer.generalized_jsd_loss`` (Eq. 1 of Agarwal et al. 2024, "On-policy distillation of
language models"):

    beta == 0:  KL(teacher || student) = sum_v e^U (U - S)                        ("forward KL")
    beta == 1:  KL(student || teacher) = sum_v e^S (S - U)                        ("reverse KL")
    otherwise:  M = log((1 - beta) e^S + beta e^U)
                JSD_beta = beta KL(teacher || M) + (1 - beta) KL(student || M)

As in TRL the two ends are the plain KLs, not the limits of ``JSD_beta`` (which vanish there).
Gradients w.r.t. the student's scaled logits ``z = z_s / T``, with ``p = e^S`` and ``a = dD/dp``:

    forward KL:  dD/dz = p - e^U
    reverse KL:  a = S - U,                dD/dz = p * (a - sum_v p a)
    JSD_beta:    a = (1 - beta)(S - M),    dD/dz = p * (a - sum_v p a)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lit_align.ops.logprobs import _acc_dtype, _add_matmul, _autocast_inputs, _LogitTransform

__all__ = ["LMHead", "chunked_generalized_jsd", "divergence_kind"]


@dataclass(frozen=True)
class LMHead:
    """An LM head as the chunked ops read it: ``LMHead(**lm_head_params(model))``."""

    weight: Tensor  # (V, H)
    bias: Tensor | None = None  # (V,)
    logit_scale: float = 1.0
    softcap: float | None = None
    onednn: bool = False  # its products on oneDNN (the model's ``onednn_linear``; fp32 CPU inputs only)


def divergence_kind(beta: float) -> str:
    """``forward_kl`` (beta 0), ``reverse_kl`` (beta 1) or ``jsd`` (in between), as TRL branches."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    return "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"


def _mixture(s: Tensor, u: Tensor, beta: float) -> Tensor:
    """``M = log((1 - beta) e^S + beta e^U)``, ``(C, V)``."""
    return torch.logaddexp(s + math.log1p(-beta), u + math.log(beta))


def _forward_kl(s: Tensor, u: Tensor, beta: float) -> Tensor:
    return (u.exp() * (u - s)).sum(-1)  # (C,) sum_v e^U (U - S)


def _reverse_kl(s: Tensor, u: Tensor, beta: float) -> Tensor:
    return (s.exp() * (s - u)).sum(-1)  # (C,) sum_v e^S (S - U)


def _jsd(s: Tensor, u: Tensor, beta: float) -> Tensor:
    m = _mixture(s, u, beta)  # (C, V)
    return beta * (u.exp() * (u - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)  # (C,)


def _forward_kl_grad(s: Tensor, u: Tensor, beta: float) -> Tensor:
    return s.exp().sub_(u.exp())  # (C, V) p - e^U


def _softmax_chain(s: Tensor, a: Tensor) -> Tensor:
    """``p * (a - sum_v p a)``: a gradient w.r.t. ``p = e^S`` taken back through the softmax, in place on ``a``."""
    p = s.exp()  # (C, V)
    return a.sub_((p * a).sum(-1, keepdim=True)).mul_(p)  # (C, V)


def _reverse_kl_grad(s: Tensor, u: Tensor, beta: float) -> Tensor:
    return _softmax_chain(s, s - u)


def _jsd_grad(s: Tensor, u: Tensor, beta: float) -> Tensor:
    return _softmax_chain(s, (s - _mixture(s, u, beta)).mul_(1.0 - beta))


Divergence = Callable[[Tensor, Tensor, float], Tensor]
DIVERGENCES: dict[str, tuple[Divergence, Divergence]] = {
    "forward_kl": (_forward_kl, _forward_kl_grad),
    "reverse_kl": (_reverse_kl, _reverse_kl_grad),
    "jsd": (_jsd, _jsd_grad),
}


def _log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, tf: _LogitTransform) -> tuple[Tensor, Tensor | None]:
    """``log_softmax`` of one chunk's transformed logits ``(C, V)`` fp32, and the softcap's tanh (or None)."""
    z, tanh = tf.forward(tf.logits(hidden, weight, bias))  # (C, V) fp32
    return z.log_softmax(-1), tanh


class _GeneralizedJSDFn(torch.autograd.Function):
    """Chunked per-token ``D(student, teacher)`` with a backward that recomputes both logit blocks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        s_hidden: Tensor,  # (n, H)
        s_weight: Tensor,  # (V, H)
        s_bias: Tensor | None,  # (V,)
        t_hidden: Tensor,  # (n, H_t)
        t_weight: Tensor,  # (V, H_t)
        t_bias: Tensor | None,  # (V,)
        s_tf: _LogitTransform,
        t_tf: _LogitTransform,
        kind: str,
        beta: float,
        chunk_size: int,
    ) -> Tensor:
        divergence = DIVERGENCES[kind][0]
        n = s_hidden.shape[0]
        out = torch.empty(n, dtype=_acc_dtype(s_hidden.dtype), device=s_hidden.device)  # (n,)
        with torch.autocast(s_hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                s, _ = _log_probs(s_hidden[sl], s_weight, s_bias, s_tf)  # (C, V)
                u, _ = _log_probs(t_hidden[sl], t_weight, t_bias, t_tf)  # (C, V)
                out[sl] = divergence(s, u.to(s.dtype), beta)  # (C,)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)  # no [n, V] tensor
        ctx.settings = (s_tf, t_tf, kind, beta, chunk_size)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = ctx.saved_tensors
        s_tf, t_tf, kind, beta, chunk_size = ctx.settings
        gradient = DIVERGENCES[kind][1]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = _acc_dtype(s_weight.dtype)  # fp32 (fp64 for fp64 inputs)
        grad_hidden = torch.zeros_like(s_hidden) if need_hidden else None  # (n, H)
        grad_weight = torch.zeros_like(s_weight, dtype=acc) if need_weight else None  # (V, H) fp32
        grad_bias = torch.zeros_like(s_bias, dtype=acc) if need_bias else None  # (V,) fp32
        grad_out = grad_out.to(acc)  # (n,)
        with torch.autocast(s_hidden.device.type, enabled=False):
            for start in range(0, s_hidden.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                s, tanh = _log_probs(s_hidden[sl], s_weight, s_bias, s_tf)  # (C, V)
                u, _ = _log_probs(t_hidden[sl], t_weight, t_bias, t_tf)  # (C, V)
                dz = gradient(s, u.to(s.dtype), beta).mul_(grad_out[sl, None])  # (C, V) dL/dz
                dlogits = s_tf.backward(dz, tanh)  # (C, V) through temperature, softcap, logit_scale
                dlogits_in = dlogits.to(s_weight.dtype)  # (C, V) as autograd would feed the head's matmul
                if grad_hidden is not None:
                    grad_hidden[sl] = s_tf.hidden_grad(dlogits_in, s_weight)  # (C, H) dL/dh = dlogits @ W
                if grad_weight is not None:
                    _add_matmul(grad_weight, dlogits_in.t(), s_hidden[sl])  # (V, H) dL/dW += dlogits^T @ h
                if grad_bias is not None:
                    grad_bias.add_(dlogits.sum(0))  # (V,) dL/db += sum_rows dlogits
        grad_weight = grad_weight.to(s_weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(s_bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _check_args(student_hidden: Tensor, teacher_hidden: Tensor, student: LMHead, teacher: LMHead,
                temperature: float, chunk_size: int) -> None:
    v_s, v_t = student.weight.shape[0], teacher.weight.shape[0]
    if v_s != v_t:
        raise ValueError(
            f"the student's LM head has a vocabulary of {v_s} tokens and the teacher's {v_t}: distillation "
            "compares full next-token distributions, so both models need the same (shared) tokenizer"
        )
    if student_hidden.ndim != 2 or teacher_hidden.ndim != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
            "must be (n, H) and (n, H_t) for the same n positions"
        )
    for name, hidden, head in (("student", student_hidden, student), ("teacher", teacher_hidden, teacher)):
        if head.weight.ndim != 2 or head.weight.shape[1] != hidden.shape[1]:
            raise ValueError(f"{name} head weight {tuple(head.weight.shape)} must be (V, {hidden.shape[1]})")
    if not (temperature > 0 and chunk_size >= 1):
        raise ValueError(f"need temperature > 0 and chunk_size >= 1; got {temperature=}, {chunk_size=}")


def chunked_generalized_jsd(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student: LMHead,
    teacher: LMHead,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-position generalized JSD ``(n,)`` between ``student`` and ``teacher`` (see the module docstring).

    ``student_hidden`` ``(n, H)`` and ``teacher_hidden`` ``(n, H_t)`` are the final hidden states at the
    ``n`` positions to distill; each head's logits are ``(h @ W.T + b) * logit_scale``, soft-capped, over
    ``temperature``, then log-softmaxed in fp32. Differentiable w.r.t. the student's hidden states, head
    weight and bias; the teacher gets no gradient. Never holds more than one ``[chunk_size, V]`` block
    per model, in forward or backward. Equals :func:`lit_align.losses.gkd.generalized_jsd` on full logits.
    """
    kind = divergence_kind(beta)
    _check_args(student_hidden, teacher_hidden, student, teacher, temperature, chunk_size)
    s_hidden, s_weight, s_bias = _autocast_inputs(student_hidden, student.weight, student.bias)
    t_hidden, t_weight, t_bias = _autocast_inputs(teacher_hidden.detach(), teacher.weight.detach(),
                                                  teacher.bias.detach() if teacher.bias is not None else None)
    s_tf = _LogitTransform(student.logit_scale, student.softcap, temperature, student.onednn)
    t_tf = _LogitTransform(teacher.logit_scale, teacher.softcap, temperature, teacher.onednn)
    return _GeneralizedJSDFn.apply(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, s_tf, t_tf, kind, beta, chunk_size)
