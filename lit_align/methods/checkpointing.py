"""Checkpoints that survive a kill, and interrupts that keep the work.

``AtomicCheckpointIO`` writes a checkpoint whole or not at all. ``SaveOnInterrupt`` turns the first
Ctrl-C into a stop at the end of the current step, agreed by every process, with a checkpoint
saved there; a second Ctrl-C quits at once. ``AlignModule`` installs both.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_align.models.export import QuitNow, is_interrupt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing a checkpoint whole or not at all: to a temporary file
    in the same directory, then renamed over the target. A run killed while saving leaves the
    previous ``last.ckpt`` intact instead of a truncated one that cannot be resumed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's own writer (Path would fold the "//")
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


class SaveOnInterrupt(L.Callback):
    """Ctrl-C or SIGTERM during a fit saves ``last.ckpt`` (next to the other checkpoints, else under
    ``default_root_dir/checkpoints``) and says where to resume from.

    The first Ctrl-C lets the current step finish; at its end every process agrees to stop (one
    all-reduce of a flag per step, under DDP), they save the checkpoint together, and the run
    exits as Lightning exits on Ctrl-C (exit code 1, ``SaveHFModel`` exporting on the way out). The
    checkpoint sits at a step boundary, so resuming from it continues the same curve. A second
    Ctrl-C quits at once, saving and exporting nothing (the atomic writer leaves the previous
    checkpoint whole). SIGTERM, which Lightning hands to every process, saves where it lands.
    """

    def __init__(self) -> None:
        self.requested = False
        self.saved = False
        self._previous: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.requested = self.saved = False
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise QuitNow
        self.requested = True
        if rank_zero_only.rank == 0:  # print, not logging: a handler may run while logging holds its lock
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop = self.requested
        if trainer.world_size > 1:  # a Ctrl-C may reach one process only (kill -INT): stop them all
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.save(trainer)
            raise KeyboardInterrupt  # Lightning's shutdown for Ctrl-C: on_exception hooks, exit code 1

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (is_interrupt(exception) and trainer.state.fn == "fit" and trainer.global_step > 0) or self.saved:
            return
        if isinstance(exception, KeyboardInterrupt):
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores a second Ctrl-C
            if self._previous is not None or trainer.world_size > 1:
                # Raised mid-step outside our handler (or on one rank of several): the saving
                # collectives could wait on a process that is elsewhere.
                return
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        directory = getattr(trainer.checkpoint_callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(directory, "last.ckpt")
        trainer.save_checkpoint(path)
        self.saved = True
        rank_zero_info(f"Interrupted at step {trainer.global_step}: saved a checkpoint to {path}; resume with --ckpt_path {path}")
