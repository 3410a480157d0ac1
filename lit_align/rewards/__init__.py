"""Reward functions with TRL's signature ``f(prompts, completions, **columns) -> list[float]``."""

from lit_align.rewards.arithmetic import arithmetic_format_reward, arithmetic_reward

__all__ = ["arithmetic_format_reward", "arithmetic_reward"]
