"""lit-align: alignment for language models as PyTorch Lightning modules."""

from lit_align.data.formats import (
    LanguageModelingDataModule,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    StepwiseDataModule,
    UnpairedPreferenceDataModule,
)
from lit_align.methods.cpo import CPO
from lit_align.methods.dpo import DPO
from lit_align.methods.orpo import ORPO
from lit_align.methods.sft import SFT
from lit_align.models.export import SaveHFModel
from lit_align.optim import LinearWarmupDecay

__all__ = [
    "CPO",
    "DPO",
    "ORPO",
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
