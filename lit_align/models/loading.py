"""Loading policies and tokenizers: the embedded ``builtin:`` models, local directories, Hub ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lit_align.models.builtin import builtin_model, builtin_tokenizer, is_builtin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a torch dtype (default float32, as TRL)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _check_local(name: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(
            f"model path {name!r} does not exist or is not a directory; expected a Hugging Face model "
            "directory (config.json + weights), a Hub id such as 'Qwen/Qwen2.5-0.5B-Instruct', or builtin:tiny"
        )


def tokenizer_pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (TRL's fallback), else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def load_tokenizer(name_or_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; pad falls back to EOS, as in TRL."""
    if is_builtin(name_or_path):
        return builtin_tokenizer(name_or_path)
    _check_local(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from ``builtin:<name>``, a local directory or the Hub (float32 by default, as TRL)."""
    torch_dtype = resolve_dtype(dtype)
    if is_builtin(name_or_path):
        model = builtin_model(name_or_path, dtype=torch.float32 if torch_dtype == "auto" else torch_dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model
    _check_local(name_or_path)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)


def apply_lora(model: PreTrainedModel, peft: dict[str, Any], task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with LoRA adapters from a plain dict of ``peft.LoraConfig`` fields.

    Defaults follow TRL's ModelConfig (r=16, alpha=32, dropout 0.05, all linear layers but the
    LM head). A LoRA on the LM head is rejected: the chunked log-prob op reads its weight directly.
    Classifiers (``SEQ_CLS``, ``TOKEN_CLS``) train their fresh ``score`` head in full, as TRL advises.
    """
    from peft import LoraConfig, get_peft_model

    settings = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", **peft}
    settings.setdefault("task_type", task_type)
    if task_type != "CAUSAL_LM":
        settings.setdefault("modules_to_save", ["score"])
    targets = settings.get("target_modules")
    if isinstance(targets, (list, tuple)) and "lm_head" in targets:
        raise ValueError("peft.target_modules may not include 'lm_head': train it with modules_to_save instead")
    try:
        config = LoraConfig(**settings)
    except TypeError as err:
        raise ValueError(f"invalid peft settings {peft}: {err}") from err
    return get_peft_model(model, config)
