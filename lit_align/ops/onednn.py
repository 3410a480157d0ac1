"""oneDNN's fp32 CPU matmul as a differentiable op (``onednn_linear``; the layers: ``lit_align.models.onednn``).

torch multiplies fp32 CPU matrices with MKL. oneDNN, which torch also ships, is faster on some CPUs: on the
2-core AMD EPYC of ``benchmarks/README.md`` 1.3x at 1024^3, and 1.1-1.4x for a decoder layer's forward
products and input gradients, while MKL is as fast or faster for the weight gradient. :func:`onednn_matmul`
runs the forward product and the input gradient on oneDNN (``torch.ops.mkldnn._linear_pointwise``, the
kernel inductor itself picks for CPU linears) and the weight gradient on ``torch.mm``. The arithmetic is fp32
throughout: results differ from MKL's by rounding only (the order of the sums). The chunked LM-head ops
(``logprobs.py``, ``distill.py``) call :func:`onednn_kernel` for their products when the model's head is on
oneDNN: the head's ``[C, H] x [H, V]`` products, with few rows, are where MKL is slowest (107-130 against
153 GFLOP/s for SmolLM2's).
"""

from __future__ import annotations

import torch
from torch import Tensor


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's CPU linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x @ weight.T`` goes to oneDNN: fp32 on a CPU, outside CPU autocast (there the product is
    autocast's bf16 one), and a plain weight (not a DTensor: FSDP2 unshards before each forward)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and type(weight) in (torch.Tensor, torch.nn.Parameter))


def onednn_kernel(a: Tensor, weight: Tensor) -> Tensor:
    """``a @ weight.T`` for 2-D fp32 CPU tensors of any strides, ``(M, K) x (N, K) -> (M, N)``, on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")


@torch.library.custom_op("lit_align::onednn_matmul", mutates_args=())
def onednn_matmul(a: Tensor, weight: Tensor) -> Tensor:
    """``a @ weight.T`` on oneDNN, differentiable, and one opaque op for ``torch.compile`` (inductor's own
    lowering of the kernel wants frozen weights)."""
    return onednn_kernel(a, weight)


@onednn_matmul.register_fake
def _(a: Tensor, weight: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor):
    a, weight = ctx.saved_tensors
    grad_a = onednn_matmul(grad, weight.t()) if ctx.needs_input_grad[0] else None  # (M, K) = grad @ W, oneDNN
    grad_weight = grad.t() @ a if ctx.needs_input_grad[1] else None  # (N, K) on torch.mm: MKL is as fast here
    return grad_a, grad_weight


onednn_matmul.register_autograd(_backward, setup_context=_setup_context)
