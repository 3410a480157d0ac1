"""Writing the trained policy as a Hugging Face model directory.

``AutoModelForCausalLM.from_pretrained(dirpath)`` loads the result, and its tokenizer
sits beside it. LoRA adapters are merged into a copy of the weights on request (the
training model is left as it is), or saved as an adapter directory otherwise.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


def save_hf_model(model: torch.nn.Module, tokenizer, dirpath: str | os.PathLike, merge_lora: bool = True) -> Path:
    """Save ``model`` (a transformers model, or a PEFT model) and ``tokenizer`` to ``dirpath``."""
    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = copy.deepcopy(model).cpu().merge_and_unload()
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


class SaveHFModel(L.Callback):
    """At the end of ``fit``, write the policy as a Hugging Face directory (rank 0 only).

    Args:
        dirpath: Where to write it; default ``<trainer.default_root_dir>/hf_model``.
        merge_lora: Merge LoRA adapters into the base weights (a plain model directory); if
            False a LoRA run leaves an adapter directory (``peft.AutoPeftModelForCausalLM`` loads it).
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        self.dirpath = dirpath
        self.merge_lora = merge_lora
        self.saved_to: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "hf_model")
        if trainer.is_global_zero:
            self.saved_to = save_hf_model(pl_module.model, pl_module.tokenizer, dirpath, self.merge_lora)
            rank_zero_info(f"Saved the policy as a Hugging Face model directory: {self.saved_to}")
        trainer.strategy.barrier("lit_align_save_hf_model")
