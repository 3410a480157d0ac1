"""Length-shaping rewards (they read ``completion_ids``, so they work for any task)."""

from __future__ import annotations

from typing import Any


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (TRL's ``get_soft_overlong_punishment``).

    0 up to ``max_completion_len - soft_punish_cache`` tokens, then falling linearly to -1 at
    ``max_completion_len``, and -1 beyond it (``soft_punish_cache=0``: a hard step at the limit).
    """

    def __init__(self, max_completion_len: int, soft_punish_cache: int) -> None:
        if not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(
                f"need 0 <= soft_punish_cache <= max_completion_len, got {soft_punish_cache=} {max_completion_len=}"
            )
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache
        self.__name__ = "soft_overlong_punishment_reward"  # TRL's name, so metric keys match

    def __call__(self, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        free = self.max_completion_len - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            n = len(ids)
            if n <= free:
                rewards.append(0.0)
            elif n <= self.max_completion_len:
                rewards.append((free - n) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards


class LengthPenalty:
    """``-coef * len(completion) / max_length``: a linear cost per completion token."""

    def __init__(self, max_length: int, coef: float = 1.0) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.coef = coef
        self.__name__ = "length_penalty"

    def __call__(self, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [-self.coef * len(ids) / self.max_length for ids in completion_ids]
