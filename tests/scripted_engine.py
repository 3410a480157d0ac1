"""A deterministic generation engine for tests: completions are a function of the prompt text.

Completion ``j`` of the ``c``-th call answers ``solve(prompt) + ((j + c - 1) % 2)`` (so half of
each group is right and rewards have spread, and successive single samples alternate between
right and wrong) followed by ``j % 3`` spaces (so lengths differ within and across ranks), then EOS. Prompts on different ranks get different lengths, and two processes see
exactly the completions one process sees.
"""

from __future__ import annotations

import re

import torch

from lit_align.data.arithmetic import solve
from lit_align.rollout.engines import Generations, completion_mask, eos_ids, right_pad


class ScriptedEngine:
    samples_any_model = True  # its completions answer the prompt, whichever model is asked

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def connect(self, tokenizer) -> None:
        if self.tokenizer is None:
            self.tokenizer = tokenizer

    def generate(self, model, prompt_ids, prompt_mask, sampling) -> Generations:
        self.calls += 1
        tok = self.tokenizer
        rows = []
        for p, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            answer = solve(tok.decode([t for t, k in zip(p, m) if k], skip_special_tokens=True))
            for j in range(sampling.num_generations):
                text = f"Answer: {answer + (j + self.calls - 1) % 2}" + " " * (j % 3)
                rows.append((tok(text)["input_ids"] + [tok.eos_token_id])[: sampling.max_completion_length])
        ids = right_pad(rows, tok.pad_token_id, device=prompt_ids.device)
        mask, truncated = completion_mask(ids, eos_ids(tok))
        n = sampling.num_generations
        return Generations(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids, mask, truncated)

    def sync_weights(self, model) -> None:
        pass


TOOL_TEMPLATE = (  # a small chat template that renders tools, tool calls and tool turns (hermes style)
    "{%- if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def broken(a: int) -> int:
    """Always fails.

    Args:
        a: Anything.
    """
    raise RuntimeError("no luck")


class ToolCaller:
    """A policy for multi-turn tests: calls ``call`` while its context holds no tool result, then
    answers: ``answer``, or else the question's answer, off by one on every other answer (rewards with
    spread)."""

    samples_any_model = True

    def __init__(self, call: str = '{"name": "add", "arguments": {"a": 2, "b": 3}}', answer: str | None = None) -> None:
        self.tokenizer, self.call, self.answer, self.contexts, self.answered = None, call, answer, [], 0

    def connect(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def generate(self, model, prompt_ids, prompt_mask, sampling) -> Generations:
        tok, rows = self.tokenizer, []
        for p, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            context = tok.decode([t for t, k in zip(p, m) if k])
            self.contexts.append(context)
            text = f"<tool_call>{self.call}</tool_call>"
            if "<|im_start|>tool" in context:
                question = re.search(r"Compute [^.]*\.", context)
                text = self.answer or f"Answer: {solve(question.group(0)) + self.answered % 2}"
                self.answered += 1
            for _ in range(sampling.num_generations):
                rows.append((tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: sampling.max_completion_length])
        ids = right_pad(rows, tok.pad_token_id, device=prompt_ids.device)
        mask, truncated = completion_mask(ids, eos_ids(tok))
        n = sampling.num_generations
        return Generations(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids, mask, truncated,
                           torch.full(ids.shape, -0.5) * mask)

    def sync_weights(self, model) -> None:
        pass
