"""What the online methods (GRPO, RLOO, PPO, OnlineDPO, NashMD, XPO) share: sampling settings,
reward functions, the reference model, and the rollout template.

``make_rollout`` samples a prompt batch (``sample_batch``), scores the completions and builds the
:class:`Rollout` once, without gradients (``build_rollout``): sequences, the loss mask, old and
reference log-probs, completion metrics, token counts. A method writes ``advantages`` (what it
makes of the rewards: advantages, and any tensors its loss needs) and ``shared_step`` (the loss
from ``batch.rollout``); a REINFORCE++ would be those two. The :class:`RolloutCallback` that
calls ``make_rollout`` before every batch is added by ``configure_callbacks``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.data.formats import PromptBatch
from lit_align.methods.base import AlignModule
from lit_align.methods.metrics import completion_metrics
from lit_align.methods.reference import WithReference
from lit_align.methods.sampling import Sampling
from lit_align.methods.scoring import Scoring
from lit_align.ops.completions import completion_batch, completion_logprobs, shared_prompt_batch
from lit_align.ops.forward import join_vision
from lit_align.ops.packing import SequenceBatch
from lit_align.rewards.registry import load_reward_func
from lit_align.rollout.callback import RolloutCallback
from lit_align.rollout.engines import GenerationEngine, Generations, HFEngine, SamplingParams, VLLMEngine
from lit_align.rollout.server_engine import ServerEngine
from lit_align.rollout.types import Advantages, Rollout


class OnlineModule(WithReference, Scoring, Sampling, AlignModule):
    """Base of the methods that learn from their own samples (not used directly)."""

    images_in_rollouts: ClassVar[bool] = True  # see generates_from_images

    disable_dropout_default: ClassVar[bool] = False
    kl_weight_name: ClassVar[str] = "beta"  # the argument that weighs the KL to the reference (PPO: kl_coef)
    frozen_submodules = ("ref_model",)
    generation_steps: int = 1  # training steps one rollout serves (GenerationBatches: steps_per_generation)
    decoupled_generation: ClassVar[bool] = False  # GenerationBatches composes rollouts with gradient accumulation

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
        cache_implementation: str | None = None,
        use_transformers_continuous_batching: bool = False,
        transformers_continuous_batching_config: dict[str, Any] | None = None,
        use_transformers_paged: bool = False,
        num_iterations: int = 1,
        beta: float = 0.0,
        mask_truncated_completions: bool = False,
        cast_lm_head_to_fp32: bool = False,
        shared_prompt_forward: bool = False,
        use_vllm: bool = False,
        vllm_mode: Literal["colocate", "server"] = "colocate",
        vllm_gpu_memory_utilization: float = 0.3,
        vllm_tensor_parallel_size: int = 1,
        vllm_max_model_length: int | None = None,
        vllm_model_impl: str = "vllm",
        vllm_enable_sleep_mode: bool = False,
        vllm_structured_outputs_regex: str | None = None,
        vllm_server_base_url: str | None = None,
        vllm_server_host: str = "0.0.0.0",
        vllm_server_port: int = 8000,
        vllm_server_timeout: float = 240.0,
        vllm_group_port: int = 51216,
        log_completions: bool = False,
        log_completions_steps: int = 50,
        num_completions_to_print: int | None = None,
        log_unique_prompts: bool = False,
        log_completions_hub_repo: str | None = None,
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
            temperature: Sampling temperature (TRL's); the log-probs of the loss are taken at it too.
            top_p: Nucleus sampling's probability mass (1: off).
            top_k: Sample among the ``top_k`` likeliest tokens (0: off).
            min_p: Drop tokens below ``min_p`` times the likeliest one's probability (None: off).
            repetition_penalty: Penalty on tokens already in the sequence (1: off).
            generation_kwargs: Extra keyword arguments for the engine's generate call.
            cache_implementation: The KV cache of ``model.generate`` (``static``, ``offloaded``, ...; TRL's);
                set, the HF engine samples with ``generate`` instead of its lean loop.
            use_transformers_continuous_batching: Sample with transformers' paged continuous batching
                (``model.generate_batch``) in the HF engine.
            transformers_continuous_batching_config: ``ContinuousBatchingConfig`` fields for it.
            use_transformers_paged: TRL's deprecated name of ``use_transformers_continuous_batching``.
            num_iterations: Updates per rollout (the old log-probs are stored with the rollout).
            beta: Weight of the KL to the reference; 0 loads no reference model.
            mask_truncated_completions: Leave completions without EOS out of the loss.
            cast_lm_head_to_fp32: Compute the log-probs' logits in fp32 on a bf16/fp16 model (TRL's).
            shared_prompt_forward: Run the training forward (and the old, reference and value ones) over
                each prompt once for all its completions rather than once per completion: one row per
                group, each completion attending to the prompt and itself (an explicit attention mask,
                ``attn_implementation`` sdpa or eager; text prompts only). The same log-probs to rounding;
                worth it when prompts are long beside completions (``benchmarks/README.md``: the update
                in half the time at 94-token prompts and 8 completions of 64). Not in TRL.
            use_vllm: Generate with vLLM (weights synced after each optimizer step): in this process
                (``vllm_mode: colocate``, CUDA) or in a ``lit-align serve`` process (``vllm_mode: server``;
                that server runs vLLM on a GPU, else lit-align's HF engine, so it also works on CPU).
            vllm_mode: ``colocate`` or ``server`` (TRL's).
            vllm_gpu_memory_utilization: Share of the GPU's memory a colocated vLLM may take.
            vllm_tensor_parallel_size: A colocated vLLM's tensor-parallel degree (each group of this many
                ranks samples its gathered prompts together).
            vllm_max_model_length: A colocated vLLM's context length (None: the model's).
            vllm_model_impl: ``vllm`` or ``transformers`` model code in a colocated vLLM.
            vllm_enable_sleep_mode: A colocated vLLM frees its GPU memory between generations.
            vllm_structured_outputs_regex: Guided decoding by this regex (vLLM, colocated or served).
            vllm_server_base_url: The generation server's URL (else ``http://host:port`` below).
            vllm_server_host: The generation server's host.
            vllm_server_port: The generation server's port.
            vllm_server_timeout: Seconds to wait for the server to answer at the start.
            vllm_group_port: The server's port for the weight-sync process group.
            log_completions: Log a W&B table of prompts, completions, rewards and advantages
                every ``log_completions_steps`` steps.
            num_completions_to_print: With ``log_completions``, also print this many rows of it to the
                console (None: all), as TRL.
            log_unique_prompts: The table keeps one row per distinct prompt (TRL's).
            log_completions_hub_repo: A Hub dataset repository the completion tables (parquet files under
                ``<default_root_dir>/completions``) are pushed to every two minutes (TRL's).
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
        if use_transformers_paged:
            warnings.warn("use_transformers_paged is deprecated in TRL; use use_transformers_continuous_batching",
                          FutureWarning, stacklevel=2)
        self.continuous_batching = (dict(transformers_continuous_batching_config or {})
                                    if use_transformers_continuous_batching or use_transformers_paged else None)
        if self.continuous_batching is not None and use_vllm:
            raise ValueError("use_transformers_continuous_batching and use_vllm pick two engines: choose one")
        generation_kwargs = dict(generation_kwargs or {})
        if cache_implementation is not None:
            generation_kwargs["cache_implementation"] = cache_implementation
        self.sampling = SamplingParams(
            max_completion_length=max_completion_length,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            num_generations=num_generations,
            generation_kwargs=generation_kwargs,
        )
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.num_iterations = num_iterations
        self.beta = beta
        self.mask_truncated_completions = mask_truncated_completions
        self.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
        self.shared_prompt_forward = shared_prompt_forward
        if vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode must be 'colocate' or 'server', got {vllm_mode!r}")
        self.use_vllm = use_vllm
        self.vllm_mode = vllm_mode
        self.vllm_settings = {
            "gpu_memory_utilization": vllm_gpu_memory_utilization,
            "tensor_parallel_size": vllm_tensor_parallel_size,
            "max_model_length": vllm_max_model_length,
            "model_impl": vllm_model_impl,
            "enable_sleep_mode": vllm_enable_sleep_mode,
            "structured_outputs_regex": vllm_structured_outputs_regex,
        }
        self.server_settings = {
            "base_url": vllm_server_base_url, "host": vllm_server_host, "port": vllm_server_port,
            "group_port": vllm_group_port, "connection_timeout": vllm_server_timeout,
            "structured_outputs_regex": vllm_structured_outputs_regex,
        }
        self.log_completions = log_completions
        self.log_completions_steps = log_completions_steps
        self.num_completions_to_print = num_completions_to_print
        self.log_unique_prompts = log_unique_prompts
        if log_completions_hub_repo is not None and not log_completions:
            raise ValueError("log_completions_hub_repo is set, but log_completions is False: set log_completions: true to "
                             "upload completions, or unset log_completions_hub_repo")
        self.log_completions_hub_repo = log_completions_hub_repo

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
            callbacks.append(RolloutCallback(
                log_completions_every_n_steps=every, num_completions_to_print=self.num_completions_to_print,
                log_unique_prompts=self.log_unique_prompts, hub_repo=self.log_completions_hub_repo,
            ))
        return callbacks

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.decoupled_generation and self.num_iterations > 1 and self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "num_iterations > 1 reuses each micro-batch's rollout on consecutive steps; with "
                f"accumulate_grad_batches={self.trainer.accumulate_grad_batches} the reuses would fall in the same "
                "optimizer step. Use accumulate_grad_batches=1 (raise batch_size instead) or num_iterations=1"
            )

    def make_engine(self) -> GenerationEngine:
        if self.use_vllm and self.vllm_mode == "server":
            return ServerEngine(tokenizer=self.tokenizer, **self.server_settings)
        if self.use_vllm:
            return VLLMEngine(self.model_name_or_path, self.tokenizer, dtype=self.dtype_name, seed=self.global_rank,
                              policy=self.model, **self.vllm_settings)
        return HFEngine(self.tokenizer, continuous_batching=self.continuous_batching)

    # -- one rollout ---------------------------------------------------------------------------
    @property
    def needs_old_logps(self) -> bool:
        """Whether a rollout keeps the sampling-time log-probs (else the ratio's denominator is ``logp.detach()``)."""
        return self.num_iterations > 1

    def make_rollout(self, batch: PromptBatch, stage: str) -> Rollout:
        """Sample, score and prepare the loss inputs of one prompt batch (called by the callback)."""
        if not self.can_score:
            raise ValueError(f"{type(self).__name__} needs reward_funcs (or a reward model) to score completions")
        if batch.vision_rows is not None and not self.generates_from_images:
            raise ValueError(f"{type(self).__name__} does not generate from images yet (GRPO, RLOO and OnlineDPO do, "
                             "without tools or environments); drop the image column, or train on images with GRPO, "
                             "RLOO, OnlineDPO, SFT, DPO or KTO")
        self.check_prompt_budget(batch)
        gens = self.sample_batch(batch)
        completions, rewards = self.score(batch, gens)
        return self.build_rollout(batch, gens, completions, rewards, stage)

    def sample_batch(self, batch: PromptBatch) -> Generations:
        """The completions of one prompt batch (the pair methods sample a second source too)."""
        return self.sample(self.model, batch.prompt_ids, batch.prompt_mask, vision_rows=batch.vision_rows)

    def build_rollout(self, batch: PromptBatch, gens: Generations, completions: list, rewards: Tensor, stage: str) -> Rollout:
        """The part every online method shares, computed once, without gradients: sequences, the loss
        mask, old and reference log-probs, completion metrics and token counts. The method's
        :meth:`advantages` adds its advantages, rewards, metrics and extra tensors."""
        rollout = Rollout(
            generations=gens, sequences=self.sequences(gens), loss_mask=self.loss_mask(gens),
            rows_per_prompt=len(gens) // len(batch), prompts=self.repeat(batch.prompts), completions=completions,
            reward_columns={name: rewards[:, k].detach().cpu() for k, name in enumerate(self.reward_names)},
            metrics=self.completion_metrics(gens),
        )
        rollout.log_columns, logged = self.take_reward_logs(len(gens))
        rollout.metrics.update(logged)
        with torch.no_grad():
            if self.needs_old_logps:
                rollout.old_logps = self.per_step(rollout, self.old_token_logps)
            if self.needs_reference:
                rollout.ref_logps = self.per_step(rollout, lambda r: self.reference_token_logps(r.sequences, r.generations))
            out = self.advantages(rollout, rewards)
        rollout.advantages, rollout.rewards = out.advantages, out.rewards
        rollout.extras.update(out.extras)
        rollout.metrics.update(out.metrics)
        if stage == "train":
            real = gens.prompt_mask.sum() + gens.completion_mask.sum()  # each completion's prompt and itself, as TRL counts
            tokens = self.global_sum(real.float().to(self.device))
            rollout.metrics["num_tokens"] = self.count_tokens(tokens, stage)
        return rollout

    def per_step(self, rollout: Rollout, fn: Callable[[Rollout], Tensor]) -> Tensor:
        """``fn``'s ``(N, C)`` per-token values over the rollout, a training step's rows at a time when one
        rollout serves several steps (the forward's memory stays that of one step, as TRL's)."""
        if self.generation_steps == 1:
            return fn(rollout)
        parts = []
        for idx in torch.arange(len(rollout), device=rollout.loss_mask.device).tensor_split(self.generation_steps):
            gens = rollout.generations.select(idx)
            parts.append(fn(replace(rollout, generations=gens, sequences=self.sequences(gens))))
        return torch.cat(parts)

    def advantages(self, rollout: Rollout, rewards: Tensor) -> Advantages:
        """What the method makes of this device's ``(N, K)`` rewards (one column per reward
        function): the rows' advantages, the reward each row counts with, the global metrics, and
        any tensors its loss reads besides the shared fields."""
        raise TypeError(f"{type(self).__name__} does not define advantages()")

    def old_token_logps(self, rollout: Rollout) -> Tensor:
        """The policy's per-token log-probs at sampling time ``(N, C)``."""
        return self.token_logps(self.model, rollout.sequences, rollout.generations)[0]

    def sequences(self, gens: Generations) -> SequenceBatch:
        if self.shared_prompt_forward:
            if gens.vision_rows is not None:
                raise ValueError("shared_prompt_forward does not take prompts with images yet: set it to false")
            return shared_prompt_batch(gens.prompt_ids, gens.prompt_mask, gens.completion_ids, gens.completion_mask,
                                       self.pad_token_id)
        batch = completion_batch(gens.prompt_ids, gens.prompt_mask, gens.completion_ids, gens.completion_mask, self.pad_token_id)
        if gens.vision_rows is not None:  # each row's prompt images, for the policy's and the reference's forward
            batch.vision = self.image_tokens.with_token_types(batch.input_ids, join_vision(gens.vision_rows))
        return batch

    @property
    def generates_from_images(self) -> bool:
        """Whether this method's rollouts sample a vision-language model from prompts with images: the
        methods that sample the policy alone, in one turn (GRPO, RLOO, OnlineDPO); not yet NashMD's
        mixture, XPO's reference, PPO's value model, or tool and environment turns."""
        return self.images_in_rollouts and getattr(self, "toolbox", None) is None  # environments bring a toolbox

    def loss_mask(self, gens: Generations) -> Tensor:
        mask = gens.model_mask.float()  # tool results (multi-turn rollouts) never count
        if self.mask_truncated_completions:
            mask = mask * (~gens.is_truncated).float().unsqueeze(1)
        return mask

    def token_logps(self, model: torch.nn.Module, seqs: SequenceBatch, gens: Generations, with_entropy: bool = False):
        """Per-token log-probs ``(N, C)`` at the sampling temperature (and entropies)."""
        return completion_logprobs(
            model, seqs, gens.completion_mask, temperature=self.temperature, chunk_size=self.chunk_size,
            with_entropy=with_entropy, fp32_head=self.cast_lm_head_to_fp32,
        )

    @torch.no_grad()
    def reference_token_logps(self, seqs: SequenceBatch, gens: Generations) -> Tensor:
        """Per-token reference log-probs ``(N, C)`` of the completions."""
        with self.reference_context():
            return self.token_logps(self.reference_model, seqs, gens)[0]

    # -- metrics ------------------------------------------------------------------------------------
    def completion_metrics(self, gens: Generations) -> dict[str, float]:
        """Lengths over every rank's completions (``completions/*``)."""
        return completion_metrics(self.gather(gens.model_mask.sum(1).float())[0], self.gather(gens.is_truncated.float())[0])
