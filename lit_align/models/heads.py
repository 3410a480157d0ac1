"""Models with a head other than the LM head: a scalar reward (sequence classification with one
output) and per-token step labels (token classification with two), as TRL's reward model and
PRM use. The ``score`` head is read directly by ``ops.heads`` so packed batches work."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    PreTrainedModel,
)

from lit_align.models.builtin import builtin_config, builtin_model, is_builtin
from lit_align.models.loading import _check_builtin_kwargs, _check_local, pretrained_kwargs, resolve_dtype

HEADS = {"sequence": (AutoModelForSequenceClassification, LlamaForSequenceClassification),
         "token": (AutoModelForTokenClassification, LlamaForTokenClassification)}


def load_classifier(
    name_or_path: str,
    kind: str,
    num_labels: int,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """A causal LM's backbone with a fresh ``score`` head (``kind``: ``sequence`` or ``token``).

    A saved classifier directory loads as it is; a causal LM checkpoint gets a new head, as
    ``from_pretrained`` does. ``builtin:`` models keep the builtin LM's backbone weights and draw
    the head with a fixed seed.
    """
    auto_cls, builtin_cls = HEADS[kind]
    torch_dtype = resolve_dtype(dtype)
    if is_builtin(name_or_path):
        _check_builtin_kwargs(name_or_path, kwargs)
        config = builtin_config(name_or_path)
        config.num_labels = num_labels
        config.architectures = [builtin_cls.__name__]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = builtin_cls(config)
        model.model.load_state_dict(builtin_model(name_or_path).model.state_dict())
        model.to(torch.float32 if torch_dtype == "auto" else torch_dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model
    _check_local(name_or_path)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = auto_cls.from_pretrained(name_or_path, num_labels=num_labels, dtype=torch_dtype, **pretrained_kwargs(kwargs))
    if model.config.pad_token_id is None:  # sequence classifiers find the last token by the pad id
        model.config.pad_token_id = model.config.eos_token_id
    return model
