"""Vision-language models: the embedded ``builtin:tiny-vlm`` and what lit-align needs of any VLM.

``builtin:tiny-vlm`` is a LLaVA (``LlavaForConditionalGeneration``): a one-layer CLIP vision
tower over 32x32 images in 8x8 patches and a two-layer projector, drawn from seed 0 on every
call, in front of ``builtin:tiny-sft``'s shipped Llama (which already writes ChatML replies, so
a couple of minutes of training go to learning to look, not to learning the template). Its processor is transformers' own
``LlavaProcessor`` (a CLIP image processor and the byte tokenizer with an ``<image>`` token), so
everything lit-align does with it is what it does with a Hub VLM of that family: each ``<image>``
of a rendered conversation becomes 16 image tokens (one per patch), whose positions the model
fills with the projected patch features.

A Hub or local VLM (Qwen2-VL, Gemma 3, LLaVA, ...) is one whose config has a ``vision_config``;
it loads through ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from lit_align.models.builtin import ASSETS, BUILTIN_MODELS, builtin_model, builtin_tokenizer, shipped_weights

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8

# ChatML as builtin:tiny's, with content that is a string or a list of parts (TRL's vision rows):
# an image part renders as the image token, a text part as its text.
VLM_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- render(message['content']) -}}{{- '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

VLM_MODELS = ("builtin:tiny-vlm", "builtin:tiny-vlm-sft")
# builtin:tiny-vlm fine-tuned on builtin:shapes demonstrations of which 30% name a wrong colour
# (assets/tiny-vlm-sft.yaml; python -m lit_align.tiny_sft --model builtin:tiny-vlm-sft): the warm
# start of configs/grpo_vlm.yaml, which names a colour and samples the right one about half the time.
VLM_WEIGHTS = {"builtin:tiny-vlm-sft": ASSETS / "tiny-vlm-sft.safetensors"}


def is_builtin_vlm(name: str) -> bool:
    return name in VLM_MODELS


def is_vision_config(config: PretrainedConfig) -> bool:
    """A config of an image-text-to-text model (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def tiny_vlm_tokenizer() -> PreTrainedTokenizerBase:
    """builtin:tiny's byte tokenizer with ``<image>`` (id 260, inside the tiny Llama's 264 rows)
    and the template above."""
    tok = builtin_tokenizer("builtin:tiny")
    tok.add_special_tokens({"extra_special_tokens": [*tok.extra_special_tokens, IMAGE_TOKEN]})
    tok.chat_template = VLM_CHAT_TEMPLATE
    return tok


def tiny_vlm_processor() -> LlavaProcessor:
    from transformers import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tiny_vlm_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=VLM_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
    )


def tiny_vlm_config() -> LlavaConfig:
    tok = tiny_vlm_tokenizer()
    text = dict(BUILTIN_MODELS["builtin:tiny"])
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config={"model_type": "llama", **text},
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, tie_word_embeddings=False,
    )
    assert config.image_token_id < text["vocab_size"]
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def tiny_vlm(dtype: torch.dtype = torch.float32, name: str = "builtin:tiny-vlm") -> LlavaForConditionalGeneration:
    """builtin:tiny-vlm, identical on every call, in eval mode: the vision tower and projector from seed 0,
    the language model builtin:tiny-sft's; or ``builtin:tiny-vlm-sft`` with its shipped weights. The
    global RNG state is left untouched."""
    config = tiny_vlm_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
        # The projector's output layer starts at zero: image tokens enter the language model as zero
        # vectors, so the warm-started model first answers as builtin:tiny-sft would and then learns to look.
        torch.nn.init.zeros_(model.model.multi_modal_projector.linear_2.weight)
        torch.nn.init.zeros_(model.model.multi_modal_projector.linear_2.bias)
    language = builtin_model("builtin:tiny-sft")
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(language.lm_head.state_dict(), strict=True)
    if name in VLM_WEIGHTS:
        model.load_state_dict(shipped_weights(name, VLM_WEIGHTS[name]), strict=True)
    model.to(dtype)
    text = config.text_config
    model.generation_config = GenerationConfig(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, bos_token_id=None)
    return model.eval()
