"""The rollout callback: generate, score and hand a :class:`Rollout` to ``training_step``.

Lightning stays in charge of the loop. Before each training batch (a
:class:`~lit_align.data.formats.PromptBatch` of prompts) the callback asks the module for a
rollout (``pl_module.make_rollout(batch, stage)``: sample ``num_generations`` completions per
prompt through the module's engine, score them, compute log-probs and advantages) and
attaches it as ``batch.rollout``; ``training_step`` computes the loss from it. The module owns
the engine; the callback schedules: when to sample, reuse, weight syncs, the completions table.

- Reuse: with ``num_iterations = k`` the DataModule yields every prompt batch ``k`` times in
  a row and the callback serves the same rollout to those ``k`` steps (the old log-probs
  stored in it make the importance ratio move). With ``steps_per_generation = S`` (GRPO,
  RLOO) a prompt batch holds ``S`` steps' prompts, comes ``S * k`` times, and the rollout is
  cut into ``S`` shuffled slices served in turn, ``k`` times over (TRL's order). A rollout
  still being served is saved in the checkpoint (each rank's), so a run resumed between its
  steps trains on the same samples.
- Weight sync: engines holding their own copy of the weights (vLLM, a generation server) get
  the policy's before a rollout whenever an optimizer step happened since the last push, the
  first rollout of a run included (a server may hold another run's weights), as TRL.
- Completions go to W&B as a table every ``log_completions_every_n_steps`` (rank 0), the first
  ``num_completions_to_print`` rows of it to the console, and every row to
  ``<default_root_dir>/completions/completions_<step>.parquet`` (TRL's files), which a Hub
  dataset repository (``hub_repo``) receives every two minutes.

Modules add it in ``configure_callbacks``; pass one to the Trainer to change its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lit_align.ops.sharding import full_parameters
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
        num_completions_to_log: Rows in that table (None: every row of the rollout).
        num_completions_to_print: Rows of it printed to the console as well (0: none, None: all).
        log_unique_prompts: One row per distinct prompt.
        hub_repo: A Hub dataset repository (``user/name``) that the completion files are pushed to
            every two minutes (TRL's ``log_completions_hub_repo``; created if missing).
    """

    def __init__(
        self,
        engine: GenerationEngine | None = None,
        log_completions_every_n_steps: int = 0,
        num_completions_to_log: int | None = 16,
        num_completions_to_print: int | None = 0,
        log_unique_prompts: bool = False,
        hub_repo: str | None = None,
    ) -> None:
        self.engine = engine
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.num_completions_to_log = num_completions_to_log
        self.num_completions_to_print = num_completions_to_print
        self.log_unique_prompts = log_unique_prompts
        self.hub_repo = hub_repo
        self.hub_scheduler: Any = None
        self._buffer: list[Rollout] | None = None  # the slices of the rollout being served
        self._served = 0
        self._reuse = 1
        self._pending: list[dict[str, Any]] | None = None  # a checkpointed rollout's slices, restored at the next batch
        self._last_synced_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.engine is not None:
            pl_module.engine = self.engine
        if self.hub_repo and self.log_completions_every_n_steps and trainer.global_rank == 0 and self.hub_scheduler is None:
            from huggingface_hub import CommitScheduler, create_repo

            folder = self.completions_dir(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            create_repo(self.hub_repo, repo_type="dataset", exist_ok=True)
            self.hub_scheduler = CommitScheduler(repo_id=self.hub_repo, repo_type="dataset", folder_path=folder, every=2,
                                                 allow_patterns=["*.parquet"])

    @staticmethod
    def completions_dir(trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "completions"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        parts = getattr(pl_module, "generation_steps", 1)
        reuse = self._reuse = getattr(pl_module, "num_iterations", 1) * parts
        if self._pending is not None:
            self._buffer = [Rollout.from_state_dict(s, pl_module.device) for s in self._pending]
            self._pending = None
        if self._buffer is None or self._served >= reuse:
            with full_parameters(pl_module):  # FSDP2: weights whole for the rollout (ranks may decode unevenly)
                self._sync(trainer, pl_module)
                rollout = pl_module.make_rollout(batch, "train")
            self._buffer = pl_module.split_rollout(rollout, parts) if parts > 1 else [rollout]
            self._served = 0
            every = self.log_completions_every_n_steps
            if every and trainer.global_step % every == 0:
                self._log_table(trainer, rollout)
        elif len(batch.prompts) * self._buffer[0].rows_per_prompt != sum(map(len, self._buffer)):
            raise RuntimeError("num_iterations > 1 needs the DataModule to repeat each prompt batch (PromptOnlyDataModule does)")
        batch.rollout = self._buffer[self._served % len(self._buffer)]
        self._served += 1

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        with full_parameters(pl_module):
            self._sync(trainer, pl_module)
            batch.rollout = pl_module.make_rollout(batch, "val")

    def _sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The policy's weights into the engine, if an optimizer step moved them since the last push."""
        if trainer.global_step != self._last_synced_step:
            pl_module.engine.sync_weights(pl_module.model)
            self._last_synced_step = trainer.global_step

    def _log_table(self, trainer: L.Trainer, rollout: Rollout) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if trainer.global_rank != 0:
            return
        columns, rows = completion_rows(trainer.global_step, rollout, self.log_unique_prompts)
        if self.num_completions_to_print != 0:
            print(format_rows(columns, rows[: self.num_completions_to_print]), flush=True)
        write_parquet(columns, rows, self.completions_dir(trainer) / f"completions_{trainer.global_step:05d}.parquet")
        rows = rows[: self.num_completions_to_log]
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_table(key="completions", columns=columns, data=rows)

    def state_dict(self) -> dict[str, Any]:
        # The rollout being reused (num_iterations > 1) is part of the checkpoint, every rank's own,
        # so a resumed run trains on it as the uninterrupted run does instead of sampling afresh.
        buffer = [r.state_dict() for r in self._buffer] if self._buffer is not None and self._served < self._reuse else None
        return {"served": self._served, "buffers": all_ranks(buffer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._served = state_dict.get("served", 0)
        pending = own(state_dict.get("buffers"))
        self._pending = [pending] if isinstance(pending, dict) else pending  # a checkpoint from before slices
        self._buffer = None



def completion_rows(step: int, rollout: Rollout, unique_prompts: bool = False) -> tuple[list[str], list[list]]:
    """The completions table: step, prompt, completion, each reward column, the columns reward
    functions logged (``log_extra``), advantage; one row per completion (per distinct prompt, its
    first completion, with ``unique_prompts``)."""
    names, extra = list(rollout.reward_columns), list(rollout.log_columns)
    adv = rollout.advantages if rollout.advantages.dim() == 1 else rollout.advantages.sum(-1)
    rows, seen = [], set()
    for i in range(len(rollout)):
        prompt = str(rollout.prompts[i])
        if unique_prompts and prompt in seen:
            continue
        seen.add(prompt)
        rewards = [float(rollout.reward_columns[n][i]) for n in names]
        logged = [rollout.log_columns[c][i] for c in extra]
        rows.append([step, prompt, str(rollout.completions[i]), *rewards, *logged, float(adv[i])])
    return ["step", "prompt", "completion", *names, *extra, "advantage"], rows


def write_parquet(columns: list[str], rows: list[list], path: Path) -> None:
    """The table as a parquet file (TRL's ``completions/completions_<step>.parquet``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([dict(zip(columns, [str(v) if isinstance(v, (list, dict)) else v for v in row]))
                                         for row in rows]), path)


def format_rows(columns: list[str], rows: list[list], width: int = 60) -> str:
    """A plain-text table of the rows for the console (long texts cut to ``width`` characters)."""

    def cell(v: Any) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        text = text.replace("\n", " ")
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = [" | ".join(columns)] + [" | ".join(cell(v) for v in row) for row in rows]
    return "\n".join(lines)
