"""The typed rollout a rollout callback hands to an online method's ``training_step``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from lit_align.ops.packing import SequenceBatch
from lit_align.rollout.engines import Generations


@dataclass
class Advantages:
    """What an online method makes of a rollout's rewards (its ``advantages()``)."""

    advantages: Tensor  # (N,) or (N, C): this device's rows
    rewards: Tensor  # (N,) this device's reward as the method counts it
    metrics: dict[str, float] = field(default_factory=dict)  # global values, logged with the step
    extras: dict[str, Tensor] = field(default_factory=dict)  # tensors the method's loss reads from the rollout


@dataclass
class Rollout:
    """``N`` sampled completions (``G`` per prompt, consecutive) and what the loss needs.

    :meth:`OnlineModule.build_rollout <lit_align.methods.online.OnlineModule.build_rollout>` fills
    the shared fields; a method's ``advantages()`` gives ``advantages``, ``rewards`` and ``extras``.

    Shapes: ``(N, C)`` per completion token (``C`` = longest completion), ``(N,)`` per completion.
    """

    generations: Generations  # prompt ids (left-padded), completion ids and mask, sampling log-probs
    sequences: SequenceBatch  # prompt + completion joined without padding, for the training forward
    loss_mask: Tensor  # (N, C) float: completion tokens that count in the loss
    advantages: Tensor | None = None  # (N,) or (N, C) per completion: its method's advantages() (a pair's samples: P(better), 1 - P)
    rewards: Tensor | None = None  # (N,) the reward it was judged by (weighted; KL-shaped for RLOO; PPO: the score)
    old_logps: Tensor | None = None  # (N, C) log-probs at sampling time (None: the ratio is 1)
    ref_logps: Tensor | None = None  # (N, C) reference log-probs (None without a reference)
    extras: dict[str, Tensor] = field(default_factory=dict)  # the method's own: PPO's values, returns; DAPO's num_items, ...
    rows_per_prompt: int = 1  # completions per prompt of the batch it was made from (G; 2 for a preference pair)
    prompts: list = field(default_factory=list)  # raw prompts, one per completion (for logging)
    completions: list = field(default_factory=list)  # decoded completions
    reward_columns: dict[str, Tensor] = field(default_factory=dict)  # (N,) per reward function, for the table
    log_columns: dict[str, list] = field(default_factory=dict)  # N values per column reward functions logged (log_extra)
    metrics: dict[str, float] = field(default_factory=dict)  # generation-time metrics, global

    def __len__(self) -> int:
        return self.loss_mask.size(0)

    def state_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and tensors (what a checkpoint loaded with ``weights_only`` may hold)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["generations"] = {f.name: getattr(self.generations, f.name) for f in fields(self.generations)}
        state["sequences"] = self.sequences.to_dict()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> Rollout:
        state = move_data_to_device(state, device)
        return cls(**{**state, "generations": Generations(**state["generations"]), "sequences": SequenceBatch(**state["sequences"])})

