"""Online preference methods: OnlineDPO, NashMD, XPO (docs/methods.md §10, §15).

Each prompt gets two samples, from the policy and from a second source (the policy again
for OnlineDPO, the policy-reference geometric mixture for NashMD, the reference for XPO); a
pairwise judge (or reward functions / models) says which is better; the loss pulls the policy
towards the preferred one against the frozen reference. The three share this base and the
rollout machinery of GRPO/RLOO; their losses are in ``lit_align.losses.online_preference``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.advantages import weighted_rewards
from lit_align.losses.online_preference import check_online_loss_type
from lit_align.methods.online import OnlineModule
from lit_align.rewards.judges import PairwiseJudge, check_judgement, load_judge
from lit_align.rewards.registry import compute_rewards
from lit_align.rollout.engines import Generations
from lit_align.rollout.types import Rollout


def per_epoch(value: float | list[float], epoch: int) -> float:
    """TRL's per-epoch schedules: a list gives one value per epoch, the last one sticks."""
    if isinstance(value, (list, tuple)):
        return float(value[min(epoch, len(value) - 1)])
    return float(value)


class OnlinePreferenceModule(OnlineModule):
    """Base of OnlineDPO, NashMD and XPO (not used directly).

    Rows of a rollout: the ``E`` first samples (the policy's), then the ``E`` second samples;
    ``rollout.preferences`` holds, per prompt, the probability that the first sample is better
    (``rollout.advantages`` the same per sample: ``P`` for the first, ``1 - P`` for the second).
    """

    default_lr = 5e-7
    samples_reference: ClassVar[bool] = False  # NashMD and XPO draw the second sample from (a mixture with) the reference
    disable_dropout_default: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        judge: Any = None,
        reward_funcs: list[str | dict] | None = None,
        missing_eos_penalty: float | None = None,
        beta: float | list[float] = 0.1,
        loss_type: str = "sigmoid",
        max_new_tokens: int = 64,
        temperature: float = 0.9,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            judge: A pairwise judge (``lit_align.rewards.judges``): an object with
                ``judge(prompts, completion_pairs) -> probabilities``, or ``{class_path, init_args}``.
                Exactly one of ``judge`` and ``reward_funcs`` ranks the pair.
            reward_funcs: Reward functions / reward-model directories that score both samples.
            missing_eos_penalty: Subtracted from the score of a sample without EOS (reward functions only).
            beta: KL weight; a list gives one value per epoch (the last one sticks).
            loss_type: ``sigmoid`` or ``ipo`` (OnlineDPO, XPO).
            max_new_tokens: Longest sample (TRL's name for these methods).
            temperature: Sampling temperature (TRL default 0.9).
        """
        if kwargs.get("mask_truncated_completions"):
            raise ValueError(f"{type(self).__name__} does not use mask_truncated_completions: a pair is ranked whole "
                             "(missing_eos_penalty lowers the score of a sample without EOS)")
        if kwargs.get("use_vllm") and self.samples_reference:
            raise ValueError(f"{type(self).__name__} cannot use use_vllm=True: it samples the reference model too, "
                             "and the vLLM engine serves the policy only")
        betas = list(beta) if isinstance(beta, (list, tuple)) else [beta]
        super().__init__(*args, reward_funcs=reward_funcs, beta=betas[0], max_completion_length=max_new_tokens,
                         temperature=temperature, num_generations=1, **kwargs)
        if (judge is None) == (not self.reward_funcs):
            raise ValueError(f"{type(self).__name__} needs exactly one of judge and reward_funcs to rank its samples")
        check_online_loss_type(loss_type)
        if any(b <= 0 for b in betas):
            raise ValueError(f"beta must be > 0, got {beta}")
        self.judge: PairwiseJudge | None = load_judge(judge) if judge is not None else None
        self.betas = betas
        self.loss_type = loss_type
        self.missing_eos_penalty = missing_eos_penalty

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def current_beta(self) -> float:
        return per_epoch(self.betas, self.current_epoch if self._trainer is not None else 0)

    # -- rollout ------------------------------------------------------------------------------------
    def make_rollout(self, batch: PromptBatch, stage: str) -> Rollout:
        self.check_prompt_budget(batch)
        gens = self.sample_pair(batch)
        E = len(batch)
        completions, ids = self.decode(batch, gens)
        first_wins, scores = self.prefer(batch, completions, ids, gens)
        seqs = self.sequences(gens)
        with torch.no_grad():
            ref = self.reference_token_logps(seqs, gens)
        mask = gens.completion_mask.float()
        return Rollout(
            generations=gens, sequences=seqs, loss_mask=mask, advantages=torch.cat([first_wins, 1 - first_wins]),
            preferences=first_wins, rewards=scores,
            ref_logps=ref, prompts=batch.prompts * 2, completions=completions, rows_per_prompt=2,
            metrics=self.eos_metrics(gens, E),
        )

    def sample_pair(self, batch: PromptBatch) -> Generations:
        raise TypeError(f"{type(self).__name__} does not define sample_pair")

    def prefer(self, batch: PromptBatch, completions: list, ids: list, gens: Generations) -> tuple[Tensor, Tensor]:
        """Per prompt, the probability that the first sample is better ``(E,)``, and the samples'
        scores ``(2E,)`` (NaN with a judge)."""
        E = len(batch)
        if self.judge is not None:
            pairs = list(zip(completions[:E], completions[E:]))
            values = check_judgement(self.judge.judge(batch.prompts, pairs), E, type(self.judge).__name__)
            return torch.tensor(values, device=self.device), torch.full((2 * E,), float("nan"), device=self.device)
        columns = {k: v * 2 for k, v in batch.extras.items()}
        rewards = compute_rewards(self.reward_funcs, batch.prompts * 2, completions, ids, columns, self.device)
        scores = weighted_rewards(rewards, self.reward_weights).nan_to_num(0.0)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * gens.is_truncated.float()
        return self.first_wins(scores[:E], scores[E:]), scores

    def first_wins(self, first: Tensor, second: Tensor) -> Tensor:
        """A hard preference from scores: 1 where the first scores at least as high (TRL: ties to the first)."""
        return (first >= second).float()

    def eos_metrics(self, gens: Generations, E: int) -> dict[str, float]:
        ended = (~gens.is_truncated).float()
        first, second = self.gather(ended[:E])[0], self.gather(ended[E:])[0]
        return {"val/model_contain_eos_token": first.mean().item(), "val/ref_contain_eos_token": second.mean().item()}

    # -- shared pieces of the loss ------------------------------------------------------------------
    def sequence_logps(self, r: Rollout) -> Tensor:
        """The policy's summed log-probs of all ``2E`` samples ``(2E,)`` (with grad) and per token."""
        logps, _ = self.token_logps(self.model, r.sequences, r.generations)
        return logps

    def log_pair_metrics(self, metrics: dict[str, Tensor | float], r: Rollout, stage: str) -> None:
        """Averages over devices (each entry is a local mean of equal-sized batches) and logs."""
        out = {k: (self.global_sum(v.detach()) / self.world_size if isinstance(v, Tensor) else v) for k, v in metrics.items()}
        self.log_metrics({**out, **r.metrics, "beta": self.current_beta}, stage, len(r) // 2)

