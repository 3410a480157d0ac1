"""Regional compilation: each transformer layer compiled on its own (``torch_compile``).

Every layer of a decoder runs the same code, so ``torch.compile`` traces it once and every layer reuses
the graph: a few seconds of compilation instead of minutes for the whole model, and the same result
(torchtune's ``compile``, transformers' "regional compilation"). Inductor fuses each layer's elementwise
work (norms, rotary, SwiGLU, residuals) and keeps fewer intermediates for backward: on SmolLM2-135M on a
CPU the step's peak memory drops by about a fifth (``benchmarks/README.md``). The LM head is not compiled:
lit-align's chunked log-prob op already keeps its logits small.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def compile_layers(model: nn.Module) -> int:
    """Compile every transformer layer of ``model`` in place (``nn.Module.compile``: parameter names and
    checkpoints are unchanged); how many. A model whose layers transformers does not mark as layers
    (``GradientCheckpointingLayer``) is refused by name."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"torch_compile: {type(model).__name__} has no transformer layers to compile (no "
                         "transformers GradientCheckpointingLayer); set torch_compile: false")
    for layer in layers:
        layer.compile()
    # Layers of one model share their code: one frame, many guard sets (a new shape, no_grad for
    # validation, eval mode). Room for them, beyond torch's default of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return len(layers)
