"""How an online method scores its samples: reward functions and reward models over decoded
completions, with the prompt batch's extra columns (see ``lit_align.rewards.registry``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.data.tokenize import is_conversational
from lit_align.rewards.model import RewardModelScorer
from lit_align.rewards.registry import compute_rewards, reward_name
from lit_align.rollout.engines import Generations


@dataclass(frozen=True)
class TrainerState:
    """What TRL's ``trainer_state`` argument of a reward function offers (for rewards shaped by
    training progress): the optimizer steps done, the run's ``max_steps`` (-1: none), the epoch."""

    global_step: int
    max_steps: int
    epoch: int


@dataclass
class RewardLogs:
    """What reward functions hand back through TRL's ``log_extra(column, values)`` (columns of the
    completions table) and ``log_metric(name, value)`` (scalars, averaged over calls and devices)."""

    columns: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def log_extra(self, column: str, values: list) -> None:
        self.columns[column].extend(values)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))


class Scoring:
    """Reads the module's ``reward_funcs``, ``tokenizer``, ``device`` and ``num_generations``.
    Reward functions get TRL's keyword arguments: the batch's extra columns, ``trainer_state``,
    ``log_extra`` and ``log_metric`` (collected in ``reward_logs`` until the rollout takes them)."""

    reward_logs: RewardLogs | None = None

    def build_other_models(self) -> None:
        super().build_other_models()
        for func in self.reward_funcs:  # reward models load with the other models, moved to the device when used
            if isinstance(func, RewardModelScorer):
                func.load(**self.model_init.kwargs)

    @property
    def can_score(self) -> bool:
        return bool(self.reward_funcs)

    def repeat(self, values: list) -> list:
        """Per-prompt values, one per completion (each prompt's ``G`` completions are consecutive)."""
        return [v for v in values for _ in range(self.num_generations)]

    def decode(self, batch: PromptBatch, gens: Generations) -> tuple[list, list[list[int]]]:
        """Completions as text (message lists for conversational prompts) and as token id lists."""
        ids = [row[:n] for row, n in zip(gens.completion_ids.tolist(), gens.completion_mask.sum(1).tolist())]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if batch.prompts and is_conversational(batch.prompts[0]):
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        return texts, ids

    def score(self, batch: PromptBatch, gens: Generations) -> tuple[list, Tensor]:
        """Every reward function on every completion: the completions and ``(N, K)`` rewards."""
        for func in self.reward_funcs:
            if isinstance(func, RewardModelScorer) and func.device != self.device:
                func.to(self.device)
        completions, ids = self.decode(batch, gens)
        if self.reward_logs is None:
            self.reward_logs = RewardLogs()
        columns: dict[str, Any] = {k: self.repeat(v) for k, v in batch.extras.items()}
        columns.update(trainer_state=self.trainer_state(), log_extra=self.reward_logs.log_extra,
                       log_metric=self.reward_logs.log_metric, **self.reward_columns())
        rewards = compute_rewards(self.reward_funcs, self.repeat(batch.prompts), completions, ids, columns, self.device)
        return completions, rewards

    def reward_columns(self) -> dict[str, Any]:
        """Further keyword arguments of the reward functions (multi-turn rollouts add ``environments``)."""
        return {}

    def trainer_state(self) -> TrainerState:
        trainer = self._trainer
        if trainer is None:
            return TrainerState(0, -1, 0)
        return TrainerState(trainer.global_step, trainer.max_steps, trainer.current_epoch)

    def take_reward_logs(self, rows: int) -> tuple[dict[str, list], dict[str, float]]:
        """The columns (those with one value per completion) and the metrics (means over every call on
        every device) the reward functions logged since the last rollout; then forgets them."""
        logs, self.reward_logs = self.reward_logs or RewardLogs(), None
        columns = {k: v for k, v in logs.columns.items() if len(v) == rows}
        names = sorted(set().union(*self.gather_objects(sorted(logs.metrics))))
        metrics = {}
        for name in names:  # every device reduces the same names in the same order
            values = logs.metrics.get(name, [])
            total = self.global_sum(torch.tensor([sum(values), float(len(values))], device=self.device))
            metrics[name] = float(total[0] / total[1].clamp(min=1.0))
        return columns, metrics

    @property
    def reward_names(self) -> list[str]:
        return [reward_name(f) for f in self.reward_funcs]
