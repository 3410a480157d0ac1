"""A verifiable reward for GSM8K-style answers (a number), written for multi-turn tool rollouts.

TRL's ``accuracy_reward`` reads ``completion[0]``: with tools that is the model's first turn, the one that
calls a tool, not its answer. Here the answer is read from the **last** assistant message (TRL's agent
example reads ``completion[-1]``), and a rollout whose last turn still calls a tool has not answered.

The gold answer is the number after ``####`` (``openai/gsm8k``'s ``answer`` column) or the column's number
itself (``allenai/RLVR-GSM``'s ``ground_truth``). The model's answer is, in order of preference, its last
``\\boxed{...}``, its last ``#### ...``, or the last number it wrote (the Tulu 3 / open-instruct GSM8K
verifier's rule). Numbers compare by value: ``1,000``, ``$1000`` and ``1000.00`` are all 1000.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d+(?:\.\d+)?|\.\d+)")  # not the digits of a name (x2), nor 10-2's "-2"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
_HASHES = re.compile(r"####\s*([^\n]*)")


def parse_number(text: str | None) -> Decimal | None:
    """The last number in ``text`` (thousands separators allowed), or None."""
    if not text:
        return None
    text = text.replace("{,}", ",").replace("\\,", ",")  # LaTeX thousands separators: 1{,}000, 1\,000
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
    if not numbers:
        return None
    try:
        return Decimal(numbers[-1])
    except InvalidOperation:
        return None


def gold_number(answer: Any) -> Decimal | None:
    """The gold number of a dataset answer: what follows the last ``####``, else the whole value."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return Decimal(str(answer))
    if not isinstance(answer, str):
        return None
    marked = _HASHES.findall(answer)
    return parse_number(marked[-1] if marked else answer)


def final_answer_text(completion: Any) -> str | None:
    """The text of a completion's final answer: a string as it is; for messages, the content of the last
    assistant message, or None when that message still calls a tool. Reasoning up to ``</think>`` is
    left out."""
    if isinstance(completion, str):
        text = completion
    elif isinstance(completion, list):
        assistant = [m for m in completion if isinstance(m, dict) and m.get("role") in ("assistant", None)]
        last = assistant[-1] if assistant else None
        if last is None or last.get("tool_calls"):
            return None
        content = last.get("content")
        if isinstance(content, list):  # content blocks
            content = "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        text = content if isinstance(content, str) else ""
    else:
        raise TypeError(f"expected a string or a list of messages, got {type(completion).__name__}")
    return text.rsplit("</think>", 1)[-1]


def predicted_number(text: str | None) -> Decimal | None:
    """The model's answer in ``text``: its last ``\\boxed{}``, else its last ``####``, else its last
    number."""
    if not text:
        return None
    for pattern in (_BOXED, _HASHES):
        marked = pattern.findall(text)
        if marked and (value := parse_number(marked[-1])) is not None:
            return value
    return parse_number(text)


def gsm8k_reward(completions: list, answer: list, log_extra: Any = None, **kwargs: Any) -> list[float | None]:
    """1.0 where the final answer equals the gold number, else 0.0; None where the gold has no number.

    Args:
        completions: Strings, or message lists (a tool rollout's assistant and tool turns).
        answer: The dataset's answer column (``#### 42`` or ``42``); map another name to it with the data
            module's ``column_mapping`` (e.g. ``{ground_truth: answer}``).
        log_extra: TRL's hook for extra completions-table columns (the trainer passes it).
    """
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    golds = [gold_number(a) for a in answer]
    preds = [predicted_number(final_answer_text(c)) for c in completions]
    rewards = [None if g is None else float(p is not None and p == g) for p, g in zip(preds, golds)]
    if log_extra is not None:
        log_extra("gold_answer", ["" if g is None else str(g) for g in golds])
        log_extra("parsed_answer", ["" if p is None else str(p) for p in preds])
    return rewards
