"""What the online methods (GRPO, RLOO, PPO) share: sampling settings, reward functions, the
reference model, per-token log-probs of a rollout, and the generation-time metrics.

A method subclasses :class:`OnlineModule` and writes ``build_rollout`` (advantages and
whatever its loss needs, computed once per rollout, without gradients) and
``shared_step`` (the loss from ``batch.rollout``). The :class:`RolloutCallback` that calls
``make_rollout`` before every batch is added by ``configure_callbacks``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.data.formats import PromptBatch
from lit_align.data.tokenize import is_conversational
from lit_align.losses.advantages import nanstd
from lit_align.methods.base import AlignModule
from lit_align.methods.reference import WithReference
from lit_align.models.loading import tokenizer_pad_id
from lit_align.ops.completions import completion_batch, completion_logprobs
from lit_align.ops.packing import SequenceBatch
from lit_align.rewards.registry import compute_rewards, load_reward_func, reward_name
from lit_align.rollout.callback import RolloutCallback
from lit_align.rollout.engines import GenerationEngine, Generations, HFEngine, SamplingParams, VLLMEngine
from lit_align.rollout.types import Rollout


class OnlineModule(WithReference, AlignModule):
    """Base of the methods that learn from their own samples (not used directly)."""

    disable_dropout_default: ClassVar[bool] = False
    kl_weight_name: ClassVar[str] = "beta"  # the argument that weighs the KL to the reference (PPO: kl_coef)
    frozen_submodules = ("ref_model",)

    def __init__(
        self,
        *args: Any,
        reward_funcs: list[str | dict] | None = None,
        reward_weights: list[float] | None = None,
        num_generations: int = 8,
        max_completion_length: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        generation_kwargs: dict[str, Any] | None = None,
        num_iterations: int = 1,
        beta: float = 0.0,
        mask_truncated_completions: bool = False,
        use_vllm: bool = False,
        vllm_gpu_memory_utilization: float = 0.3,
        vllm_tensor_parallel_size: int = 1,
        vllm_max_model_length: int | None = None,
        log_completions: bool = False,
        log_completions_steps: int = 50,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            reward_funcs: Reward functions: import paths (``lit_align.rewards.arithmetic_reward``),
                reward-model directories, or ``{class_path, init_args}`` (see ``lit_align.rewards.registry``).
                Python callers may pass callables.
            reward_weights: One weight per reward function (default all 1).
            num_generations: Completions sampled per prompt (the group).
            max_completion_length: Longest completion in tokens.
            temperature, top_p, top_k, min_p, repetition_penalty: Sampling settings (TRL's); the
                log-probs of the loss are taken at the same temperature.
            generation_kwargs: Extra keyword arguments for the engine's generate call.
            num_iterations: Updates per rollout (the old log-probs are stored with the rollout).
            beta: Weight of the KL to the reference; 0 loads no reference model.
            mask_truncated_completions: Leave completions without EOS out of the loss.
            use_vllm: Generate with a colocated vLLM engine (CUDA; weights synced after each step).
            vllm_gpu_memory_utilization, vllm_tensor_parallel_size, vllm_max_model_length: vLLM settings.
            log_completions: Log a W&B table of prompts, completions, rewards and advantages
                every ``log_completions_steps`` steps.
        """
        super().__init__(*args, **kwargs)
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if self.sync_ref_model and beta == 0.0:
            raise ValueError(f"sync_ref_model=True needs a reference model: set {self.kl_weight_name} != 0")
        self.reward_func_specs = list(reward_funcs or [])
        self.reward_funcs = [load_reward_func(spec) for spec in self.reward_func_specs]
        self.reward_weights = torch.tensor(
            reward_weights if reward_weights is not None else [1.0] * len(self.reward_funcs), dtype=torch.float32
        )
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward functions"
            )
        self.num_generations = num_generations
        self.sampling = SamplingParams(
            max_completion_length=max_completion_length,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            num_generations=num_generations,
            generation_kwargs=dict(generation_kwargs or {}),
        )
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.num_iterations = num_iterations
        self.beta = beta
        self.mask_truncated_completions = mask_truncated_completions
        self.use_vllm = use_vllm
        self.vllm_settings = {
            "gpu_memory_utilization": vllm_gpu_memory_utilization,
            "tensor_parallel_size": vllm_tensor_parallel_size,
            "max_model_length": vllm_max_model_length,
        }
        self.log_completions = log_completions
        self.log_completions_steps = log_completions_steps
        self._engine: GenerationEngine | None = None

    # -- building ------------------------------------------------------------------------------
    def data_requirements(self) -> DataRequirements:
        # batch_size counts completions; each prompt batch comes num_iterations times in a row
        return replace(super().data_requirements(), rows_per_prompt=self.num_generations, batch_repeats=self.num_iterations)

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    @property
    def loads_reference(self) -> bool:
        return self.needs_reference

    def configure_callbacks(self) -> list:
        callbacks = super().configure_callbacks()
        if not any(isinstance(c, RolloutCallback) for c in self.trainer.callbacks):  # a user's own one wins
            every = self.log_completions_steps if self.log_completions else 0
            callbacks.append(RolloutCallback(log_completions_every_n_steps=every))
        return callbacks

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.num_iterations > 1 and self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "num_iterations > 1 reuses each micro-batch's rollout on consecutive steps; with "
                f"accumulate_grad_batches={self.trainer.accumulate_grad_batches} the reuses would fall in the same "
                "optimizer step. Use accumulate_grad_batches=1 (raise batch_size instead) or num_iterations=1"
            )

    @property
    def engine(self) -> GenerationEngine:
        """The engine this module samples with: made on first use (``make_engine``), or the one
        given to a ``RolloutCallback``, which hands it over."""
        if self._engine is None:
            self._engine = self.make_engine()
        return self._engine

    @engine.setter
    def engine(self, engine: GenerationEngine) -> None:
        self._engine = engine

    def sample(
        self, model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, policy: bool = True,
        sampling: SamplingParams | None = None,
    ) -> Generations:
        """``num_generations`` completions per prompt from ``model`` through the module's engine.
        ``policy=False`` when ``model`` is not the trained policy (NashMD's mixture, XPO's
        reference, also when that is the policy's weights with its adapters off)."""
        if (not policy or model is not self.model) and not getattr(self.engine, "samples_any_model", False):
            raise ValueError(
                f"{type(self).__name__} samples {type(model).__name__}, a model other than the policy, but "
                f"its engine {type(self.engine).__name__} samples the policy only; use an engine that samples "
                "any model (HFEngine, use_vllm=False)"
            )
        return self.engine.generate(model, prompt_ids, prompt_mask, sampling or self.sampling)

    def make_engine(self) -> GenerationEngine:
        if self.use_vllm:
            return VLLMEngine(self.model_name_or_path, self.tokenizer, dtype=self.dtype_name, seed=self.global_rank,
                              policy=self.model, **self.vllm_settings)
        return HFEngine(self.tokenizer)

    # -- one rollout ---------------------------------------------------------------------------
    def make_rollout(self, batch: PromptBatch, stage: str) -> Rollout:
        """Sample, score and prepare the loss inputs of one prompt batch (called by the callback)."""
        if not self.reward_funcs:
            raise ValueError(f"{type(self).__name__} needs reward_funcs (or a reward model) to score completions")
        self.check_prompt_budget(batch)
        gens = self.sample(self.model, batch.prompt_ids, batch.prompt_mask)
        completions, rewards = self.score(batch, gens)
        return self.build_rollout(batch, gens, completions, rewards, stage)

    def build_rollout(self, batch: PromptBatch, gens: Generations, completions: list, rewards: Tensor, stage: str) -> Rollout:
        raise TypeError(f"{type(self).__name__} does not define build_rollout")

    def check_prompt_budget(self, batch: PromptBatch) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = int(batch.prompt_mask.sum(dim=1).max())
        if limit is not None and longest + self.max_completion_length > limit:
            i = int(batch.prompt_mask.sum(dim=1).argmax())
            raise ValueError(
                f"prompt {str(batch.prompts[i])[:80]!r} has {longest} tokens; with max_completion_length="
                f"{self.max_completion_length} it exceeds the model's context of {limit} tokens. Drop long prompts "
                f"with the DataModule's max_length (for example {limit - self.max_completion_length}) or lower "
                "max_completion_length"
            )

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
        completions, ids = self.decode(batch, gens)
        columns = {k: self.repeat(v) for k, v in batch.extras.items()}
        rewards = compute_rewards(self.reward_funcs, self.repeat(batch.prompts), completions, ids, columns, self.device)
        return completions, rewards

    def sequences(self, gens: Generations) -> SequenceBatch:
        return completion_batch(gens.prompt_ids, gens.prompt_mask, gens.completion_ids, gens.completion_mask, self.pad_token_id)

    @property
    def pad_token_id(self) -> int:
        return tokenizer_pad_id(self.tokenizer)

    def loss_mask(self, gens: Generations) -> Tensor:
        mask = gens.completion_mask.float()
        if self.mask_truncated_completions:
            mask = mask * (~gens.is_truncated).float().unsqueeze(1)
        return mask

    def token_logps(self, model: torch.nn.Module, seqs: SequenceBatch, gens: Generations, with_entropy: bool = False):
        """Per-token log-probs ``(N, C)`` at the sampling temperature (and entropies)."""
        return completion_logprobs(
            model, seqs, gens.completion_mask, temperature=self.temperature, chunk_size=self.chunk_size, with_entropy=with_entropy
        )

    @torch.no_grad()
    def reference_token_logps(self, seqs: SequenceBatch, gens: Generations) -> Tensor:
        """Per-token reference log-probs ``(N, C)`` of the completions."""
        with self.reference_context():
            return self.token_logps(self.reference_model, seqs, gens)[0]

    # -- distributed ------------------------------------------------------------------------------
    def gather(self, local: Tensor) -> tuple[Tensor, slice]:
        """Every rank's rows of ``local`` in rank order (the global batch), and this rank's slice."""
        n = local.size(0)
        if self.world_size == 1:
            return local, slice(0, n)
        gathered = self.all_gather(local).reshape(-1, *local.shape[1:])
        return gathered, slice(self.global_rank * n, (self.global_rank + 1) * n)

    def global_mean(self, values: Tensor, mask: Tensor) -> Tensor:
        """Masked mean over every rank's tokens."""
        totals = self.global_sum(torch.stack([(values * mask).sum(), mask.sum()]).float())
        return totals[0] / totals[1].clamp(min=1.0)

    # -- metrics ------------------------------------------------------------------------------------
    def reward_metrics(self, rewards: Tensor, weighted: Tensor, zero_std: Tensor | None) -> dict[str, float]:
        """TRL's reward metrics from the global ``(N, K)`` rewards and ``(N,)`` weighted reward."""
        out: dict[str, float] = {}
        for k, func in enumerate(self.reward_funcs):
            name = reward_name(func)
            out[f"rewards/{name}/mean"] = torch.nanmean(rewards[:, k]).item()
            out[f"rewards/{name}/std"] = nanstd(rewards[:, k]).item()
        out["reward"] = torch.nanmean(weighted).item()
        out["reward_std"] = nanstd(weighted).item()
        if zero_std is not None:
            out["frac_reward_zero_std"] = zero_std.float().mean().item()
        return out

    def completion_metrics(self, gens: Generations) -> dict[str, float]:
        """Lengths over every rank's completions (``completions/*``)."""
        lengths, _ = self.gather(gens.completion_mask.sum(1).float())
        truncated, _ = self.gather(gens.is_truncated.float())
        done = lengths[truncated == 0]
        out = {
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": truncated.mean().item(),
        }
        for stat, fn in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
            out[f"completions/{stat}_terminated_length"] = fn(done).item() if done.numel() else 0.0
        return out

    def reward_columns(self, rewards: Tensor) -> dict[str, Tensor]:
        return {reward_name(f): rewards[:, k].detach().cpu() for k, f in enumerate(self.reward_funcs)}

    def count_rollout_tokens(self, rollout: Rollout, stage: str) -> None:
        if stage == "train":
            tokens = self.global_sum(torch.tensor(float(rollout.sequences.num_tokens), device=self.device))
            rollout.metrics["num_tokens"] = self.count_tokens(tokens, stage)
