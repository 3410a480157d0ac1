"""Verifiable rewards for ``builtin:arithmetic``, with TRL's reward-function signature.

TRL calls ``reward_func(prompts=..., completions=..., **columns)``: prompts and
completions are strings (standard) or message lists (conversational), and every extra
dataset column (here ``answer``) arrives as a keyword list.
"""

from __future__ import annotations

import re
from typing import Any

from lit_align.data.arithmetic import parse_answer, solve

# The last line is "Answer: <int>" (trailing whitespace allowed, e.g. a final newline).
_FORMAT = re.compile(r"(?:\A|\n)Answer:[ \t]*-?\d+\s*\Z")


def _text(item: Any) -> str:
    """A string as is; for a message list, the content of its last message."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    raise TypeError(f"expected a string or a list of messages, got {type(item).__name__}")


def arithmetic_reward(
    prompts: list, completions: list, answer: list | None = None, **kwargs: Any
) -> list[float]:
    """1.0 where the completion's final ``Answer:`` equals the true answer, else 0.0.

    ``answer`` is the dataset column of the same name; when absent it is solved from the prompt.
    """
    if answer is None:
        answer = [solve(_text(p)) for p in prompts]
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    return [1.0 if parse_answer(_text(c)) == int(a) else 0.0 for c, a in zip(completions, answer)]


def arithmetic_format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 where the completion ends with a line ``Answer: <int>``, else 0.0."""
    return [1.0 if _FORMAT.search(_text(c)) else 0.0 for c in completions]
