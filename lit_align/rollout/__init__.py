"""Rollouts for the online methods: generation engines, the typed rollout, the rollout callback."""

from lit_align.rollout.callback import RolloutCallback
from lit_align.rollout.engines import GenerationEngine, Generations, HFEngine, SamplingParams, VLLMEngine
from lit_align.rollout.types import Rollout

__all__ = ["GenerationEngine", "Generations", "HFEngine", "Rollout", "RolloutCallback", "SamplingParams", "VLLMEngine"]
