"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), as TRL's last ``PPOTrainer``.

A rollout samples completions, scores each with a reward model and/or reward functions,
and turns the score into per-token rewards: ``-kl_coef * KL(policy || ref)`` on every token
plus the score on the last one. GAE on a critic's values gives advantages and returns;
``num_ppo_epochs`` passes over ``num_mini_batches`` mini-batches then take one optimizer
step each on the clipped policy loss plus ``vf_coef`` times the clipped value loss
(manual optimisation: several steps per rollout). The critic is a value head on the
policy's backbone (one forward gives log-probs and values) or a separate value model.

Departures from TRL (docs/methods.md §14), for correctness: the score is added at the last
completion token, not one position past it (TRL's ``sequence_length + 1`` puts it on a
padding state the policy never acts from); ``objective/entropy`` and ``policy/approxkl_avg``
average over completion tokens only (TRL's include padding filled with ``INVALID_LOGPROB``).

Multi-turn rollouts (``tools``, ``environment_factory``; :class:`~lit_align.methods.tool_use.ToolUse`):
a tool result's tokens are the environment's answer, not actions of the policy. They get no policy
gradient, no value loss, no KL penalty and no reward (``loss_mask`` is ``Generations.model_mask``),
and the per-token rewards and GAE run over the model's tokens only: those are moved to the front of
each row (:mod:`lit_align.ops.model_tokens`), the score lands on the last of them, GAE and the
whitening run there as on a single-turn completion, and the advantages and returns go back to their
positions (0 on tool tokens). So the model token just before a tool result bootstraps from the
critic's value at the first model token after it, a state whose context holds the tool result, and
``gamma`` and ``lam`` discount once per model token, whatever the result's length. (GAE over every
token with the tool tokens masked would instead bootstrap from the critic's values *at* tool tokens,
which the value loss never trains, and discount by the length of the tool's text.)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_align.data.formats import PromptBatch
from lit_align.losses.advantages import gae, kl_penalised_rewards, masked_whiten, weighted_rewards
from lit_align.losses.policy import ppo_policy_loss, ppo_value_loss
from lit_align.methods.manual import ManualSteps
from lit_align.methods.metrics import reward_metrics
from lit_align.methods.online import OnlineModule
from lit_align.methods.tool_use import ToolUse
from lit_align.models.heads import load_classifier
from lit_align.ops.completions import (
    completion_hidden,
    completion_logprobs,
    completion_values,
    select_sequences,
)
from lit_align.ops.model_tokens import compact, expand, model_token_order
from lit_align.rewards.model import RewardModelScorer
from lit_align.rollout.engines import Generations
from lit_align.rollout.types import Advantages, Rollout


class PPO(ToolUse, ManualSteps, OnlineModule):
    """Proximal Policy Optimization with a critic, a frozen reference and a reward model or functions
    (and tools or environments: multi-turn rollouts, see the module docstring)."""

    images_in_rollouts = False  # prompts with images: not yet (generates_from_images)

    default_lr = 3e-6
    kl_weight_name = "kl_coef"

    def __init__(
        self,
        *args: Any,
        reward_model_name_or_path: str | None = None,
        value_model_name_or_path: str | None = None,
        num_ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        cliprange: float = 0.2,
        vf_coef: float = 0.1,
        cliprange_value: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_rewards: bool = False,
        missing_eos_penalty: float | None = None,
        max_grad_norm: float | None = 1.0,
        num_generations: int = 1,
        max_completion_length: int = 53,
        temperature: float = 0.7,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            reward_model_name_or_path: A sequence-classification directory (for example one written
                by ``RewardModel``); its score is added to any ``reward_funcs``.
            value_model_name_or_path: A separate critic (a sequence-classification directory whose
                head is applied at every token; TRL initialises it from the reward model). None:
                a value head on the policy's backbone.
            num_ppo_epochs: Passes over each rollout.
            num_mini_batches: Mini-batches (optimizer steps) per pass.
            kl_coef: Weight of the per-token KL penalty in the reward.
            kl_estimator: ``k1`` (``log p - log ref``) or ``k3`` (``exp(r) - 1 - r``, ``r = log ref - log p``).
            cliprange: Clip range of the policy ratio.
            cliprange_value: Clip range of the value change.
            vf_coef: Weight of the value loss.
            gamma: GAE's discount.
            lam: GAE's lambda.
            whiten_rewards: Whiten the per-token rewards before GAE.
            missing_eos_penalty: Subtracted from the score of completions that never end.
            max_grad_norm: Gradient norm clip of each optimizer step (None: off).
            num_generations: Completions per prompt (TRL's PPO: 1).
            max_completion_length: Longest completion (TRL's PPO ``response_length=53``).
            temperature: Sampling temperature (TRL's PPO: 0.7).
        """
        for name in ("beta", "mask_truncated_completions"):
            if kwargs.get(name):  # OnlineModule's arguments that PPO has no use for
                raise ValueError(f"PPO does not use {name}" + (": its KL weight is kl_coef" if name == "beta" else ""))
        kwargs.pop("beta", None)
        super().__init__(  # the KL weight goes in as beta: the reference model and its checks follow it
            *args, beta=kl_coef, num_generations=num_generations, max_completion_length=max_completion_length,
            temperature=temperature, **kwargs,
        )
        if kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
        if num_ppo_epochs < 1 or num_mini_batches < 1:
            raise ValueError(f"num_ppo_epochs and num_mini_batches must be >= 1, got {num_ppo_epochs}, {num_mini_batches}")
        if reward_model_name_or_path is None and not self.reward_funcs:
            raise ValueError("PPO needs reward_model_name_or_path or reward_funcs to score completions")
        if reward_model_name_or_path is not None:
            self.reward_funcs.append(RewardModelScorer(reward_model_name_or_path, device="cpu", dtype=self.dtype_name))
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])
        self.reward_model_name_or_path = reward_model_name_or_path
        self.value_model_name_or_path = value_model_name_or_path
        self.num_ppo_epochs = num_ppo_epochs
        self.num_mini_batches = num_mini_batches
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.cliprange = cliprange
        self.vf_coef = vf_coef
        self.cliprange_value = cliprange_value
        self.gamma = gamma
        self.lam = lam
        self.whiten_rewards = whiten_rewards
        self.missing_eos_penalty = missing_eos_penalty
        self.max_grad_norm = max_grad_norm
        self.automatic_optimization = False
        self.value_model: nn.Module | None = None
        self.value_head: nn.Module | None = None

    def build_other_models(self) -> None:
        super().build_other_models()
        if self.value_model_name_or_path is not None:
            self.value_model = load_classifier(self.value_model_name_or_path, "token", 1, self.dtype_name, self.attn_implementation,
                               **self.model_init.kwargs)
        else:
            hidden = self.model.get_output_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden, 1, dtype=self.model.get_output_embeddings().weight.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    # -- forward: log-probs and values --------------------------------------------------------------
    def policy_and_values(self, gens: Generations, seqs, with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        hidden = completion_hidden(self.model, seqs)
        logps, entropy = completion_logprobs(
            self.model, seqs, gens.completion_mask, temperature=self.temperature, chunk_size=self.chunk_size,
            with_entropy=with_entropy, hidden=hidden, fp32_head=self.cast_lm_head_to_fp32,
        )
        if self.value_model is not None:
            values = completion_values(self.value_model.score, completion_hidden(self.value_model, seqs), gens.completion_mask)
        else:
            values = completion_values(self.value_head, hidden, gens.completion_mask)
        return logps, entropy, values

    # -- rollout ------------------------------------------------------------------------------------
    needs_old_logps = True

    def old_token_logps(self, rollout: Rollout) -> Tensor:
        # one forward gives the sampling-time log-probs and the critic's values
        old, _, rollout.extras["values"] = self.policy_and_values(rollout.generations, rollout.sequences)
        return old

    def advantages(self, rollout: Rollout, rewards: Tensor) -> Advantages:
        gens = rollout.generations
        scores = weighted_rewards(rewards, self.reward_weights).nan_to_num(0.0)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * gens.is_truncated.float()
        ref = rollout.ref_logps if rollout.ref_logps is not None else rollout.old_logps
        # The model's tokens first in each row (tool results are the environment's; see the module docstring).
        order = model_token_order(rollout.loss_mask)
        mask, old, ref, values = (compact(t, order) for t in (rollout.loss_mask, rollout.old_logps, ref, rollout.extras["values"]))
        token_rewards, kl = kl_penalised_rewards(scores, old, ref, mask, self.kl_coef, self.kl_estimator)
        # Whitening uses the global batch's statistics (TRL's, per device, differ under DDP).
        if self.whiten_rewards:
            token_rewards = masked_whiten(token_rewards, mask, shift_mean=False, total=self.global_sum) * mask
        advantages, returns = gae(token_rewards, values, mask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, mask, total=self.global_sum) * mask
        all_rewards = self.gather(rewards)[0]
        metrics = {
            "objective/kl": self.gather(kl.sum(1))[0].mean().item(),
            "objective/entropy": self.gather((-old * mask).sum(1))[0].mean().item(),
            "objective/non_score_reward": self.gather(-self.kl_coef * kl.sum(1))[0].mean().item(),
            "objective/scores": self.gather(scores)[0].mean().item(),
            "val/num_eos_tokens": self.global_sum((~gens.is_truncated).float().sum()).item(),
            **reward_metrics(self.reward_names, all_rewards, weighted_rewards(all_rewards, self.reward_weights), None),
        }
        metrics["objective/rlhf_reward"] = metrics["objective/non_score_reward"] + metrics["objective/scores"]
        return Advantages(expand(advantages, order), scores, metrics, extras={"returns": expand(returns, order)})

    # -- updates ------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        r: Rollout = batch.rollout
        n = len(r)
        if n % self.num_mini_batches:
            raise ValueError(f"{n} completions per batch cannot be split into num_mini_batches={self.num_mini_batches}")
        size = n // self.num_mini_batches
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: list[dict[str, Tensor]] = []
        for _ in range(self.num_ppo_epochs):
            order = torch.randperm(n, device=self.device)
            for start in range(0, n, size):
                idx = order[start : start + size]
                with self.activation_context():
                    loss, step_stats = self.minibatch_loss(r, idx)
                loss = self.with_router_aux_loss(loss)
                self.manual_step(loss, optimizer, scheduler, self.max_grad_norm)
                stats.append(step_stats)
        names = list(stats[0])
        # (optimizer steps, metrics) over all devices: each per-device value is already a share of the
        # global token mean, so their sum over devices is the global value of that step.
        per_step = self.global_sum(torch.stack([torch.stack([s[k] for k in names]) for s in stats])) / self.world_size
        metrics: dict[str, Tensor | float] = dict(zip(names, per_step.mean(0)))
        ratio = per_step[:, names.index("val/ratio")]
        metrics["val/ratio_var"] = ratio.var() if len(stats) > 1 else torch.zeros((), device=self.device)
        self.log_metrics({**metrics, **r.metrics}, "train", n)

    def minibatch_loss(self, r: Rollout, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        gens = r.generations.select(idx)
        seqs = self.sequences(gens) if self.shared_prompt_forward else select_sequences(r.sequences, idx)
        logps, entropy, values = self.policy_and_values(gens, seqs, with_entropy=True)
        mask = r.loss_mask[idx]
        tokens = self.global_sum(mask.sum()) / self.world_size  # token means over all devices' mini-batches
        pg_loss, pstats = ppo_policy_loss(logps, r.old_logps[idx], r.advantages[idx], mask, self.cliprange, tokens)
        vf_loss, vf_clipfrac = ppo_value_loss(values, r.extras["values"][idx], r.extras["returns"][idx], mask, self.cliprange_value, tokens)
        loss = pg_loss + self.vf_coef * vf_loss
        stats = {
            "loss": loss.detach(),
            "policy/approxkl_avg": pstats["approxkl"],
            "policy/clipfrac_avg": pstats["clipfrac"],
            "policy/entropy_avg": (entropy * mask).sum() / tokens,
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "val/clipfrac_avg": vf_clipfrac,
            "val/ratio": pstats["ratio"],
        }
        return loss, stats

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        r: Rollout = batch.rollout
        self.log_metrics({k: v for k, v in r.metrics.items() if k.startswith(("objective/", "rewards/", "completions/"))}, "val", len(r))

    test_step = validation_step
