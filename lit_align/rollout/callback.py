"""The rollout callback: generate, score and hand a :class:`Rollout` to ``training_step``.

Lightning stays in charge of the loop. Before each training batch (a
:class:`~lit_align.data.formats.PromptBatch` of prompts) the callback asks the module for a
rollout (``pl_module.make_rollout(batch, stage)``: sample ``num_generations`` completions per
prompt through the module's engine, score them, compute log-probs and advantages) and
attaches it as ``batch.rollout``; ``training_step`` computes the loss from it. The module owns
the engine; the callback schedules: when to sample, reuse, weight syncs, the completions table.

- Reuse: with ``num_iterations = k`` the DataModule yields every prompt batch ``k`` times in
  a row and the callback serves the same rollout to those ``k`` steps (the old log-probs
  stored in it make the importance ratio move). A rollout still being reused is saved in the
  checkpoint (each rank's), so a run resumed between its steps trains on the same samples.
- Weight sync: engines holding their own copy of the weights (vLLM) get the policy's after
  every optimizer step.
- Completions go to W&B as a table every ``log_completions_every_n_steps`` (rank 0).

Modules add it in ``configure_callbacks``; pass one to the Trainer to change its settings.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lit_align.ops.state import all_ranks, own
from lit_align.rollout.engines import GenerationEngine
from lit_align.rollout.types import Rollout


class RolloutCallback(L.Callback):
    """Generate a rollout before every training (and validation) batch of an online method.

    Args:
        engine: A :class:`~lit_align.rollout.engines.GenerationEngine` handed to the module at
            setup (default: the module's own, ``HFEngine`` or ``VLLMEngine`` with ``use_vllm=True``).
        log_completions_every_n_steps: Log a table of prompts, completions, rewards and
            advantages to W&B every this many steps (0: never).
        num_completions_to_log: Rows in that table.
    """

    def __init__(
        self,
        engine: GenerationEngine | None = None,
        log_completions_every_n_steps: int = 0,
        num_completions_to_log: int = 16,
    ) -> None:
        self.engine = engine
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.num_completions_to_log = num_completions_to_log
        self._buffer: Rollout | None = None
        self._served = 0
        self._reuse = 1
        self._pending: dict[str, Any] | None = None  # a checkpointed rollout, restored at the next batch
        self._last_synced_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.engine is not None:
            pl_module.engine = self.engine

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        reuse = self._reuse = getattr(pl_module, "num_iterations", 1)
        if self._pending is not None:
            self._buffer, self._pending = Rollout.from_state_dict(self._pending, pl_module.device), None
        if self._buffer is None or self._served >= reuse:
            self._buffer = pl_module.make_rollout(batch, "train")
            self._served = 0
        elif len(batch.prompts) * self._buffer.rows_per_prompt != len(self._buffer):
            raise RuntimeError("num_iterations > 1 needs the DataModule to repeat each prompt batch (PromptOnlyDataModule does)")
        self._served += 1
        batch.rollout = self._buffer
        every = self.log_completions_every_n_steps
        if every and self._served == 1 and trainer.global_step % every == 0:
            self._log_table(trainer, self._buffer)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        batch.rollout = pl_module.make_rollout(batch, "val")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self._last_synced_step:  # an optimizer step happened
            pl_module.engine.sync_weights(pl_module.model)
            self._last_synced_step = trainer.global_step

    def _log_table(self, trainer: L.Trainer, rollout: Rollout) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if trainer.global_rank != 0:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        names = list(rollout.reward_columns)
        adv = rollout.advantages if rollout.advantages.dim() == 1 else rollout.advantages.sum(-1)
        rows = []
        for i in range(min(self.num_completions_to_log, len(rollout))):
            rewards = [float(rollout.reward_columns[n][i]) for n in names]
            rows.append([trainer.global_step, str(rollout.prompts[i]), str(rollout.completions[i]), *rewards, float(adv[i])])
        for lg in loggers:
            lg.log_table(key="completions", columns=["step", "prompt", "completion", *names, "advantage"], data=rows)

    def state_dict(self) -> dict[str, Any]:
        # The rollout being reused (num_iterations > 1) is part of the checkpoint, every rank's own,
        # so a resumed run trains on it as the uninterrupted run does instead of sampling afresh.
        buffer = self._buffer.state_dict() if self._buffer is not None and self._served < self._reuse else None
        return {"served": self._served, "buffers": all_ranks(buffer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._served = state_dict.get("served", 0)
        self._pending = own(state_dict.get("buffers"))
        self._buffer = None

