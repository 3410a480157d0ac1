"""Generation decoupled from the optimizer step (TRL's ``steps_per_generation``,
``generation_batch_size``, ``num_generations_eval``), for GRPO and RLOO.

One rollout is sampled for ``steps_per_generation`` training steps at once: the DataModule's
batch holds that many steps' prompts, the rollout is shuffled and cut into that many slices,
and the :class:`~lit_align.rollout.callback.RolloutCallback` serves one slice per step (each
``num_iterations`` times over). TRL's default is one generation per optimizer step
(``steps_per_generation = accumulate_grad_batches``). Old log-probs are kept when the policy
moves between sampling and a slice's use (TRL's rule: ``accumulate_grad_batches`` is not a
multiple of ``steps_per_generation * num_iterations``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import torch

from lit_align.data.base import DataRequirements
from lit_align.rollout.types import Rollout


class GenerationBatches:
    """Mixin of an :class:`~lit_align.methods.online.OnlineModule` (before it in the bases)."""

    decoupled_generation: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        steps_per_generation: int | None = None,
        generation_batch_size: int | None = None,
        num_generations_eval: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            steps_per_generation: Training steps (micro-batches) one rollout serves (None: the
                Trainer's ``accumulate_grad_batches``, one generation per optimizer step, as TRL).
            generation_batch_size: The same, counted in completions over all devices
                (``batch_size * world_size * steps_per_generation``); give one of the two.
            num_generations_eval: Completions per prompt in validation (None: ``num_generations``).
        """
        super().__init__(*args, **kwargs)
        if steps_per_generation is not None and generation_batch_size is not None:
            raise ValueError("steps_per_generation and generation_batch_size say the same thing: give one of them")
        if steps_per_generation is not None and steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1, got {steps_per_generation}")
        if generation_batch_size is not None and generation_batch_size % self.num_generations:
            raise ValueError(f"generation_batch_size={generation_batch_size} must be divisible by "
                             f"num_generations={self.num_generations} (whole groups)")
        if num_generations_eval is not None and num_generations_eval < 1:
            raise ValueError(f"num_generations_eval must be >= 1, got {num_generations_eval}")
        self.steps_per_generation = steps_per_generation
        self.generation_batch_size = generation_batch_size
        self.num_generations_eval = num_generations_eval or self.num_generations

    def resolve_generation_steps(self) -> int:
        """``steps_per_generation`` as this fit has it (TRL's ``GRPOConfig.__post_init__`` rules)."""
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        trainer = self._trainer
        if self.generation_batch_size is None:
            return trainer.accumulate_grad_batches if trainer is not None else 1
        data = getattr(trainer, "datamodule", None) if trainer is not None else None
        if data is None or not hasattr(data, "batch_size"):
            raise ValueError("generation_batch_size needs a lit-align DataModule (its batch_size); "
                             "or give steps_per_generation instead")
        per_step = data.batch_size * trainer.world_size
        if self.generation_batch_size % per_step:
            raise ValueError(f"generation_batch_size={self.generation_batch_size} must be divisible by the global batch "
                             f"size, batch_size x devices = {data.batch_size} x {trainer.world_size} = {per_step}")
        return self.generation_batch_size // per_step

    def data_requirements(self) -> DataRequirements:
        self.generation_steps = self.resolve_generation_steps()
        return replace(super().data_requirements(), generation_steps=self.generation_steps,
                       batch_repeats=self.num_iterations * self.generation_steps,
                       eval_rows_per_prompt=self.num_generations_eval)

    def on_fit_start(self) -> None:
        steps = self.resolve_generation_steps()
        data = getattr(self.trainer, "datamodule", None)
        if steps != 1 and getattr(getattr(data, "requirements", None), "generation_steps", None) != steps:
            raise ValueError(f"steps_per_generation={steps} needs a lit-align PromptOnlyDataModule to batch that many steps' "
                             "prompts together")
        self.generation_steps = steps
        super().on_fit_start()

    @property
    def needs_old_logps(self) -> bool:
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        return accumulate % (self.generation_steps * self.num_iterations) != 0

    def make_rollout(self, batch: Any, stage: str) -> Rollout:
        if stage == "train":
            return super().make_rollout(batch, stage)
        with self.evaluation_groups():
            return super().make_rollout(batch, stage)

    @contextlib.contextmanager
    def evaluation_groups(self) -> Iterator[None]:
        """For the duration of a validation rollout: ``num_generations_eval`` completions per prompt,
        and one step per rollout (validation neither slices nor accumulates)."""
        train = self.num_generations, self.sampling, self.generation_steps
        G = self.num_generations_eval
        self.num_generations, self.sampling, self.generation_steps = G, replace(self.sampling, num_generations=G), 1
        try:
            yield
        finally:
            self.num_generations, self.sampling, self.generation_steps = train

    def split_rollout(self, rollout: Rollout, parts: int) -> list[Rollout]:
        """The rollout's rows shuffled (TRL's ``shuffle_sequence_dict``) and cut into ``parts`` slices."""
        n = len(rollout)
        if n < parts:
            raise ValueError(f"a rollout of {n} rows cannot serve steps_per_generation={parts} steps (the data's last "
                             "batch is short?): raise batch_size or lower steps_per_generation")
        order = torch.randperm(n, device=rollout.loss_mask.device)
        return [self.rollout_rows(rollout, idx) for idx in torch.tensor_split(order, parts)]

    def rollout_rows(self, rollout: Rollout, idx: torch.Tensor) -> Rollout:
        """The rollout's rows at ``idx``: every per-row tensor and list indexed, sequences rebuilt."""
        n, rows = len(rollout), idx.tolist()

        def pick(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == n:
                return value[idx.to(value.device)]
            return value

        gens = rollout.generations.select(idx)
        return replace(
            rollout, generations=gens, sequences=self.sequences(gens), loss_mask=pick(rollout.loss_mask),
            advantages=pick(rollout.advantages), rewards=pick(rollout.rewards), old_logps=pick(rollout.old_logps),
            ref_logps=pick(rollout.ref_logps), extras={k: pick(v) for k, v in rollout.extras.items()},
            prompts=[rollout.prompts[i] for i in rows] if rollout.prompts else [],
            completions=[rollout.completions[i] for i in rows] if rollout.completions else [],
            reward_columns={k: pick(v) for k, v in rollout.reward_columns.items()}, metrics=dict(rollout.metrics),
            log_columns={k: [v[i] for i in rows] for k, v in rollout.log_columns.items()},
        )
