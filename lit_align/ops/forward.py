"""The policy forward that every offline method shares: backbone once, LM head only on targets.

The decoder runs over all tokens; the LM head runs only over the positions whose next
token is a target (completion tokens), through the chunked log-prob op. For SFT on
prompt-completion data or DPO that skips the prompt's share of the largest matmul
of the step, and never builds ``[B, T, V]`` logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_align.ops.logprobs import TokenStats, selected_logprobs
from lit_align.ops.packing import SequenceBatch, shared_prompt_attention


def target_mask(batch: SequenceBatch, token_mask: Tensor) -> Tensor:
    """Positions ``t`` whose next token ``t+1`` is a target: ``(R, T-1)`` bool.

    A target must be marked in ``token_mask`` and belong to the same sequence as its
    context, so in packed rows no sequence predicts the first token of the next one.
    """
    same = batch.sequence_ids[:, 1:] == batch.sequence_ids[:, :-1]  # (R, T-1)
    return token_mask[:, 1:] & same & (batch.sequence_ids[:, 1:] >= 0)


def decoder_hidden(model: nn.Module, batch: SequenceBatch) -> Tensor:
    """Final hidden states ``(R, T, H)``, with no attention mask in every layout: right padding
    needs only the causal mask, and packed rows get a block-diagonal one from the restarting
    position ids (transformers builds it only without a mask and with ``use_cache=False``).

    A batch with images goes through a vision-language model's backbone (vision tower, projector,
    language model), without position ids: its rows are padded, never packed, so the model's own
    positions are the same, and models with multimodal rotary positions (Qwen2-VL) derive theirs."""
    if batch.vision:
        return multimodal_backbone(model)(input_ids=batch.input_ids, **in_model_dtype(model, batch.vision), use_cache=False).last_hidden_state
    mask = None if batch.shared_prompt is None else attention_mask_for(model, shared_prompt_attention(batch))
    out = model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state


def attention_mask_for(model: nn.Module, sees: Tensor) -> Tensor:
    """A ``(R, 1, T, T)`` bool mask (True: attend) in the form the model's attention takes as given:
    bool for ``sdpa`` and ``flex_attention``, additive in the model's dtype for ``eager``."""
    implementation = model.config._attn_implementation
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)
    if implementation not in ("sdpa", "flex_attention"):
        raise ValueError(f"an explicit attention mask (shared_prompt_forward) needs attn_implementation sdpa or eager, "
                         f"not {implementation!r}")
    return sees


def multimodal_backbone(model: nn.Module) -> nn.Module:
    """A VLM's ``model`` (``LlavaModel``, ``Qwen2VLModel``, ...): image features merged into the text,
    final hidden states out, no LM head. A PEFT wrapper is looked through."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def in_model_dtype(model: nn.Module, vision: dict[str, Tensor]) -> dict[str, Tensor]:
    """Image inputs with their floating tensors (pixels) in the model's dtype; grids and types as they are."""
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in vision.items()}


def join_vision(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The image inputs of several rows as one batch's: each key's tensors joined along the first
    dimension (images for LLaVA's pixels, patches for Qwen2-VL's, grids), in row order."""
    return {k: torch.cat([row[k] for row in rows if k in row]) for k in rows[0]} if rows else {}


def lm_head_params(model: nn.Module) -> dict:
    """The LM head's weight and bias and the config's logit transforms, for the chunked op."""
    head = model.get_output_embeddings()
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "weight": head.weight,
        "bias": getattr(head, "bias", None),
        "logit_scale": float(getattr(text_config, "logit_scale", None) or 1.0),
        "softcap": getattr(text_config, "final_logit_softcapping", None),
        "onednn": bool(getattr(head, "onednn", False)),  # a OneDNNLinear head (``onednn_linear``)
    }


def target_logprobs(
    model: nn.Module,
    batch: SequenceBatch,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    with_accuracy: bool = True,
    with_extras: bool = False,
) -> tuple[TokenStats, Tensor]:
    """Log-probs of the target tokens selected by ``mask`` ``(R, T-1)``.

    Returns the per-target :class:`TokenStats` (``(n,)`` each, in row-major order of
    ``mask``) and the sequence index of every target ``(n,)``.
    """
    hidden = decoder_hidden(model, batch)[:, :-1][mask]  # (n, H)
    labels = batch.input_ids[:, 1:][mask]  # (n,)
    stats = selected_logprobs(
        hidden,
        labels=labels,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        with_accuracy=with_accuracy,
        with_extras=with_extras,
        **lm_head_params(model),
    )
    return stats, batch.sequence_ids[:, 1:][mask]


def sequence_sum(values: Tensor, sequence_index: Tensor, num_sequences: int) -> Tensor:
    """Sum per-target ``values`` ``(n,)`` into their sequences: ``(num_sequences,)``."""
    out = values.new_zeros(num_sequences)
    return out.index_add(0, sequence_index, values)
