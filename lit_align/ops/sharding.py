"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for lit-align's models, under Lightning's
``ModelParallelStrategy``: parameters, gradients and optimizer state sharded over the devices.
Tested on CPUs (gloo, tests/test_sharded.py); nothing here is CPU-specific, but GPUs (NCCL) are untested.

Units. Each decoder layer is one unit (gathered for its forward and backward, then freed); the
rest of a transformers model (embeddings, final norm, the LM or score head) is the root unit. The
ops never call the root's ``forward``: they run the backbone through ``model.get_decoder()`` and read
the LM head's weight directly (the chunked log-prob op). So ``get_decoder`` is registered as one of
the root's FSDP forward methods (calling it gathers the root's parameters) and the root keeps them
gathered after its forward (``reshard_after_forward=False``) until its backward has reduce-scattered
their gradients. Any parameter the ops read is then whole when read, and every gradient is averaged
over the devices (as DDP's), so the losses' device-count scaling is unchanged.

Generation: every gather is a collective, so each rank must make the same gathers in the same order.
A decoding loop stops when the rank's own rows have ended, and multi-turn rollouts take as many turns
as their rows need: neither keeps ranks in step. So :func:`full_parameters` gathers every unit once
around a whole rollout (the :class:`~lit_align.rollout.callback.RolloutCallback` calls it; the HF
engine calls it too for callers outside rollouts) and generation then runs on whole weights without
collectives, as TRL gathers a ZeRO-3 model for generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

DECODER_LAYER_NAMES = ("layers", "h", "blocks", "block")


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in ``module`` (itself included), outermost first."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP2-sharded parameters."""
    return isinstance(module, nn.Module) and bool(fsdp_units(module))


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of blocks (``layers`` in most transformers models), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in DECODER_LAYER_NAMES:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def shard_transformer(model: nn.Module, mesh) -> nn.Module:
    """Shard a transformers model in place: one unit per decoder layer, the rest the root unit,
    whose parameters ``model.get_decoder()`` gathers (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"cannot shard {type(model).__name__}: no list of decoder layers under get_decoder() "
                         f"(looked for {', '.join(DECODER_LAYER_NAMES)})")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    register_fsdp_forward_method(model, "get_decoder")
    return model


def shard_module(module: nn.Module, mesh) -> list[str]:
    """Shard the models of a lit-align method (its ``configure_model`` under ``ModelParallelStrategy``)
    over ``mesh``'s ``data_parallel`` dimension. Every transformers model among its children (the policy,
    a reference, a teacher, a critic) is sharded by :func:`shard_transformer`, frozen ones too (same
    memory saving; they run forward on every rank in step); other trainable children (PPO's value head)
    are one unit each; frozen non-transformers children stay whole on every rank. Returns the names."""
    from torch.distributed.fsdp import fully_shard

    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"lit-align shards with FSDP2 over data parallelism only, but the device mesh has tensor_parallel_size="
            f"{mesh['tensor_parallel'].size()}: use ModelParallelStrategy(data_parallel_size=<number of devices>, "
            "tensor_parallel_size=1) (its default 'auto' puts every device of a node on the tensor-parallel axis)"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    sharded = []
    for name, child in module.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if hasattr(child, "peft_config"):
            raise NotImplementedError("peft (LoRA) models are not sharded yet: train them with strategy='ddp'")
        if hasattr(child, "get_decoder"):
            shard_transformer(child, dp_mesh)
        elif any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=dp_mesh)
        else:
            continue
        sharded.append(name)
    return sharded


@contextlib.contextmanager
def full_parameters(*modules: nn.Module | None) -> Iterator[None]:
    """Every FSDP2 unit of ``modules`` gathered (whole on every rank) for the block's duration, and
    kept whole through any number of forwards; sharded again afterwards. A collective: every rank
    enters together. Re-entrant (inner uses are free); a no-op for unsharded modules."""
    units = [u for m in modules if isinstance(m, nn.Module) for u in fsdp_units(m) if not getattr(u, "_lit_align_full", False)]
    if not units:
        yield
        return
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        if state._is_root is None and unit is _root_of(unit, units):
            state._lazy_init()  # gathering before any forward: the root's lazy init sets up communication first
        groups = state._fsdp_param_groups
        saved.append((state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in groups]))
        for group in groups:
            group.post_forward_mesh_info = None  # no reshard after forward while gathered
        unit._lit_align_full = True
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit, (auto, infos) in zip(units, saved):
            state = unit._get_fsdp_state()
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info
            state._auto_reshard_after_forward = auto
            unit.reshard()
            unit._lit_align_full = False


def _root_of(unit: nn.Module, units: list[nn.Module]) -> nn.Module:
    """The outermost unit of ``units`` that contains ``unit``."""
    for candidate in units:
        if any(m is unit for m in candidate.modules()):
            return candidate
    return unit


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict on CPU, on rank 0 (empty elsewhere): a collective for a sharded
    model (every rank calls it); the plain ``state_dict()`` otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
