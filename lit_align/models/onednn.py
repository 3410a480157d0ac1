"""oneDNN's fp32 matmul for the linear layers of a model trained on a CPU (``onednn_linear``).

torch multiplies fp32 CPU matrices with MKL. On some CPUs oneDNN, which torch also ships, is faster for the
shapes of a decoder layer: on the 2-core AMD EPYC of ``benchmarks/README.md`` by 1.1-1.3x for a layer's
forward product and its input gradient, while MKL is as fast or faster for the weight gradient. So
:func:`use_onednn_linear` turns each ``nn.Linear`` of a model into a :class:`OneDNNLinear`, whose forward and
input gradient run on oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor itself picks for
CPU linears) and whose weight gradient stays on ``torch.mm``. The arithmetic is fp32 throughout: results
differ from MKL's by rounding only (the order of the sums). Parameters, their names and checkpoints are
unchanged, and PEFT adapters wrap the layer as they wrap an ``nn.Linear``. Tensors that are not fp32 on a
CPU (bf16, CUDA, DTensor shards) go through ``F.linear`` as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's CPU linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _kernel(a: Tensor, weight: Tensor) -> Tensor:
    """``a @ weight.T`` for 2-D fp32 CPU tensors of any strides, ``(M, K) x (N, K) -> (M, N)``, on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")


@torch.library.custom_op("lit_align::onednn_matmul", mutates_args=())
def onednn_matmul(a: Tensor, weight: Tensor) -> Tensor:
    """``a @ weight.T`` on oneDNN, differentiable, and one opaque op for ``torch.compile`` (inductor's own
    lowering of the kernel wants frozen weights)."""
    return _kernel(a, weight)


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


def _on_onednn(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, nn.Parameter))  # not a DTensor shard (FSDP2)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU products run on oneDNN (:func:`onednn_matmul`); else ``F.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        if not _on_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            out = onednn_matmul(x2, self.weight)  # (M, N)
        else:  # generation, a frozen model: the kernel without the custom op's dispatch (no autograd to record)
            out = _kernel(x2, self.weight)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def use_onednn_linear(model: nn.Module) -> int:
    """Make every ``nn.Linear`` of ``model`` a :class:`OneDNNLinear` in place (same parameters); how many.
    Refused by name where this torch has no oneDNN."""
    if not onednn_available():
        raise ValueError("onednn_linear: this torch build has no oneDNN (torch.backends.mkldnn); set onednn_linear: false")
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            count += 1
    return count
