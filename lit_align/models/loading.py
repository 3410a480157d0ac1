"""Loading policies and tokenizers: the embedded ``builtin:`` models, local directories, Hub ids."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lit_align.models.builtin import builtin_model, builtin_tokenizer, is_builtin
from lit_align.models.vlm import (
    is_builtin_vlm,
    is_vision_config,
    tiny_vlm,
    tiny_vlm_processor,
    tiny_vlm_tokenizer,
)

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


# from_pretrained's arguments that also choose the tokenizer's files
TOKENIZER_KWARGS = ("revision", "subfolder", "gguf_file", "cache_dir", "token", "local_files_only", "trust_remote_code")


@dataclass(frozen=True)
class ModelInit:
    """How a model is read: its dtype, attention implementation, and the rest of TRL's
    ``model_init_kwargs`` (``from_pretrained``'s keyword arguments: ``revision``, ``gguf_file``,
    ``subfolder``, ``quantization_config``, ...). Build it with :meth:`from_arguments`."""

    dtype: str = "float32"
    attn_implementation: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_arguments(
        cls, model_init_kwargs: Mapping[str, Any] | None, dtype: str = "float32", attn_implementation: str | None = None,
        trust_remote_code: bool = False, name: str = "model_init_kwargs",
    ) -> ModelInit:
        """``dtype``/``torch_dtype`` and ``attn_implementation`` in the kwargs (as TRL configs carry
        them) count as the module's arguments of those names; the two may not disagree."""
        kwargs = dict(model_init_kwargs or {})
        for key in ("dtype", "torch_dtype"):
            if key in kwargs:
                value = str(kwargs.pop(key)).removeprefix("torch.")
                if dtype not in ("float32", value):
                    raise ValueError(f"{name}.{key}={value!r} disagrees with dtype={dtype!r}: set one of them")
                dtype = value
        if "attn_implementation" in kwargs:
            value = kwargs.pop("attn_implementation")
            if attn_implementation not in (None, value):
                raise ValueError(f"{name}.attn_implementation={value!r} disagrees with attn_implementation={attn_implementation!r}")
            attn_implementation = value
        if kwargs.get("device_map") is not None:
            raise ValueError(
                f"{name}.device_map is not used: Lightning places the model on the Trainer's devices "
                "(--trainer.accelerator, --trainer.devices, --trainer.strategy)"
            )
        kwargs.pop("device_map", None)
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = quantization_config(kwargs["quantization_config"], name)
        resolve_dtype(dtype)  # checks the name
        return cls(dtype, attn_implementation, kwargs)

    @property
    def tokenizer_kwargs(self) -> dict[str, Any]:
        return {k: self.kwargs[k] for k in TOKENIZER_KWARGS if k in self.kwargs}

    @property
    def quantized(self) -> bool:
        return self.kwargs.get("quantization_config") is not None


def quantization_config(spec: Any, name: str = "model_init_kwargs") -> Any:
    """A ``transformers.BitsAndBytesConfig`` from its fields (``load_in_4bit``, ``bnb_4bit_quant_type``,
    ...) or as given. bitsandbytes quantizes on CUDA only: elsewhere this says so before anything loads."""
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ValueError(
            f"{name}.quantization_config: bitsandbytes 4/8-bit weights (QLoRA) need a CUDA GPU, and this machine "
            "has none; drop quantization_config (and keep peft for LoRA) to train here"
        )
    return BitsAndBytesConfig(**spec) if isinstance(spec, Mapping) else spec


def pretrained_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` kwargs as lit-align loads: a ``gguf_file`` is read into a plain dense model
    (transformers otherwise keeps the file's quantized blocks where a kernel exists, and such a model
    neither trains nor saves); bitsandbytes weights are placed on this process's GPU as they load
    (TRL's ``get_kbit_device_map``), since they are quantized there."""
    config = kwargs.get("quantization_config")
    if kwargs.get("gguf_file") and config is None:
        from transformers import GgufConfig

        kwargs = {**kwargs, "quantization_config": GgufConfig(dequantize=True)}
    elif config is not None and getattr(config, "quant_method", None) == "bitsandbytes" and "device_map" not in kwargs:
        kwargs = {**kwargs, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
    return kwargs


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


def _check_builtin_kwargs(name_or_path: str, kwargs: Mapping[str, Any]) -> None:
    unused = sorted(k for k, v in kwargs.items() if k != "trust_remote_code" and v is not None)
    if unused:
        raise ValueError(f"{name_or_path} is embedded in lit-align: model_init_kwargs {unused} apply to Hub or local models only")


def load_tokenizer(name_or_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; pad falls back to EOS, as in TRL."""
    if is_builtin(name_or_path):
        _check_builtin_kwargs(name_or_path, kwargs)
        return tiny_vlm_tokenizer() if is_builtin_vlm(name_or_path) else builtin_tokenizer(name_or_path)
    _check_local(name_or_path)
    processor = load_processor(name_or_path, **kwargs)
    if processor is not None:
        return processor_tokenizer(processor)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def processor_tokenizer(processor: Any) -> PreTrainedTokenizerBase:
    """A vision-language model's tokenizer, from its loaded processor: with the processor's chat template
    when it has none of its own (a VLM's template often lives on the processor only); pad falls back to EOS."""
    tokenizer = processor.tokenizer
    if not tokenizer.chat_template and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(name_or_path: str, **kwargs: Any) -> Any:
    """A vision-language model's processor (``AutoProcessor``: its image processor and tokenizer), or
    None for a text-only model. A model is a VLM when its config has a ``vision_config``."""
    if is_builtin(name_or_path):
        _check_builtin_kwargs(name_or_path, kwargs)
        return tiny_vlm_processor() if is_builtin_vlm(name_or_path) else None
    _check_local(name_or_path)
    from transformers import AutoConfig, AutoProcessor

    config_kwargs = {k: v for k, v in kwargs.items() if k != "gguf_file"}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    except (OSError, ValueError):  # a tokenizer-only directory, or a GGUF file's config: text
        return None
    if not is_vision_config(config):
        return None
    processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    if getattr(processor, "tokenizer", None) is not None and processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def customise_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template_path: str | None = None,
                        eos_token: str | None = None, pad_token: str | None = None) -> PreTrainedTokenizerBase:
    """TRL's ``chat_template_path``, ``eos_token`` and ``pad_token`` on a loaded tokenizer.

    ``chat_template_path``: a ``.jinja``/``.j2`` file (the template itself), or a tokenizer (a
    directory, Hub id or ``builtin:``) whose template is copied with the special tokens it writes
    and its EOS, as TRL's ``clone_chat_template``. ``eos_token``: a token of the vocabulary that
    ends completions from now on. ``pad_token``: a token of the vocabulary that pads batches."""
    if chat_template_path:
        path = Path(chat_template_path).expanduser()
        if path.suffix in (".jinja", ".j2"):
            if not path.is_file():
                raise FileNotFoundError(f"chat_template_path {chat_template_path!r}: no such template file")
            tokenizer.chat_template = path.read_text()
        else:
            source = load_tokenizer(chat_template_path)
            if not source.chat_template:
                raise ValueError(f"chat_template_path {chat_template_path!r}: that tokenizer has no chat template to copy")
            tokenizer.chat_template = source.chat_template
            vocab = tokenizer.get_vocab()
            missing = [t.content for t in source.added_tokens_decoder.values() if t.special and t.content not in vocab]
            if missing:
                tokenizer.add_special_tokens({"additional_special_tokens": missing})
            if source.eos_token is not None:
                tokenizer.eos_token = source.eos_token
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise ValueError(f"eos_token {eos_token!r} is not a token of the tokenizer; add it, or pick one of its special tokens "
                             f"({', '.join(tokenizer.all_special_tokens[:8])})")
        tokenizer.eos_token = eos_token
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise ValueError(f"pad_token {pad_token!r} is not a token of the tokenizer; pick one of its tokens, for example "
                             f"its EOS {tokenizer.eos_token!r}")
        tokenizer.pad_token = pad_token
    return tokenizer


def fit_model_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """After :func:`customise_tokenizer`: room in the embeddings for added tokens (rounded up to a
    multiple of 64, as TRL), and the tokenizer's EOS and pad token in the model's and generation configs."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from ``builtin:<name>``, a local directory or the Hub (float32 by default, as TRL);
    a vision-language model (``builtin:tiny-vlm``, a config with a ``vision_config``) through
    ``AutoModelForImageTextToText``."""
    torch_dtype = resolve_dtype(dtype)
    if is_builtin(name_or_path):
        _check_builtin_kwargs(name_or_path, kwargs)
        dtype = torch.float32 if torch_dtype == "auto" else torch_dtype
        model = tiny_vlm(dtype, name_or_path) if is_builtin_vlm(name_or_path) else builtin_model(name_or_path, dtype=dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model
    _check_local(name_or_path)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForCausalLM
    if not kwargs.get("gguf_file"):
        from transformers import AutoConfig, AutoModelForImageTextToText

        config_kwargs = {k: v for k, v in kwargs.items() if k in TOKENIZER_KWARGS}
        if is_vision_config(AutoConfig.from_pretrained(name_or_path, **config_kwargs)):
            auto = AutoModelForImageTextToText
    return auto.from_pretrained(name_or_path, dtype=torch_dtype, **pretrained_kwargs(kwargs))


# The vision tower and projector of the VLM families transformers ships (LLaVA, Gemma 3, Qwen2-VL, Idefics3, ...).
VISION_MODULES = r".*\b(vision_tower|vision_model|visual|multi_modal_projector|connector)\b.*"


def apply_peft(model: PreTrainedModel, peft: Any, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with PEFT adapters.

    ``peft`` is a plain dict of ``peft.LoraConfig`` fields (DoRA: ``use_dora``, rsLoRA:
    ``use_rslora``, ``target_modules: all-linear``, ``modules_to_save``, ...), with TRL's
    ModelConfig defaults (r=16, alpha=32, dropout 0.05, all linear layers but the LM head); or
    ``{class_path: peft.IA3Config, init_args: {...}}`` for another adapter method (LoHa, LoKr,
    IA3, ...); or a ``peft`` config object. Classifiers (``SEQ_CLS``, ``TOKEN_CLS``) train their
    fresh ``score`` head in full, as TRL advises. Adapters on the LM head are refused (the chunked
    log-prob op reads its weight directly), and so are prompt-learning methods (their virtual
    tokens live in ``PeftModel.forward``, which lit-align's forward does not call). On a vision-language
    model the default adapters go on the language model only (``exclude_modules`` the vision tower and
    projector); give ``target_modules`` or ``exclude_modules`` to adapt the vision tower too.
    """
    import peft as peft_lib

    if isinstance(peft, peft_lib.PeftConfig):
        config = peft
    else:
        spec = dict(peft)
        if "class_path" in spec:
            from lit_align.imports import import_object

            cls = import_object(spec["class_path"], "peft class_path", default_module="peft")
            settings = dict(spec.get("init_args") or {})
        else:
            cls, settings = peft_lib.LoraConfig, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", **spec}
            if is_vision_config(model.config) and "target_modules" not in spec and "exclude_modules" not in spec:
                settings["exclude_modules"] = VISION_MODULES  # the language model only, unless told otherwise
        settings.setdefault("task_type", task_type)
        if task_type != "CAUSAL_LM" and "modules_to_save" in getattr(cls, "__dataclass_fields__", {}):
            settings.setdefault("modules_to_save", ["score"])
        try:
            config = cls(**settings)
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid peft settings {peft}: {err}") from err
    if config.is_prompt_learning:
        raise ValueError(
            f"peft: {type(config).__name__} adds virtual tokens in PeftModel.forward, which lit-align's forward does not "
            "call; use an adapter method (LoRA, DoRA, IA3, LoHa, LoKr, ...)"
        )
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (list, tuple, set)) and "lm_head" in targets:
        raise ValueError("peft.target_modules may not include 'lm_head': train it with modules_to_save instead")
    return peft_lib.get_peft_model(model, config)
