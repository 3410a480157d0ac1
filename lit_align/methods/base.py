"""What every method shares: building the policy, optimizers, token-count bookkeeping, logging.

A method subclasses :class:`AlignModule`, sets ``default_lr`` (TRL's default learning
rate for it) and writes ``training_step``/``validation_step`` from ``ops`` and ``losses``.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.methods.checkpointing import AtomicCheckpointIO, SaveOnInterrupt
from lit_align.models.export import SaveHFModel, check_disk_space, check_writable
from lit_align.models.loading import apply_lora, load_causal_lm, load_tokenizer
from lit_align.ops.state import all_ranks, own, rng_state, set_rng_state
from lit_align.optim import LinearWarmupDecay


class AlignModule(L.LightningModule):
    """Base class of the lit-align methods (not used directly)."""

    default_lr: ClassVar[float] = 1e-6
    disable_dropout_default: ClassVar[bool] = True  # TRL: True for DPO/KTO/Reward/CPO/ORPO/OnlineDPO/GKD
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    # Frozen models loaded from their own path (reference, teacher): kept out of checkpoints.
    frozen_submodules: ClassVar[tuple[str, ...]] = ()
    add_bos_to_prompt: ClassVar[bool] = False  # TRL's CPO/ORPO put the tokenizer's BOS before every prompt

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny",
        dtype: str = "float32",
        attn_implementation: str | None = None,
        peft: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool | None = None,
        chunk_size: int = 1024,
        nonfinite: Literal["error", "skip"] = "error",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: The policy: a Hub id, a local Hugging Face model directory, or an
                embedded model (``builtin:tiny``). Its tokenizer is the data's tokenizer.
            dtype: Weights dtype: ``float32`` (TRL's default), ``bfloat16``, ``float16`` or ``auto``.
            attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``... (None: transformers' default).
            peft: LoRA settings as ``peft.LoraConfig`` fields (for example ``{r: 16, lora_alpha: 32}``),
                or None to train every weight.
            gradient_checkpointing: Recompute activations in backward (less memory, about 30% slower).
            disable_dropout: Set every dropout probability of the policy to 0 (None: the method's TRL
                default, on for preference methods, off for SFT/GRPO/RLOO).
            chunk_size: Tokens per block of the chunked LM-head log-prob op (memory is ``chunk_size x vocab``).
            nonfinite: A training loss or gradient that is NaN or inf: ``error`` stops the run at that step
                saying where; ``skip`` drops that optimizer step (no update from the batch, on every
                device) with a warning, counted in ``train/skipped_steps``. A reward function or a data
                value that is not finite is a bug and always an error.
            optimizer: Optimizer factory; default AdamW at the method's TRL learning rate, no weight decay.
            lr_scheduler: Scheduler factory, stepped every optimizer step; default constant.
                ``lit_align.optim.LinearWarmupDecay`` is TRL's default linear decay.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_name_or_path = model_name_or_path
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.peft = peft
        self.gradient_checkpointing = gradient_checkpointing
        self.disable_dropout = self.disable_dropout_default if disable_dropout is None else disable_dropout
        self.chunk_size = chunk_size
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r}: expected 'error' or 'skip'")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._nonfinite_loss = False
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.model: torch.nn.Module | None = None
        self._tokenizer = None
        self.num_tokens_seen = 0
        self.strict_loading = not self.frozen_submodules  # checkpoints hold no frozen weights

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call it more than once
            return
        self.model = self.build_policy()
        self.build_other_models()

    def build_other_models(self) -> None:
        """The models besides the policy (a reference, a teacher, a critic), built once after it."""

    def load_model(self) -> torch.nn.Module:
        """The trained network before LoRA (a causal LM; reward models override it)."""
        return load_causal_lm(self.model_name_or_path, self.dtype_name, self.attn_implementation)

    def build_policy(self) -> torch.nn.Module:
        model = self.load_model()
        if self.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.peft is not None:
            if self.gradient_checkpointing:
                model.enable_input_require_grads()
            model = apply_lora(model, self.peft, self.peft_task_type)
        return model.train()  # from_pretrained returns eval mode; dropout is the model's own choice

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name_or_path)
        return self._tokenizer

    # -- data ----------------------------------------------------------------------------------
    def data_requirements(self) -> DataRequirements:
        """What this method asks of its data; a lit-align DataModule receives it when a fit sets it up."""
        return DataRequirements(tokenizer_name_or_path=self.model_name_or_path, add_bos_to_prompt=self.add_bos_to_prompt)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        make = self.optimizer or functools.partial(torch.optim.AdamW, lr=self.default_lr, weight_decay=0.0)
        optimizer = make(params)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, LinearWarmupDecay) and scheduler.total_steps is None:
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- steps -------------------------------------------------------------------------------
    def shared_step(self, batch: Any, stage: str) -> Tensor:
        """The loss of one batch, its metrics logged under ``<stage>/``; each method defines it."""
        raise TypeError(f"{type(self).__name__} does not define shared_step")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    # -- distributed bookkeeping ---------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def global_sum(self, values: Tensor) -> Tensor:
        """Sum a tensor of statistics over all devices (one collective for all of them)."""
        return self.global_reduce(values, "sum")

    def global_reduce(self, values: Tensor, op: str) -> Tensor:
        """Reduce over all devices with ``op``: ``sum``, ``min`` or ``max``."""
        if self.world_size == 1:
            return values
        return self.trainer.strategy.reduce(values.clone(), reduce_op=op)

    def global_token_mean(self, local_sum: Tensor, global_count: Tensor) -> Tensor:
        """The loss to backward for a mean over every device's tokens: this device's sum over the
        global count, times the world size because DDP averages the devices' gradients (one
        process and N then take the same step)."""
        return local_sum / global_count.clamp(min=1) * self.world_size

    def count_tokens(self, tokens: Tensor | float, stage: str) -> Tensor | float:
        """The ``num_tokens`` metric from a batch's global token count: the running total in
        training (kept in checkpoints), the batch's own count in validation and test."""
        if stage != "train":
            return tokens
        self.num_tokens_seen += int(tokens)
        return float(self.num_tokens_seen)

    # -- logging -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Tensor | float], stage: str, batch_size: int) -> None:
        """Log ``metrics`` under ``<stage>/<TRL name>``. Values are already global (reduced over
        devices) so training logs need no sync; validation averages over batches per epoch."""
        train = stage == "train"
        for name, value in metrics.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=train,
                on_epoch=not train,
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=False,
            )

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        state = super().state_dict(*args, **kwargs)
        skip = tuple(kwargs.get("prefix", "") + name + "." for name in self.frozen_submodules)
        return {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state

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
