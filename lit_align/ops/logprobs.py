"""Selected-token log-probabilities computed in chunks from hidden states and the LM head.

Why this exists: every alignment loss (SFT, DPO, KTO, GRPO, ...) needs ``log p(y_t | y_<t)`` for the
label tokens only, yet the obvious route, ``logits = lm_head(h); logits.float().log_softmax(-1).gather(...)``,
materialises a ``[B, T, V]`` fp32 tensor (and autograd keeps it, or its softmax, for backward). With
V ~ 150k that is the largest tensor of an LLM training step, bigger than the activations of a whole
transformer layer. Only ``N`` numbers are wanted, so this module streams over the token dimension in
chunks of ``chunk_size`` rows: each chunk's ``[C, V]`` logits block is formed, reduced to a per-token
log-probability, entropy and argmax, and dropped. The backward (a custom ``torch.autograd.Function``)
recomputes each block from the saved hidden states, weight and per-token logsumexp instead of storing it,
so peak memory is ``O(C * V)`` rather than ``O(N * V)``. TRL's fused LM head (and Liger's fused linear
cross-entropy) use the same idea. Where one chunk holds every row (``N <= chunk_size``, e.g. the scored
tokens of a short batch) that one block is kept from the forward to the backward instead: the same
``O(C * V)`` bound, one head product fewer.

Per token, with ``x = hidden``, ``W = weight``, ``y = label``:

    raw  = (x @ W.T + b) in the input dtype, upcast to fp32, times ``logit_scale``
    z    = softcap * tanh(raw / softcap) / temperature          (softcap optional)
    lse  = logsumexp(z)
    logp = z[y] - lse
    H    = lse - sum_v softmax(z)_v * z_v                       (entropy)
    ok   = argmax(z) == y                                       (top-1 accuracy, detached)

and the gradients w.r.t. ``z`` are ``onehot(y) - softmax(z)`` for ``logp`` and
``-softmax(z) * (log softmax(z) + H)`` for ``H`` (GRPO's entropy bonus trains through it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from lit_align.ops.onednn import onednn_applies, onednn_kernel

__all__ = ["TokenStats", "naive_selected_logprobs", "selected_logprobs"]


@dataclass
class TokenStats:
    """Per-token statistics; rows whose label is ``ignore_index`` hold 0 / 0 / False."""

    logps: torch.Tensor  # (N,) float32 (fp64 if inputs are), differentiable w.r.t. hidden, weight, bias
    entropy: torch.Tensor | None  # (N,) float32, differentiable (GRPO's entropy bonus)
    correct: torch.Tensor | None  # (N,) bool, detached: argmax of logits == label
    mean_logit: torch.Tensor | None = None  # (N,) float32, detached: mean_v z_v (DPO's logits/* metrics)
    log_sum_sq_probs: torch.Tensor | None = None  # (N,) float32, detached: log sum_v p_v^2 (WPO weights)


@dataclass(frozen=True)
class _LogitTransform:
    """The LM head's products, and the fp32 transforms between them and the log_softmax with their
    derivative."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    onednn: bool = False  # the products on oneDNN where inputs are fp32 on a CPU (``onednn_linear``)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``hidden @ weight.T + bias``, ``(C, V)`` in the input dtype."""
        if not (self.onednn and onednn_applies(hidden, weight)):
            return F.linear(hidden, weight, bias)
        out = onednn_kernel(hidden, weight)  # (C, V)
        return out if bias is None else out.add_(bias)

    def hidden_grad(self, dlogits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``dL/dhidden = dlogits @ weight``, ``(C, H)``."""
        if self.onednn and onednn_applies(dlogits, weight):
            return onednn_kernel(dlogits, weight.t())
        return dlogits @ weight

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map fresh input-dtype logits to fp32 ``z``; also return ``tanh(raw / softcap)`` (or None)."""
        z = logits.to(_acc_dtype(logits.dtype))  # (C, V) fp32; may alias ``logits`` (a fresh matmul output)
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)  # (C, V) raw = logits * logit_scale
        tanh = None
        if self.softcap is not None:
            tanh = (z / self.softcap).tanh_()  # (C, V) t = tanh(raw / softcap)
            z = tanh * self.softcap  # (C, V) z = softcap * t
        if self.temperature != 1.0:
            z.div_(self.temperature)  # (C, V) z = z / T
        return z, tanh

    def backward(self, dz: torch.Tensor, tanh: torch.Tensor | None) -> torch.Tensor:
        """Chain ``dL/dz`` back to ``dL/dlogits`` (both fp32), in place on ``dz``; consumes ``tanh``."""
        if self.temperature != 1.0:
            dz.div_(self.temperature)  # (C, V) d(z / T) = dz / T
        if tanh is not None:
            dz.mul_(tanh.square_().neg_().add_(1.0))  # (C, V) d(c * tanh(r / c)) / dr = 1 - t^2
        if self.logit_scale != 1.0:
            dz.mul_(self.logit_scale)  # (C, V) d(s * logits) = s * dz
        return dz


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs (fp64 stays fp64, so gradcheck can run)."""
    return torch.promote_types(dtype, torch.float32)


def _safe_labels(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(valid, safe)``: the non-ignored mask and labels with ignored rows pointing at class 0."""
    valid = labels != ignore_index  # (N,)
    return valid, labels.masked_fill(~valid, 0)  # (N,), (N,)


def _forward_chunk(
    hidden: torch.Tensor,  # (C, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (C,)
    tf: _LogitTransform,
    ignore_index: int,
    with_entropy: bool,
    with_accuracy: bool,
    with_extras: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Return ``(logp, lse, entropy, correct, mean_logit, log_sum_sq_probs, z, tanh)`` for one chunk;
    ``z`` (fp32 logits after the transform, left intact) and ``tanh`` are what the backward would
    recompute."""
    valid, safe = _safe_labels(labels, ignore_index)  # (C,), (C,)
    z, tanh = tf.forward(tf.logits(hidden, weight, bias))  # (C, V) fp32
    lse = torch.logsumexp(z, dim=-1)  # (C,) lse = log sum_v exp(z_v)
    logp = z.gather(1, safe[:, None]).squeeze(1) - lse  # (C,) logp = z_y - lse
    logp = logp.masked_fill(~valid, 0.0)  # (C,)
    correct = (z.argmax(dim=-1) == labels) & valid if with_accuracy else None  # (C,) argmax(z) == y
    mean_logit = log_sum_sq = None
    if with_extras:
        mean_logit = z.mean(dim=-1).masked_fill(~valid, 0.0)  # (C,) mean_v z_v
        # (C,) log sum_v p_v^2 = logsumexp(2 z) - 2 lse
        log_sum_sq = (torch.logsumexp(2.0 * z, dim=-1) - 2.0 * lse).masked_fill(~valid, 0.0)
    entropy = None
    if with_entropy:
        p = (z - lse[:, None]).exp_()  # (C, V) p = softmax(z) = exp(z - lse)
        entropy = lse - p.mul_(z).sum(dim=-1)  # (C,) H = lse - sum_v p_v z_v
        entropy = entropy.masked_fill(~valid, 0.0)  # (C,)
    return logp, lse, entropy, correct, mean_logit, log_sum_sq, z, tanh


def _dlogits_chunk(
    hidden: torch.Tensor,  # (C, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    safe: torch.Tensor,  # (C,) labels, ignored rows replaced by 0
    lse: torch.Tensor,  # (C,) saved from forward
    grad: torch.Tensor,  # (C,) fp32 dL/dlogp, already 0 on ignored rows
    tf: _LogitTransform,
    grad_entropy: torch.Tensor | None = None,  # (C,) fp32 dL/dH, 0 on ignored rows
    entropy: torch.Tensor | None = None,  # (C,) H saved from forward
    kept: tuple[torch.Tensor, torch.Tensor | None] | None = None,  # (z, tanh) from the forward, consumed
) -> torch.Tensor:
    """Return one chunk's ``dL/dlogits`` in fp32, shape ``(C, V)``, from the logits the forward kept
    (overwritten) or, without them, from the logits recomputed."""
    z, tanh = tf.forward(tf.logits(hidden, weight, bias)) if kept is None else kept  # (C, V) fp32
    logp = z.sub_(lse[:, None])  # (C, V) log p = z - lse, reusing z's storage
    if grad_entropy is None:
        dz = logp.exp_().mul_(-grad[:, None])  # (C, V) -g * p
    else:  # -g * p - gH * p * (log p + H)
        scale = logp.add(entropy[:, None]).mul_(-grad_entropy[:, None]).sub_(grad[:, None])  # (C, V)
        dz = logp.exp_().mul_(scale)
    dz.scatter_add_(1, safe[:, None], grad[:, None])  # (C, V) g * (onehot(y) - p); rows with g = 0 stay 0
    return tf.backward(dz, tanh)  # (C, V) through temperature, softcap, logit_scale


def _active_chunk_starts(valid: torch.Tensor, n: int, chunk_size: int) -> list[int]:
    """Start rows of the chunks holding at least one non-ignored label (a single host sync)."""
    if n == 0:
        return []
    chunk_ids = torch.unique(valid.nonzero().squeeze(1) // chunk_size)  # (K,) chunks with work
    return (chunk_ids * chunk_size).tolist()


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the product in ``a``'s dtype and the sum in ``acc``'s (fp32) dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class _SelectedLogprobsFn(torch.autograd.Function):
    """Chunked ``logp = log_softmax(transform(h @ W.T + b))[y]`` with a recomputing backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,)
        tf: _LogitTransform,
        chunk_size: int,
        ignore_index: int,
        with_entropy: bool,
        with_accuracy: bool,
        with_extras: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        ctx.set_materialize_grads(False)  # an unused entropy's gradient stays None: no second term in backward
        n = hidden.shape[0]
        # One chunk holds every row: keep its logits for the backward instead of recomputing them (one
        # head product fewer; the block is the one the forward makes anyway, held until the backward).
        keep = n <= chunk_size and any(ctx.needs_input_grad[:3])
        kept_z = kept_tanh = None
        acc = {"dtype": _acc_dtype(hidden.dtype), "device": hidden.device}  # fp32 (fp64 for fp64)
        logps, lse = torch.empty(n, **acc), torch.empty(n, **acc)  # (N,), (N,)
        entropy = torch.empty(n, **acc) if with_entropy else None  # (N,)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device) if with_accuracy else None  # (N,)
        extras = [torch.empty(n, **acc), torch.empty(n, **acc)] if with_extras else None  # (N,), (N,)
        with torch.autocast(hidden.device.type, enabled=False):  # the backward runs outside autocast too
            for s in range(0, n, chunk_size):
                sl = slice(s, s + chunk_size)
                out = _forward_chunk(
                    hidden[sl], weight, bias, labels[sl], tf, ignore_index, with_entropy, with_accuracy, with_extras
                )
                logps[sl], lse[sl] = out[0], out[1]
                if entropy is not None:
                    entropy[sl] = out[2]
                if correct is not None:
                    correct[sl] = out[3]
                if extras is not None:
                    extras[0][sl], extras[1][sl] = out[4], out[5]
                if keep:
                    kept_z, kept_tanh = out[6], out[7]
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)  # no [N, V] tensor is saved...
        # ...but the one chunk's logits, where one chunk holds every row: not saved tensors, since the first
        # backward overwrites and drops them (a second one, under retain_graph, recomputes them)
        ctx.kept = (kept_z, kept_tanh) if kept_z is not None else None
        ctx.tf, ctx.chunk_size, ctx.ignore_index = tf, chunk_size, ignore_index
        mean_logit, log_sum_sq = extras if extras is not None else (None, None)
        ctx.mark_non_differentiable(*[t for t in (correct, mean_logit, log_sum_sq) if t is not None])
        return logps, entropy, correct, mean_logit, log_sum_sq

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logps: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # one chunk's logits from the forward, used once
        if grad_logps is None and grad_entropy is None:
            return (None,) * 10
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H) input dtype
        acc = _acc_dtype(weight.dtype)  # fp32 (fp64 for fp64 inputs)
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None  # (V, H) fp32
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_bias else None  # (V,) fp32
        valid, safe = _safe_labels(labels, ctx.ignore_index)  # (N,), (N,)
        grad = torch.zeros_like(lse) if grad_logps is None else grad_logps.to(lse.dtype)
        grad = grad.masked_fill(~valid, 0.0)  # (N,) zero grad on ignored rows
        if grad_entropy is not None and entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype).masked_fill(~valid, 0.0)  # (N,)
        else:
            grad_entropy = None
        for s in _active_chunk_starts(valid, hidden.shape[0], ctx.chunk_size):
            sl = slice(s, s + ctx.chunk_size)
            dlogits = _dlogits_chunk(hidden[sl], weight, bias, safe[sl], lse[sl], grad[sl], ctx.tf,  # (C, V)
                                     None if grad_entropy is None else grad_entropy[sl], None if entropy is None else entropy[sl],
                                     kept)
            dlogits_in = dlogits.to(weight.dtype)  # (C, V) as autograd would feed the lm_head matmul
            if grad_hidden is not None:
                grad_hidden[sl] = ctx.tf.hidden_grad(dlogits_in, weight)  # (C, H) dL/dx = dlogits @ W
            if grad_weight is not None:
                _add_matmul(grad_weight, dlogits_in.t(), hidden[sl])  # (V, H) dL/dW += dlogits^T @ x
            if grad_bias is not None:
                grad_bias.add_(dlogits.sum(dim=0))  # (V,) dL/db += sum_rows dlogits
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _check_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
    chunk_size: int,
) -> None:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, {hidden.shape[-1]})")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if not (temperature > 0 and chunk_size >= 1 and (softcap is None or softcap > 0)):
        raise ValueError(
            f"need temperature > 0, softcap > 0, chunk_size >= 1; got {temperature=}, {softcap=}, {chunk_size=}"
        )


def _autocast_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast like autocast would for ``lm_head(hidden)`` (e.g. Lightning ``bf16-mixed``), else check dtypes."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # differentiable casts, outside the Function
        return hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share a dtype")
    return hidden, weight, bias


def selected_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    with_accuracy: bool = True,
    with_extras: bool = False,
    ignore_index: int = -100,
    onednn: bool = False,
) -> TokenStats:
    """Log-prob of each label under ``log_softmax(transform(hidden @ weight.T + bias))``, chunked.

    ``hidden`` is ``(N, H)`` (or ``(..., H)`` with ``labels`` of shape ``(...)``; outputs take the labels'
    shape), ``weight`` is ``(V, H)`` in the same dtype. The matmul runs in the input dtype; everything after
    it in fp32. Never holds more than one ``[chunk_size, V]`` block of logits, in forward or backward (with
    a single chunk, that block is held from the forward to the backward rather than recomputed).
    Labels equal to ``ignore_index`` give logp 0, entropy 0, correct False and no gradient.
    ``with_extras`` also returns each token's mean logit and ``log sum_v p_v^2`` (detached).
    ``onednn`` runs the head's products (not its weight gradient) on oneDNN where the inputs are fp32 on
    a CPU (:mod:`lit_align.ops.onednn`; the model's ``onednn_linear``).
    """
    _check_args(hidden, weight, labels, bias, temperature, softcap, chunk_size)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    tf = _LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature, onednn=onednn)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1).long()  # (N,)
    outputs = _SelectedLogprobsFn.apply(
        flat_hidden, weight, bias, flat_labels, tf, chunk_size, ignore_index, with_entropy, with_accuracy, with_extras
    )
    logps, entropy, correct, mean_logit, log_sum_sq = (t.view(labels.shape) if t is not None else None for t in outputs)
    return TokenStats(logps, entropy, correct, mean_logit, log_sum_sq)


def naive_selected_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    with_accuracy: bool = True,
    with_extras: bool = False,
    ignore_index: int = -100,
    onednn: bool = False,
) -> TokenStats:
    """Reference for :func:`selected_logprobs`: full ``[N, V]`` fp32 logits and plain autograd.

    Same semantics and signature (``chunk_size`` and ``onednn`` are ignored); memory-hungry, meant for tests and as the
    readable definition of what the chunked version computes.
    """
    _check_args(hidden, weight, labels, bias, temperature, softcap, chunk_size)
    logits = F.linear(hidden, weight, bias)  # (..., V) input (or autocast) dtype
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale  # (..., V) fp32
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)  # (..., V)
    z = z / temperature  # (..., V)
    logprobs = torch.log_softmax(z, dim=-1)  # (..., V)
    valid = labels != ignore_index  # (...)
    safe = labels.masked_fill(~valid, 0).long()  # (...)
    logps = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)  # (...)
    entropy = correct = None
    if with_entropy:
        entropy = -(logprobs.exp() * logprobs).sum(-1).masked_fill(~valid, 0.0)  # (...)
    if with_accuracy:
        correct = ((z.argmax(-1) == labels) & valid).detach()  # (...)
    mean_logit = log_sum_sq = None
    if with_extras:
        mean_logit = z.mean(-1).masked_fill(~valid, 0.0).detach()  # (...)
        log_sum_sq = torch.log((logprobs.exp() ** 2).sum(-1)).masked_fill(~valid, 0.0).detach()  # (...)
    return TokenStats(logps, entropy, correct, mean_logit, log_sum_sq)
