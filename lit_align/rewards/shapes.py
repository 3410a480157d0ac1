"""The verifiable reward for ``builtin:shapes``, with TRL's reward-function signature.

TRL calls ``reward_func(prompts=..., completions=..., **columns)``: completions are strings or
message lists (the task is conversational, so usually ``[{"role": "assistant", "content": ...}]``
whose content is a string or a list of ``{"type": "text", "text": ...}`` parts), and the dataset's
``answer`` column arrives as a keyword list.
"""

from __future__ import annotations

import string
from typing import Any

_PUNCTUATION = string.punctuation


def _text(item: Any) -> str:
    """A string as is; for a message list, the text of its last message (string or text parts joined)."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        content = item[-1].get("content", "")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]; image parts have no text
            return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return str(content or "")
    raise TypeError(f"expected a string or a list of messages, got {type(item).__name__}")


def stated_answer(completion: Any) -> str:
    """What a completion answers: its first word, lower-cased, stripped of surrounding punctuation ("" if none).

    ``"Red."`` -> ``"red"``; ``" 3\\n"`` -> ``"3"``; ``"The squares are red"`` -> ``"the"`` (so it scores 0).
    """
    words = _text(completion).split()
    return words[0].strip(_PUNCTUATION).lower() if words else ""


def shapes_reward(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 where the completion's first word (see :func:`stated_answer`) is the ``answer``, else 0.0.

    ``answer`` is the dataset column of the same name (a palette colour, or a count as a digit).
    """
    if answer is None or len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {None if answer is None else len(answer)} answers "
                         "(shapes_reward needs the dataset's 'answer' column: use the prompt_only format)")
    return [1.0 if stated_answer(c) == str(a).strip().lower() else 0.0 for c, a in zip(completions, answer)]
