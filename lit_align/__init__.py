"""lit-align: alignment for language models as PyTorch Lightning modules."""

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
from lit_align.methods.kto import KTO
from lit_align.methods.orpo import ORPO
from lit_align.methods.prm import PRM
from lit_align.methods.reward import RewardModel
from lit_align.methods.sft import SFT
from lit_align.models.export import SaveHFModel
from lit_align.optim import LinearWarmupDecay

__all__ = [
    "BCO",
    "CPO",
    "DPO",
    "KTO",
    "ORPO",
    "PRM",
    "RewardModel",
    "SFT",
    "LanguageModelingDataModule",
    "LinearWarmupDecay",
    "PreferenceDataModule",
    "PromptCompletionDataModule",
    "PromptOnlyDataModule",
    "SaveHFModel",
    "StepwiseDataModule",
    "UnpairedPreferenceDataModule",
]
__version__ = "0.1.0"
