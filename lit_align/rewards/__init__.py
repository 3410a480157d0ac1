"""Reward functions with TRL's signature ``f(prompts, completions, **columns) -> list[float]``."""

from lit_align.rewards.arithmetic import arithmetic_format_reward, arithmetic_reward
from lit_align.rewards.model import RewardModelScorer

__all__ = ["RewardModelScorer", "arithmetic_format_reward", "arithmetic_reward"]
