"""Tokenization rules of TRL (``docs/methods.md`` §2, §16), one small function per case.

- Standard text: EOS is appended to the text or the completion when missing.
- Conversational rows go through the tokenizer's chat template; a prompt is rendered
  with the generation prompt whatever its last turn, as every TRL 1.16 trainer does
  (a prompt ending on an assistant turn is followed by a new assistant turn).
- The completion starts where the tokenized prompt and the tokenized prompt+completion
  first differ (the *token* common prefix), which is not always the end of the prompt;
  a one-time warning says so when it is not.
- CPO and ORPO (TRL's legacy ``tokenize_row``) also put the tokenizer's BOS token before a
  prompt that does not start with it (:func:`add_bos`), even when the tokenizer does not
  add it itself; the other methods tokenize as TRL's DPO does, without that rule.
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

from transformers import PreTrainedTokenizerBase

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def is_conversational(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def supports_assistant_mask(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the chat template marks assistant turns with ``{% generation %}``."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and "generation" in template and "endgeneration" in template


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], row: dict, **kwargs) -> dict:
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    extra = row.get("chat_template_kwargs") or {}
    derive = kwargs.get("return_assistant_tokens_mask") and not supports_assistant_mask(tokenizer)
    if derive:
        kwargs.pop("return_assistant_tokens_mask")
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, **extra, **kwargs
    )
    out = {k: list(v) for k, v in out.items() if k in ("input_ids", "assistant_masks")}
    if derive:
        warn_once("derived-assistant-mask", "the chat template has no {% generation %} markers: assistant turns are "
                  "found by rendering the conversation turn by turn (for assistant_only_loss)")
        render = functools.partial(_chat, tokenizer, row=row, **kwargs)
        out["assistant_masks"] = derived_assistant_mask(render, messages, out["input_ids"], tokenizer.eos_token_id)
    return out


def derived_assistant_mask(render, messages: list[dict], ids: list[int], eos_token_id: int | None) -> list[int]:
    """The assistant tokens of the rendered conversation ``ids``, for a chat template without
    ``{% generation %}`` markers. Assistant turn ``i`` spans from the end of the conversation before
    it rendered with the generation prompt to the end of the conversation through it, up to its last
    EOS token (the template's line breaks after a turn are not the model's to write). ``render``:
    ``(messages, add_generation_prompt=...) -> {"input_ids": ...}``."""
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(render(messages[:i], add_generation_prompt=True)["input_ids"]) if i else 0
        through = render(messages[: i + 1])["input_ids"]
        if ids[: len(through)] != through or start > len(through):
            raise ValueError(
                f"assistant_only_loss: the chat template renders the conversation before turn {i} differently once "
                "later turns follow, so the assistant tokens cannot be found by rendering turn by turn; give a "
                "template that marks assistant turns with {% generation %} (chat_template_path)"
            )
        end = len(through)
        if eos_token_id is not None and eos_token_id in through[start:end]:
            end = start + max(j for j, t in enumerate(through[start:end]) if t == eos_token_id) + 1
        mask[start:end] = [1] * (end - start)
    return mask


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], row: dict) -> list[int]:
    """Token ids of a prompt alone, as the model sees it before it answers."""
    if not is_conversational(prompt):
        return list(tokenizer(prompt)["input_ids"])
    return _chat(tokenizer, prompt, row, add_generation_prompt=True)["input_ids"]


def add_eos(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    eos = tokenizer.eos_token
    return text if eos is None or text.endswith(eos) else text + eos


def add_bos(prompt_ids: list[int], bos_token_id: int | None) -> list[int]:
    """``prompt_ids`` with ``bos_token_id`` in front unless they already start with it: TRL's
    ``add_bos_token_if_needed`` (CPO, ORPO). An empty prompt gets it too; a tokenizer without a
    BOS token (``bos_token_id`` None) leaves the prompt as it is."""
    if bos_token_id is None or (prompt_ids and prompt_ids[0] == bos_token_id):
        return list(prompt_ids)
    return [bos_token_id, *prompt_ids]


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase, text: str | list[dict], row: dict, assistant_mask: bool
) -> dict[str, list[int]]:
    """A whole document (language modeling): every token is a target."""
    if is_conversational(text):
        out = _chat(tokenizer, text, row, return_assistant_tokens_mask=assistant_mask)
    else:
        out = {"input_ids": list(tokenizer(add_eos(text, tokenizer))["input_ids"])}
    seq = {"input_ids": out["input_ids"], "completion_mask": [1] * len(out["input_ids"])}
    if "assistant_masks" in out:
        seq["assistant_mask"] = out["assistant_masks"]
    return seq


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict],
    completion: str | list[dict],
    row: dict,
    assistant_mask: bool = False,
) -> dict[str, list[int]]:
    """Prompt followed by completion; ``completion_mask`` marks the completion's tokens."""
    prompt_ids = render_prompt(tokenizer, prompt, row)
    if is_conversational(prompt):
        full = _chat(tokenizer, prompt + completion, row, return_assistant_tokens_mask=assistant_mask)
    else:
        full = {"input_ids": list(tokenizer(prompt + add_eos(completion, tokenizer))["input_ids"])}
    ids = full["input_ids"]
    n = common_prefix_length(prompt_ids, ids)
    if n < len(prompt_ids):
        warn_once(
            "prefix",
            "The tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template "
            "renders the prompt alone differently, or tokens merge across the boundary); the completion "
            f"starts where they diverge and this end of the prompt is left out: "
            f"{tokenizer.decode(prompt_ids[n:])!r}",
        )
    seq = {"input_ids": ids, "completion_mask": [0] * n + [1] * (len(ids) - n)}
    if "assistant_masks" in full:
        seq["assistant_mask"] = full["assistant_masks"]
    return seq


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict],
    chosen: str | list[dict],
    rejected: str | list[dict],
    row: dict,
    bos: bool = False,
) -> list[dict[str, list[int]]]:
    """Prompt+chosen and prompt+rejected, their completions starting at the same token (TRL DPO:
    the shorter of the two common prefixes with the tokenized prompt). ``bos``: the prompt part
    gets the tokenizer's BOS token when it does not start with it (:func:`add_bos`, TRL's
    CPO/ORPO), and the completions start one token later."""
    prompt_ids = render_prompt(tokenizer, prompt, row)
    fulls = []
    for completion in (chosen, rejected):
        if is_conversational(prompt):
            fulls.append(_chat(tokenizer, prompt + completion, row)["input_ids"])
        else:
            fulls.append(list(tokenizer(prompt + add_eos(completion, tokenizer))["input_ids"]))
    n = min(common_prefix_length(prompt_ids, ids) for ids in fulls)
    if n < len(prompt_ids):
        warn_once(
            "prefix",
            "The tokenized prompt is not a prefix of the tokenized prompt+completion; the completions start "
            f"where they diverge and this end of the prompt is left out: {tokenizer.decode(prompt_ids[n:])!r}",
        )
    if bos:  # both sequences share their first n tokens: one prompt, one decision
        prompt = add_bos(fulls[0][:n], tokenizer.bos_token_id)
        fulls, n = [prompt + ids[n:] for ids in fulls], len(prompt)
    return [{"input_ids": ids, "completion_mask": [0] * n + [1] * (len(ids) - n)} for ids in fulls]


def tokenize_steps(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    steps: list[str],
    labels: list[bool],
    separator: str,
) -> dict[str, list[int]]:
    """Prompt then each step followed by ``separator``; a step's label sits on its last token."""
    ids = list(tokenizer(prompt)["input_ids"])
    completion_mask = [0] * len(ids)
    step_labels = [-100] * len(ids)
    for step, label in zip(steps, labels):
        step_ids = list(tokenizer(step + separator, add_special_tokens=False)["input_ids"])
        ids += step_ids
        completion_mask += [1] * len(step_ids)
        step_labels += [-100] * (len(step_ids) - 1) + [int(label)]
    return {"input_ids": ids, "completion_mask": completion_mask, "step_labels": step_labels}


def truncate(seq: dict[str, list[int]], max_length: int, mode: str = "keep_start") -> dict[str, list[int]]:
    """Cut every token field of a sequence to ``max_length`` (``keep_start`` or ``keep_end``)."""
    if mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {mode!r}")
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return {k: v[cut] for k, v in seq.items()}
