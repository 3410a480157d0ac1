"""Online preference methods: OnlineDPO, NashMD, XPO (docs/methods.md §10, §15).

Each prompt gets two samples, from the policy and from a second source (the policy again
for OnlineDPO, the policy-reference geometric mixture for NashMD, the reference for XPO); a
pairwise judge (or reward functions / models) says which is better; the loss pulls the policy
towards the preferred one against the frozen reference. The three share this base and the
rollout machinery of GRPO/RLOO; their losses are in ``lit_align.losses.online_preference``.

Multi-turn rollouts (``tools``, ``environment_factory``; :class:`~lit_align.methods.tool_use.ToolUse`):
both samples of a pair go through the tool turns, each continued by the model that began it (the
mixture for NashMD's second sample, the reference for XPO's), with the same tools, so the judge or
reward functions compare two conversations drawn alike. They see the whole conversation (the tool
turns too); the summed log-probs of the losses count the sampler's own tokens only (``loss_mask``
is ``Generations.model_mask``), so a tool result never gets gradient, KL or log-prob mass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from lit_align.data.formats import PromptBatch
from lit_align.losses.advantages import weighted_rewards
from lit_align.losses.online_preference import check_online_loss_type
from lit_align.methods.online import OnlineModule
from lit_align.methods.tool_use import Sampler, ToolUse
from lit_align.rewards.judges import PairwiseJudge, check_judgement, load_judge
from lit_align.rollout.engines import Generations
from lit_align.rollout.types import Advantages, Rollout


def per_epoch(value: float | list[float], epoch: int) -> float:
    """TRL's per-epoch schedules: a list gives one value per epoch, the last one sticks."""
    if isinstance(value, (list, tuple)):
        return float(value[min(epoch, len(value) - 1)])
    return float(value)


class OnlinePreferenceModule(ToolUse, OnlineModule):
    """Base of OnlineDPO, NashMD and XPO (not used directly).

    Rows of a rollout: the ``E`` first samples (the policy's), then the ``E`` second samples (from
    ``second_sampler``); ``rollout.extras["preferences"]`` holds, per prompt, the probability that the
    first sample is better (``rollout.advantages`` the same per sample: ``P`` for the first, ``1 - P``
    for the second).
    """

    images_in_rollouts = False  # prompts with images: OnlineDPO only (generates_from_images)

    default_lr = 5e-7
    samples_reference: ClassVar[bool] = False  # NashMD and XPO draw the second sample from (a mixture with) the reference
    disable_dropout_default: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        judge: Any = None,
        reward_funcs: list[str | dict] | None = None,
        reward_model_path: str | None = None,
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
            reward_model_path: A reward-model directory (TRL's field): the same as listing it in ``reward_funcs``.
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
        if reward_model_path is not None:
            reward_funcs = [*(reward_funcs or []), reward_model_path]
        super().__init__(*args, reward_funcs=reward_funcs, beta=betas[0], max_completion_length=max_new_tokens,
                         temperature=temperature, num_generations=1, **kwargs)
        if judge is not None and self.environments is not None and self.environments.reward_funcs:
            names = [f.__name__ for f in self.environments.reward_funcs]
            raise ValueError(f"{type(self).__name__}: a judge ranks the pairs, so the environments' get_reward {names} would "
                             "be ignored: rank with reward_funcs (the environments' rewards join them) or drop the judge")
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
    def second_sampler(self) -> Sampler | None:
        """Who draws the second sample of each pair; None: the policy again (OnlineDPO)."""
        return None

    def sample_batch(self, batch: PromptBatch) -> Generations:
        """The ``E`` first samples, then the ``E`` second; with tools, each continued through the tool turns
        by its own sampler."""
        policy = self.policy_sampler()
        other = self.second_sampler() or policy
        ids, mask = batch.prompt_ids, batch.prompt_mask
        if self.environments is not None:
            gens = self.environment_turn(batch, [(policy, 1), (other, 1)])
        elif other is policy:  # two samples per prompt in one call (rows 2i, 2i+1), reordered as E first then E second
            gens = self.sample(self.model, ids, mask, sampling=replace(self.sampling, num_generations=2),
                               vision_rows=batch.vision_rows)  # each pair keeps its prompt's pixels through the reorder
            gens = gens.select(torch.cat([torch.arange(0, len(gens), 2), torch.arange(1, len(gens), 2)]).to(ids.device))
        else:
            gens = policy(ids, mask, self.sampling).cat(other(ids, mask, self.sampling), self.pad_token_id)
        if self.toolbox is None:
            return gens
        return self.tool_turns(gens, [policy] * len(batch) + [other] * len(batch))

    @property
    def can_score(self) -> bool:
        return self.judge is not None or bool(self.reward_funcs)

    def repeat(self, values: list) -> list:
        """Per-prompt values, one per sample: the rows are the ``E`` first samples, then the ``E`` second."""
        return values * 2

    def score(self, batch: PromptBatch, gens: Generations) -> tuple[list, Tensor]:
        if self.judge is not None:  # it ranks the pairs in advantages(); no reward columns
            return self.decode(batch, gens)[0], torch.zeros(len(gens), 0, device=self.device)
        return super().score(batch, gens)

    def advantages(self, rollout: Rollout, rewards: Tensor) -> Advantages:
        """Per prompt the probability ``P`` that the first sample is better (the judge's, or 1 where its
        score is at least the second's); the samples' advantages ``P`` and ``1 - P``."""
        E = len(rollout) // 2
        if self.judge is not None:
            pairs = list(zip(rollout.completions[:E], rollout.completions[E:]))
            values = check_judgement(self.judge.judge(rollout.prompts[:E], pairs), E, type(self.judge).__name__)
            first_wins, scores = torch.tensor(values, device=self.device), torch.full((2 * E,), float("nan"), device=self.device)
        else:
            scores = weighted_rewards(rewards, self.reward_weights).nan_to_num(0.0)
            if self.missing_eos_penalty is not None:
                scores = scores - self.missing_eos_penalty * rollout.generations.is_truncated.float()
            first_wins = self.first_wins(scores[:E], scores[E:])
        ended = self.gather((~rollout.generations.is_truncated).float().view(2, E).T)[0]  # (all prompts, 2)
        metrics = {"val/model_contain_eos_token": ended[:, 0].mean().item(), "val/ref_contain_eos_token": ended[:, 1].mean().item()}
        return Advantages(torch.cat([first_wins, 1 - first_wins]), scores, metrics, extras={"preferences": first_wins})

    def first_wins(self, first: Tensor, second: Tensor) -> Tensor:
        """A hard preference from scores: 1 where the first scores at least as high (TRL: ties to the first)."""
        return (first >= second).float()

    # -- shared pieces of the loss ------------------------------------------------------------------
    def policy_token_logps(self, r: Rollout) -> Tensor:
        """The policy's per-token log-probs of all ``2E`` samples ``(2E, C)``, with gradients."""
        return self.token_logps(self.model, r.sequences, r.generations)[0]

    def log_pair_metrics(self, metrics: dict[str, Tensor | float], r: Rollout, stage: str) -> None:
        """Averages over devices (each entry is a local mean of equal-sized batches) and logs."""
        out = {k: (self.global_sum(v.detach()) / self.world_size if isinstance(v, Tensor) else v) for k, v in metrics.items()}
        self.log_metrics({**out, **r.metrics, "beta": self.current_beta}, stage, len(r) // 2)

