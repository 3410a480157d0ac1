"""The linear layers of a model trained on a CPU in fp32, on oneDNN's matmul (``onednn_linear``).

:func:`use_onednn_linear` turns each ``nn.Linear`` of a model into a :class:`OneDNNLinear`, whose product and
input gradient run on oneDNN and whose weight gradient on ``torch.mm`` (``lit_align.ops.onednn``: why, and
how much faster). Parameters, their names and checkpoints are unchanged, and PEFT adapters wrap the layer as
they wrap an ``nn.Linear``. Under FSDP2 each forward sees the unsharded weight and runs on oneDNN
(``tests/test_sharded.py``); tensors that are not fp32 on a CPU (bf16, CUDA, CPU autocast) or a weight that is
still a DTensor go through ``F.linear`` as before.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_align.ops.onednn import onednn_applies, onednn_available, onednn_kernel, onednn_matmul


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU products run on oneDNN (:func:`onednn_matmul`); else ``F.linear``.
    As an LM head it tells the chunked log-prob ops to do the same (``lm_head_params``)."""

    onednn: ClassVar[bool] = True

    def forward(self, x: Tensor) -> Tensor:
        if not onednn_applies(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            out = onednn_matmul(x2, self.weight)  # (M, N)
        else:  # generation, a frozen model: the kernel without the custom op's dispatch (no autograd to record)
            out = onednn_kernel(x2, self.weight)
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
