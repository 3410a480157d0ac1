"""Nothing lost: what every method does so that a run can be stopped, resumed and trusted.

- ``AtomicCheckpointIO`` writes a checkpoint whole or not at all;
- ``SaveOnInterrupt`` turns the first Ctrl-C into a stop at the end of the current step, agreed by
  every process, with a checkpoint saved there; a second Ctrl-C quits at once;
- ``Safeguards``, a base of ``AlignModule``: output directories and disk space checked before
  training, non-finite losses and gradients caught at their step (or the step skipped), every
  rank's random generators in the checkpoint, validation kept off training's random streams.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

from lit_align.models.export import QuitNow, SaveHFModel, check_disk_space, check_writable, is_interrupt
from lit_align.ops.state import all_ranks, own, rng_state, set_rng_state


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


class Safeguards(L.LightningModule):
    """The hooks of :class:`~lit_align.methods.base.AlignModule` that keep a run's work: preflight
    checks, non-finite values (its ``nonfinite`` argument), exact resumption. It reads the
    module's ``nonfinite``, ``skipped_steps`` and ``num_tokens_seen``."""

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default (sharded strategies keep theirs)
            strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and trainer.is_global_zero:  # every output place, before the model loads
            check_writable(trainer.default_root_dir, "The trainer's default_root_dir")
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "dirpath", None):
                    check_writable(callback.dirpath, f"{type(callback).__name__}'s dirpath")
            for logger in trainer.loggers:
                if getattr(logger, "save_dir", None):
                    check_writable(logger.save_dir, f"{type(logger).__name__}'s save_dir")

    def on_fit_start(self) -> None:
        """Disk space for one checkpoint (weights, optimizer moments) and one export, before step 1."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        weights = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        trained = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
        moments = 2 * trained  # Adam's two moments
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                needed = weights if getattr(callback, "save_weights_only", False) else weights + moments
                check_disk_space(callback.dirpath, needed, f"{type(callback).__name__}'s dirpath")
        for callback in trainer.callbacks:
            if isinstance(callback, SaveHFModel):
                check_disk_space(callback._dirpath(trainer), weights, "SaveHFModel's dirpath")

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks every method brings (subclasses add theirs to this list)."""
        return [SaveOnInterrupt()]

    # -- non-finite values stop the run at the step they appear, saying what and where (or skip the step) --
    def on_before_backward(self, loss: Tensor) -> None:
        if torch.isfinite(loss).all():
            return
        if self.nonfinite == "skip":  # the optimizer step this loss feeds is skipped (on_before_optimizer_step)
            self._nonfinite_loss = True
            return
        raise FloatingPointError(
            f"{type(self).__name__}: the training loss is {loss.item()} at step {self.trainer.global_step} "
            f"(epoch {self.trainer.current_epoch}); nothing was trained on it. Look for a learning rate "
            "that is too high, a data value that is not finite, or a reward that is not; or set nonfinite: skip"
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # fp16 loss scaling: inf gradients are expected, and the scaler skips them
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if self.nonfinite == "skip":
            # Gradients are already averaged over devices; a loss flag is per device: agree on it.
            flag = torch.tensor(float(self._nonfinite_loss or not finite), device=self.device)
            self._nonfinite_loss = False
            if self.global_reduce(flag, "max").item() > 0:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None  # the optimizer leaves parameters without a gradient untouched
                self.skipped_steps += 1
                rank_zero_warn(f"{type(self).__name__}: a non-finite loss or gradient at step {self.trainer.global_step}; "
                               f"the step was skipped ({self.skipped_steps} so far)")
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, sync_dist=False)
            return
        if not finite:
            bad = [n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise FloatingPointError(
                f"{type(self).__name__}: gradients are not finite at step {self.trainer.global_step} "
                f"({len(bad)} parameters, first {bad[:3]}); the optimizer step was not taken. Look for a "
                "learning rate that is too high or a loss that overflows in this precision; or set nonfinite: skip"
            )

    # -- exact resumption: the checkpoint holds every rank's random generators, put back when training
    # resumes, so a resumed run samples and drops out as the uninterrupted one. ----------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_align"] = {
            "num_tokens_seen": self.num_tokens_seen, "skipped_steps": self.skipped_steps, "rng": all_ranks(rng_state()),
        }
        if self.trainer.is_global_zero:  # the runs the loggers write, continued by `lit-align fit --ckpt_path`
            checkpoint["lit_align"]["loggers"] = [
                {"class": type(logger).__name__, "version": logger.version} for logger in self.trainer.loggers
            ]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_align", {})
        self.num_tokens_seen = state.get("num_tokens_seen", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self._rng_to_restore = own(state.get("rng"))

    def on_validation_start(self) -> None:
        # Validation inside a fit must not move training's random streams (sampled completions, a
        # loader's seed draw): else a run resumed from a checkpoint saved just before a validation
        # would sample differently from the uninterrupted run.
        self._rng_before_validation = rng_state() if self.trainer.state.fn == "fit" else None

    def on_validation_end(self) -> None:
        if getattr(self, "_rng_before_validation", None) is not None:
            set_rng_state(self._rng_before_validation)
            self._rng_before_validation = None

    def on_train_start(self) -> None:
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        bar = self.trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar) and self.trainer.max_epochs == -1:
            # Bounded by max_steps alone, Lightning's rich bar reads "Epoch 0/-2": show the epoch alone.
            bar._get_train_description = lambda epoch: f"Epoch {epoch}"
