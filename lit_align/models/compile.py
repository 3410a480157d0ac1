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
    pin_vector_width()
    for layer in layers:
        layer.compile()
    # Layers of one model share their code: one frame, many guard sets (a new shape, no_grad for
    # validation, eval mode). Room for them, beyond torch's default of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return len(layers)


def pin_vector_width() -> None:
    """Write the SIMD width inductor picks for this CPU into its config (unless set already).

    Inductor picks its vector width (AVX-512, AVX2, none) from the CPU and ``ATEN_CPU_CAPABILITY``, but its
    on-disk cache of compiled graphs (``/tmp/torchinductor_<user>``) does not key on that choice: a graph
    cached by a run at one width and reloaded by a run at another is rebuilt with the new width's vector
    type and the old width's loop step, which on torch 2.13 gave NaN losses (AVX-512 code run under
    ``ATEN_CPU_CAPABILITY=avx2``) and heap corruption (the other way round). ``cpp.simdlen`` is part of
    the cache key, and setting it to the width inductor picks anyway changes no kernel: it only keeps
    each width's graphs apart (``tests/test_compile.py``)."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if config.cpp.simdlen is None:
        config.cpp.simdlen = pick_vec_isa().bit_width()  # 0: no vector ISA, scalar code (as picked)
