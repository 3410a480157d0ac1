"""Writing the trained policy as a Hugging Face model directory.

``AutoModelForCausalLM.from_pretrained(dirpath)`` loads the result, and its tokenizer
sits beside it. LoRA adapters are merged into a copy of the weights on request (the
training model is left as it is), or saved as an adapter directory otherwise.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_align.ops.sharding import full_state_dict, is_sharded


def save_hf_model(model: torch.nn.Module, tokenizer, dirpath: str | os.PathLike, merge_lora: bool = True,
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save ``model`` (a transformers model, or a PEFT model) and ``tokenizer`` (or a vision-language
    model's processor: its tokenizer and image processor) to ``dirpath``; ``state_dict``: the weights to
    write instead of the model's own (an FSDP2-sharded model's, gathered whole by
    :func:`~lit_align.ops.sharding.full_state_dict`)."""
    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = copy.deepcopy(model).cpu().merge_and_unload()
    model.save_pretrained(path, **({} if state_dict is None else {"state_dict": state_dict}))
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

    def _dirpath(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "hf_model")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:  # before the model loads, not after training
            check_writable(self._dirpath(trainer), "SaveHFModel's dirpath")

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str, state_dict=None) -> None:
        processor = getattr(pl_module, "processor", None)  # a VLM's: saved with its tokenizer
        self.saved_to = save_hf_model(pl_module.model, processor or pl_module.tokenizer, self._dirpath(trainer), self.merge_lora,
                                      state_dict)
        rank_zero_info(f"{what} {self.saved_to}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # FSDP2 (ModelParallelStrategy): every rank gathers the shards, rank 0 writes the whole weights.
        state = full_state_dict(pl_module.model) if is_sharded(pl_module.model) else None
        if trainer.is_global_zero:
            self.export(trainer, pl_module, "Saved the policy as a Hugging Face model directory:", state)
        trainer.strategy.barrier("lit_align_save_hf_model")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Ctrl-C or SIGTERM: the weights trained so far are exported (rank 0 holds them under DDP). Sharded
        # weights would need every rank to gather them, which an interrupted run cannot count on; the
        # checkpoint that SaveOnInterrupt writes holds them.
        if is_interrupt(exception) and trainer.global_step > 0 and trainer.is_global_zero:
            if is_sharded(pl_module.model):
                rank_zero_warn("Interrupted: the policy is sharded (FSDP2), so SaveHFModel writes no Hugging Face directory; "
                               "the interrupt checkpoint holds its weights")
                return
            self.export(trainer, pl_module, f"Interrupted at step {trainer.global_step}: saved the policy so far to")


class QuitNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, saving and exporting nothing more."""


def is_interrupt(exception: BaseException) -> bool:
    """Ctrl-C (KeyboardInterrupt) or SIGTERM as Lightning reports it, whose work is worth saving."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and not isinstance(exception, QuitNow)


def check_writable(dirpath: str | os.PathLike, what: str) -> None:
    """Create ``dirpath`` and write a file in it, or say plainly that outputs could not be saved there."""
    path = Path(dirpath)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lit-align-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(
            f"{what} {str(path)!r} is not writable ({err.strerror or err}); the run would train and then lose "
            "what it saves there. Choose a directory you can write to"
        ) from err


def check_disk_space(dirpath: str | os.PathLike, needed: int, what: str) -> None:
    """Stop before training when ``dirpath``'s file system has less than ``needed`` bytes free."""
    path = Path(dirpath).absolute()
    while not path.exists() and path != path.parent:  # not created yet: its nearest existing parent
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(
            f"{what} {str(dirpath)!r} has {free / 2**30:.2f} GiB free, and one save needs about "
            f"{needed / 2**30:.2f} GiB; the run would train and then fail to save. Free some space or choose another directory"
        )
