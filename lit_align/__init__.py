"""lit-align: alignment for language models as PyTorch Lightning modules."""

from lit_align.allocator import keep_freed_memory
from lit_align.data.formats import (
    LanguageModelingDataModule,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    StepwiseDataModule,
    UnpairedPreferenceDataModule,
)
from lit_align.methods.bco import BCO
from lit_align.methods.cpo import CPO
from lit_align.methods.dpo import DPO
from lit_align.methods.gkd import GKD
from lit_align.methods.grpo import GRPO
from lit_align.methods.kto import KTO
from lit_align.methods.nash_md import NashMD
from lit_align.methods.online_dpo import OnlineDPO
from lit_align.methods.orpo import ORPO
from lit_align.methods.ppo import PPO
from lit_align.methods.prm import PRM
from lit_align.methods.reward import RewardModel
from lit_align.methods.rloo import RLOO
from lit_align.methods.sft import SFT
from lit_align.methods.xpo import XPO
from lit_align.models.export import SaveHFModel
from lit_align.optim import LinearWarmupDecay
from lit_align.rollout.callback import RolloutCallback

__all__ = [
    "BCO",
    "CPO",
    "DPO",
    "GKD",
    "GRPO",
    "KTO",
    "NashMD",
    "OnlineDPO",
    "ORPO",
    "PPO",
    "PRM",
    "RLOO",
    "RewardModel",
    "SFT",
    "XPO",
    "LanguageModelingDataModule",
    "LinearWarmupDecay",
    "PreferenceDataModule",
    "PromptCompletionDataModule",
    "PromptOnlyDataModule",
    "RolloutCallback",
    "SaveHFModel",
    "StepwiseDataModule",
    "UnpairedPreferenceDataModule",
    "keep_freed_memory",
]
__version__ = "0.1.0"
