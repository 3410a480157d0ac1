"""Reward functions with TRL's signature ``f(prompts, completions, completion_ids, **columns) -> list[float]``."""

from lit_align.rewards.arithmetic import arithmetic_format_reward, arithmetic_reward
from lit_align.rewards.gsm8k import gsm8k_reward
from lit_align.rewards.judges import OpenAIPairwiseJudge, PairwiseJudge, RewardJudge
from lit_align.rewards.length import LengthPenalty, SoftOverlongPunishment
from lit_align.rewards.model import RewardModelScorer
from lit_align.rewards.registry import compute_rewards, load_reward_func, reward_name
from lit_align.rewards.shapes import shapes_reward

__all__ = [
    "LengthPenalty",
    "OpenAIPairwiseJudge",
    "PairwiseJudge",
    "RewardJudge",
    "RewardModelScorer",
    "SoftOverlongPunishment",
    "arithmetic_format_reward",
    "arithmetic_reward",
    "compute_rewards",
    "gsm8k_reward",
    "load_reward_func",
    "reward_name",
    "shapes_reward",
]
