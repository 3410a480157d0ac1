"""The embedded default models: a tiny seeded Llama and a byte-level tokenizer, built in memory.

``builtin:tiny`` lets every example and test run offline on a CPU in seconds: nothing is
downloaded, the tokenizer needs no files, and the weights come from a fixed seed so two
runs start from the same model. ``builtin:tiny-sft`` is the same network after supervised
fine-tuning on the arithmetic task, its weights shipped with the package
(``assets/tiny-sft.safetensors``, made by :mod:`lit_align.tiny_sft`): the warm start of
the online methods, the same on every machine. ``builtin:tiny-tools`` is its sibling fine-tuned
on conversations that call a calculator tool (``assets/tiny-tools.safetensors``): the warm start
of ``configs/grpo_tools.yaml``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BUILTIN_PREFIX = "builtin:"

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
# Order fixes the ids: bytes are 0..255 (id == byte value), specials follow from 256.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, ENDOFTEXT)

# ChatML with as little whitespace as possible (short sequences keep CPU runs fast), with tools in
# the Hermes convention: the tool names in a system turn, an assistant's calls as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, tool results as "tool" turns. The
# assistant turn's content and its closing <|im_end|> sit inside {% generation %} so
# assistant-only losses train the model to stop; the "\n" after it is outside, so rendering
# messages[:-1] with add_generation_prompt=True is a token prefix of the full conversation.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- (tool.function or tool).name + ';' -}}{%- endfor -%}"
    "{{- '</tools><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] -}}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{- '<tool_call>' + {'name': (call.function or call).name, 'arguments': (call.function or call).arguments} | tojson + '</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Ids fixed by construction (checked against the tokenizer in builtin_config).
PAD_ID = 256 + SPECIAL_TOKENS.index(PAD_TOKEN)
EOS_ID = 256 + SPECIAL_TOKENS.index(IM_END)
BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)

_TINY = dict(
    vocab_size=(BYTE_VOCAB + 7) // 8 * 8,  # rounded up to a multiple of 8
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=192,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=PAD_ID,
    eos_token_id=EOS_ID,
    bos_token_id=None,
)

# name -> LlamaConfig kwargs (complete: LlamaConfig(**BUILTIN_MODELS[name]) is the model's config).
BUILTIN_MODELS: dict[str, dict] = {
    "builtin:tiny": _TINY,
    # builtin:tiny fine-tuned by lit_align/models/assets/tiny-sft.yaml (weights in BUILTIN_WEIGHTS).
    "builtin:tiny-sft": _TINY,
    # builtin:tiny fine-tuned on calculator-tool conversations by lit_align/models/assets/tiny-tools.yaml.
    "builtin:tiny-tools": _TINY,
    # A 32k LM head, for benchmarks where the logits/loss over a realistic vocabulary dominate.
    # The byte tokenizer only uses ids < 264; the other rows are never produced as inputs.
    "builtin:tiny-32k": {
        **_TINY,
        "vocab_size": 32000,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 384,
    },
}


# Builtin models whose weights are shipped (trained) instead of drawn from the seed.
ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_WEIGHTS: dict[str, Path] = {
    "builtin:tiny-sft": ASSETS / "tiny-sft.safetensors",
    "builtin:tiny-tools": ASSETS / "tiny-tools.safetensors",
}


def is_builtin(name: str) -> bool:
    """Whether ``name`` addresses an embedded model or task (``builtin:...``)."""
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def _check_name(name: str) -> None:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known builtin models: {', '.join(BUILTIN_MODELS)}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer/decoder use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def builtin_tokenizer(name: str = "builtin:tiny") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte, ids 0..255) plus ChatML special tokens.

    No BOS is added; EOS is ``<|im_end|>``, PAD is ``<|pad|>``. Every builtin model shares it.
    """
    _check_name(name)
    byte_char = _bytes_to_unicode()
    # BPE without merges over the 256 byte symbols = pure byte tokenization that round-trips any text.
    backend = Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
    # use_regex=False: no word splitting is needed since there are no merges to apply.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, ENDOFTEXT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
        # The default cleanup rewrites " ." -> "." and would break the exact byte round trip.
        clean_up_tokenization_spaces=False,
    )


def builtin_config(name: str = "builtin:tiny") -> LlamaConfig:
    """The LlamaConfig of a builtin model (special-token ids are those of the builtin tokenizer)."""
    _check_name(name)
    tok = builtin_tokenizer(name)
    kwargs = copy.deepcopy(BUILTIN_MODELS[name])
    # Guard against the constants above drifting from the tokenizer.
    assert (tok.pad_token_id, tok.eos_token_id) == (kwargs["pad_token_id"], kwargs["eos_token_id"])
    assert len(tok) <= kwargs["vocab_size"]
    config = LlamaConfig(**kwargs)
    # So a saved copy reloads through AutoModelForCausalLM and pipelines.
    config.architectures = ["LlamaForCausalLM"]
    return config


def builtin_model(name: str = "builtin:tiny", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A builtin Llama, identical on every call, in eval mode: freshly initialised from seed 0, or
    with its shipped weights (``builtin:tiny-sft``, ``builtin:tiny-tools``).

    The global RNG state is left untouched. Weights are drawn (or loaded) in float32 and then
    cast, so every dtype holds the same weights up to rounding.
    """
    config = builtin_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    if name in BUILTIN_WEIGHTS:
        model.load_state_dict(shipped_weights(name), strict=True)
    model.to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=None
    )
    # Match from_pretrained, which returns models in eval mode (dropout is 0 anyway).
    return model.eval()


def shipped_weights(name: str, path: Path | None = None) -> dict[str, torch.Tensor]:
    """The shipped weights of builtin model ``name`` (from ``path``, default its ``BUILTIN_WEIGHTS`` file)."""
    from safetensors.torch import load_file

    path = path or BUILTIN_WEIGHTS[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} needs its shipped weights {path}, which are missing from this installation; "
            f"regenerate them with: python -m lit_align.tiny_sft --model {name}"
        )
    state = load_file(str(path))
    if "lm_head.weight" not in state:  # save_pretrained leaves tied weights out; builtin models untie them
        raise ValueError(f"{path} is not a {name} state dict (no lm_head.weight)")
    return state
