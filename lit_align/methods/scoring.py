"""How an online method scores its samples: reward functions and reward models over decoded
completions, with the prompt batch's extra columns (see ``lit_align.rewards.registry``)."""

from __future__ import annotations

from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.data.tokenize import is_conversational
from lit_align.rewards.model import RewardModelScorer
from lit_align.rewards.registry import compute_rewards, reward_name
from lit_align.rollout.engines import Generations


class Scoring:
    """Reads the module's ``reward_funcs``, ``tokenizer``, ``device`` and ``num_generations``."""

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
        columns = {k: self.repeat(v) for k, v in batch.extras.items()}
        rewards = compute_rewards(self.reward_funcs, self.repeat(batch.prompts), completions, ids, columns, self.device)
        return completions, rewards

    @property
    def reward_names(self) -> list[str]:
        return [reward_name(f) for f in self.reward_funcs]
