"""Generation engines: one small protocol, two implementations.

An engine turns left-padded prompts into ``n`` sampled completions per prompt in one
batched call::

    engine.generate(model, prompt_ids, prompt_mask, sampling) -> Generations
    engine.sync_weights(model)   # before a rollout, after optimizer steps (no-op for in-process engines)

- :class:`HFEngine`: Hugging Face ``generate`` on the policy itself (KV cache on,
  gradient checkpointing off for the call); always available, the CPU path.
- :class:`VLLMEngine`: a colocated ``vllm.LLM`` (used when vLLM is installed and asked
  for), its weights refreshed from the policy after each optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lit_align.models.loading import tokenizer_pad_id
from lit_align.ops.forward import in_model_dtype, join_vision


@dataclass(frozen=True)
class SamplingParams:
    """TRL's generation settings (``GRPOConfig`` names)."""

    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_generations: int = 1
    generation_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")


@dataclass
class Generations:
    """``N = prompts * num_generations`` completions; the ``G`` of a prompt are consecutive rows."""

    prompt_ids: Tensor  # (N, P) long, left-padded
    prompt_mask: Tensor  # (N, P) long
    completion_ids: Tensor  # (N, C) long, right-padded with the pad token
    completion_mask: Tensor  # (N, C) long: tokens up to and including the first EOS
    is_truncated: Tensor  # (N,) bool: no EOS within max_completion_length
    sampling_logps: Tensor | None = None  # (N, C) engine log-probs of the sampled tokens, after its processors
    tool_mask: Tensor | None = None  # (N, C) long: 1 where the model wrote the token, 0 on tool results (multi-turn)
    vision_rows: list[dict[str, Tensor]] | None = None  # a VLM's image inputs of each row's prompt (its pixels, grids)

    def __len__(self) -> int:
        return self.completion_ids.size(0)

    @property
    def model_mask(self) -> Tensor:
        """``completion_mask`` without tool-result tokens: the tokens the model wrote (N, C)."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask * self.tool_mask

    def select(self, index: Tensor) -> Generations:
        """The rows at ``index``, every field (sampling log-probs included)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        rows = index.tolist()
        return Generations(**{name: None if v is None else [v[i] for i in rows] if isinstance(v, list) else v[index]
                              for name, v in values.items()})

    def cat(self, other: Generations, pad_token_id: int) -> Generations:
        """These rows, then ``other``'s (completions right-padded to the wider of the two)."""
        width = max(self.completion_ids.size(1), other.completion_ids.size(1))
        pads = {"completion_ids": pad_token_id, "completion_mask": 0, "sampling_logps": 0.0, "tool_mask": 1}

        def joined(name: str) -> Tensor | None:
            a, b = getattr(self, name), getattr(other, name)
            if a is None or b is None:
                return None
            if isinstance(a, list):
                return a + b
            if name in pads:
                a, b = (torch.nn.functional.pad(t, (0, width - t.size(1)), value=pads[name]) for t in (a, b))
            return torch.cat([a, b])

        return Generations(**{f.name: joined(f.name) for f in fields(self)})


@runtime_checkable
class GenerationEngine(Protocol):
    """What an engine promises (an online module owns one; the rollout callback only schedules it).

    ``generate(model, prompt_ids, prompt_mask, sampling)``:
    - samples ``model``, and only it: an engine that holds its own copy of the policy (vLLM)
      sets ``samples_any_model = False`` and refuses any other model; ``OnlineModule.sample``
      says so before asking;
    - takes left-padded prompts ``(E, P)`` and returns ``E * num_generations`` rows, the
      completions of a prompt consecutive, prompts repeated to match;
    - right-pads completions with the tokenizer's pad id; ``completion_mask`` covers the tokens
      up to and including the first EOS (any of the tokenizer's or the model's generation
      config's), ``is_truncated`` marks rows without one;
    - ``sampling_logps``, when it can, holds the engine's log-prob of each sampled token.

    ``sync_weights(model)`` before a rollout when optimizer steps moved the policy since the last
    one (and before the first): copy the policy's weights into the engine
    (a no-op for engines that sample the module itself).

    ``connect(tokenizer)`` when a module takes the engine: the module's tokenizer, for an engine
    made without one (declared in YAML, say); an engine given one at construction keeps it.
    """

    samples_any_model: bool

    def connect(self, tokenizer: Any) -> None: ...

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Generations: ...

    def sync_weights(self, model: nn.Module) -> None: ...


def completion_mask(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mask of the tokens up to and including the first EOS ``(N, C)``, and which rows have none."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.size(1), dtype=torch.long))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
    return (positions[None] <= first[:, None]).long(), ~has_eos


def eos_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config adds (chat models end turns with several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id: generation cannot stop; set one on the tokenizer")
    return sorted(ids)


def right_pad(rows: list[list[int]], pad_token_id: int, width: int | None = None, device=None) -> Tensor:
    width = max([len(r) for r in rows] + [1]) if width is None else width
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:width], dtype=torch.long)
    return out.to(device) if device is not None else out


@contextlib.contextmanager
def generation_mode(model: nn.Module) -> Iterator[None]:
    """No gradient checkpointing (it would disable the KV cache) for the duration of a generate call,
    and an FSDP2-sharded model's weights gathered whole (``lit_align.ops.sharding.full_parameters``:
    a no-op inside a rollout, which gathers them for all of its generate calls). Layers compiled for
    training (``torch_compile``) run eagerly here: a KV cache and one-token steps would recompile them."""
    from lit_align.ops.sharding import full_parameters

    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if checkpointing:
        model.gradient_checkpointing_disable()
    try:
        with torch.no_grad(), full_parameters(model), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class TokenizerEngine:
    """What the engines share: the tokenizer (given, or connected by the module) and its pad id."""

    tokenizer: Any = None

    def connect(self, tokenizer: Any) -> None:
        if self.tokenizer is None:
            self.tokenizer = tokenizer

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__} has no tokenizer: pass one, or give the engine to a module (it connects it)")
        return tokenizer_pad_id(self.tokenizer)


def image_token_id(model: nn.Module) -> int:
    """The token a vision-language model's prompts hold its images' features at (never one to sample)."""
    config = model.config
    token = getattr(config, "image_token_id", None)
    return token if token is not None else config.image_token_index


class HFEngine(TokenizerEngine):
    """Sampling from the policy itself with its KV cache: every completion of every prompt in one batch.

    The default decoder is a lean loop over the Hugging Face model's forward: each prompt is
    prefilled once and its cache copied ``num_generations`` times, tokens are drawn with
    ``generate``'s logit processors and an inverse-CDF draw (:mod:`lit_align.ops.sampling`,
    about 20x cheaper per token than ``torch.multinomial`` on CPU), and decoding stops when
    every row has ended. ``use_generate=True`` (or any ``generation_kwargs`` other than
    ``min_new_tokens``) calls ``model.generate`` instead. ``continuous_batching`` (a dict of
    ``transformers.generation.ContinuousBatchingConfig`` fields, ``{}`` for its defaults) calls
    transformers' paged continuous-batching ``model.generate_batch`` (TRL's
    ``use_transformers_continuous_batching``; worth it on a GPU with many prompts of mixed lengths,
    slow to start on CPU).
    """

    LEAN_KWARGS = frozenset({"min_new_tokens"})
    samples_any_model = True  # the policy, a reference, a mixture of both: any causal LM
    samples_images = True  # a vision-language model's prompts with their pixels (generate's vision_rows)

    def __init__(self, tokenizer: Any = None, use_generate: bool = False, seed: int | None = None,
                 continuous_batching: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.use_generate = use_generate
        self.continuous_batching = continuous_batching
        self.generator: torch.Generator | None = None
        self.seed = seed


    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams,
                 vision_rows: list[dict[str, Tensor]] | None = None) -> Generations:
        """``vision_rows``: a VLM's image inputs of each prompt (its images' pixels), which the prefill reads."""
        n = sampling.num_generations
        eos = eos_ids(self.tokenizer, model)
        rows = None if vision_rows is None else [row for row in vision_rows for _ in range(n)]  # each completion's prompt's
        with generation_mode(model):
            if self.continuous_batching is not None:
                if vision_rows is not None:
                    raise ValueError("transformers' continuous batching does not take images; leave "
                                     "use_transformers_continuous_batching off to sample a vision-language model")
                completions, logps = self._generate_batch(model, prompt_ids, prompt_mask, sampling, eos)
            elif self.use_generate or set(sampling.generation_kwargs) - self.LEAN_KWARGS:
                vision = None if rows is None else in_model_dtype(model, join_vision(rows))
                completions, logps = self._hf_generate(model, prompt_ids, prompt_mask, sampling, eos, vision)
            else:
                vision = None if vision_rows is None else in_model_dtype(model, join_vision(vision_rows))
                completions, logps = self._decode(model, prompt_ids, prompt_mask, sampling, eos, vision)
        cmask, truncated = completion_mask(completions, eos)
        completions = completions.masked_fill(cmask == 0, self.pad_token_id)
        return Generations(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), completions, cmask,
                           truncated, logps.masked_fill(cmask == 0, 0.0), vision_rows=rows)

    def _hf_generate(self, model, prompt_ids, prompt_mask, sampling: SamplingParams, eos: list[int],
                     vision: dict[str, Tensor] | None = None) -> Tensor:
        n = sampling.num_generations
        ids, mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **({} if vision is None else {**vision, "suppress_tokens": [image_token_id(model)]}),
            max_new_tokens=sampling.max_completion_length,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self.pad_token_id,
            eos_token_id=eos,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=True,
            **sampling.generation_kwargs,
        )
        completions = out.sequences[:, ids.size(1) :]
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # (N, C, V) after the processors
        return completions, scores.gather(-1, completions.unsqueeze(-1)).squeeze(-1)

    def _generate_batch(self, model, prompt_ids, prompt_mask, sampling: SamplingParams, eos: list[int]) -> tuple[Tensor, Tensor]:
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        n = sampling.num_generations
        config = GenerationConfig(
            max_new_tokens=sampling.max_completion_length, do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None, top_p=sampling.top_p,
            top_k=sampling.top_k, min_p=sampling.min_p, repetition_penalty=sampling.repetition_penalty,
            eos_token_id=eos, pad_token_id=self.pad_token_id, **sampling.generation_kwargs,
        )
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask) for _ in range(n)]
        sizes = {}
        if prompt_ids.device.type == "cpu":  # transformers sizes its paged cache from free memory and zeroes it on
            # every call (~40 s on CPU): size it for this batch instead, unless the config says otherwise
            tokens = sum(len(p) for p in prompts) + len(prompts) * sampling.max_completion_length
            sizes = {"max_batch_tokens": tokens, "num_blocks": -(-tokens // 256) + len(prompts), "page_size": 256}
        batching = ContinuousBatchingConfig(**{"return_logprobs": True, **sizes, **self.continuous_batching})
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching, progress_bar=False)
        rows = [out[f"req_{i}"] for i in range(len(prompts))]  # request ids follow the inputs' order
        ids = right_pad([list(r.generated_tokens) for r in rows], self.pad_token_id, device=prompt_ids.device)
        logps = torch.zeros(ids.shape, dtype=torch.float32)
        for i, r in enumerate(rows):
            if r.logprobs:
                logps[i, : len(r.logprobs)] = torch.tensor(r.logprobs[: ids.size(1)], dtype=torch.float32)
        return ids, logps.to(prompt_ids.device)

    def _decode(self, model, prompt_ids, prompt_mask, sampling: SamplingParams, eos: list[int],
                vision: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        from transformers import DynamicCache

        from lit_align.ops.sampling import process_logits, sample_probs

        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(prompt_ids.device).manual_seed(self.seed)
        n, device = sampling.num_generations, prompt_ids.device
        cache = model.new_cache() if hasattr(model, "new_cache") else DynamicCache()  # a mixture brings a pair
        cache_arg = decoder_cache_argument(model)
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_arg: cache}, **(vision or {}))  # images enter at the prefill only
        cache.batch_repeat_interleave(n)  # prefill each prompt once, then copy its cache per sample
        logits = out.logits[:, -1].repeat_interleave(n, 0)
        rows, width, steps = logits.size(0), prompt_mask.size(1), sampling.max_completion_length
        # Outputs and the growing mask live in buffers made once: a small tensor made every step
        # between the step's large temporaries would pin them in the heap (resident memory then
        # grows by a [rows, vocab] block per token).
        tokens = torch.full((rows, steps), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(rows, steps, dtype=torch.float32, device=device)  # drawn tokens' log-probs (as vLLM's)
        mask = torch.ones(rows, width + steps, dtype=prompt_mask.dtype, device=device)
        mask[:, :width] = prompt_mask.repeat_interleave(n, 0)
        history = prompt_ids.repeat_interleave(n, 0)  # for the repetition penalty
        position = positions[:, -1:].repeat_interleave(n, 0)
        eos_t = torch.tensor(eos, device=device)
        is_eos = torch.zeros(logits.size(-1), dtype=torch.bool, device=device)
        is_eos[eos_t[eos_t < logits.size(-1)]] = True
        min_new = int(sampling.generation_kwargs.get("min_new_tokens", 0) or 0)
        never = None
        if vision is not None:  # a sampled image token would have no pixels behind it in the training forward
            never = torch.zeros_like(is_eos)
            never[image_token_id(model)] = True
        early = is_eos if never is None else is_eos | never  # banned before min_new_tokens; `never` after
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        for step in range(steps):
            banned = early if step < min_new else never
            scores = process_logits(
                logits, history, temperature=sampling.temperature if sampling.temperature > 0 else 1.0,
                top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                repetition_penalty=sampling.repetition_penalty, banned=banned,
            )
            probs = scores.softmax(-1)  # drawn from; the drawn token's log-prob is read off it (never 0)
            token = scores.argmax(-1) if sampling.temperature == 0 else sample_probs(probs, self.generator)
            token = token.masked_fill(finished, self.pad_token_id)
            tokens[:, step] = token
            logps[:, step] = probs.gather(1, token[:, None]).squeeze(1).log()
            del scores, probs
            finished |= torch.isin(token, eos_t)
            if finished.all() or step + 1 == steps:
                break
            history = torch.cat([history, token[:, None]], 1) if sampling.repetition_penalty != 1.0 else history
            position += 1
            out = model(input_ids=token[:, None], attention_mask=mask[:, : width + step + 1], position_ids=position,
                        use_cache=True, **{cache_arg: cache})
            logits = out.logits[:, -1]
        return tokens[:, : step + 1], logps[:, : step + 1]

    def sync_weights(self, model: nn.Module) -> None:
        """The engine samples from the policy itself: nothing to copy."""


def decoder_cache_argument(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older models), by the forward's signature."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class VLLMEngine(TokenizerEngine):
    """A colocated ``vllm.LLM`` sharing the GPU with training (TRL's ``vllm_mode="colocate"``).

    Weights are pushed from the policy with ``load_weights`` after each optimizer step (LoRA
    adapters merged first) and the prefix cache is reset. Sampling log-probs come back with
    the completions (``logprobs_mode="processed_logprobs"``, so after temperature), for
    importance-sampling correction. With ``tensor_parallel_size > 1`` each group of that many
    consecutive ranks gathers its prompts, generates them together (vLLM's tensor-parallel
    workers need the same requests) and keeps its own rows, as TRL. ``enable_sleep_mode`` frees
    the weights and KV cache between generations (TRL's ``vllm_enable_sleep_mode``);
    ``structured_outputs_regex`` constrains every completion to a regex.
    """

    samples_any_model = False  # its own copy of the policy's weights

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer: Any = None,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        max_model_length: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        llm: Any = None,
        policy: nn.Module | None = None,
        model_impl: str = "vllm",
        enable_sleep_mode: bool = False,
        structured_outputs_regex: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.policy = policy  # the one model this engine samples (its weights arrive by sync_weights)
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self.structured_outputs_regex = structured_outputs_regex
        self._tp_group: Any = None
        if llm is None:
            try:
                from vllm import LLM
            except ImportError as err:
                raise ImportError("use_vllm=True needs vLLM: pip install vllm (a CUDA machine)") from err
            if model_name_or_path.startswith("builtin:"):
                raise ValueError("vLLM loads models from a directory or the Hub, not builtin: models")
            llm = LLM(
                model=model_name_or_path,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_length,
                dtype=dtype,
                seed=seed,
                distributed_executor_backend="external_launcher",
                logprobs_mode="processed_logprobs",
                max_num_batched_tokens=4096,
                model_impl=model_impl,
                enable_sleep_mode=enable_sleep_mode,
            )
        self.llm = llm

    def _sampling_params(self, sampling: SamplingParams) -> Any:
        from vllm import SamplingParams as VLLMSampling

        return VLLMSampling(
            n=sampling.num_generations,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            min_p=0.0 if sampling.min_p is None else sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            max_tokens=sampling.max_completion_length,
            logprobs=0,
            **self._guide(),
            **sampling.generation_kwargs,
        )

    def _guide(self) -> dict[str, Any]:
        """vLLM's guided-decoding argument for ``structured_outputs_regex`` (its name changed in 0.10.2)."""
        if self.structured_outputs_regex is None:
            return {}
        try:
            from vllm.sampling_params import StructuredOutputsParams

            return {"structured_outputs": StructuredOutputsParams(regex=self.structured_outputs_regex)}
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            return {"guided_decoding": GuidedDecodingParams(regex=self.structured_outputs_regex)}

    def generate(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams) -> Generations:
        if self.policy is not None and model is not self.policy:
            raise ValueError(
                f"the vLLM engine samples the policy only (its weights are the policy's), but was asked to sample "
                f"{type(model).__name__}, another model (a reference, a mixture): sample that one with the HF engine (use_vllm=False)"
            )
        prompts = [[t for t, m in zip(p, pm) if m] for p, pm in zip(prompt_ids.tolist(), prompt_mask.tolist())]
        prompts, mine = self.gather_prompts(prompts)
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts], sampling_params=self._sampling_params(sampling), use_tqdm=False
            )
        finally:
            if self.enable_sleep_mode:
                self.llm.sleep(level=2)  # weights come back with the next sync_weights
        return self.to_generations(outputs[mine], prompt_ids, prompt_mask, sampling, eos_ids(self.tokenizer, model))

    def gather_prompts(self, prompts: list[list[int]]) -> tuple[list[list[int]], slice]:
        """Every prompt of this rank's tensor-parallel group, and the slice of the outputs that are this rank's."""
        import torch.distributed as dist

        if self.tensor_parallel_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return prompts, slice(None)
        if self._tp_group is None:
            self._tp_group, _ = dist.new_subgroups(group_size=self.tensor_parallel_size)
        gathered: list[Any] = [None] * self.tensor_parallel_size
        dist.all_gather_object(gathered, prompts, group=self._tp_group)
        start = sum(len(g) for g in gathered[: dist.get_rank(self._tp_group)])
        return [p for g in gathered for p in g], slice(start, start + len(prompts))

    def to_generations(self, outputs: list, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingParams, eos: list[int]) -> Generations:
        """vLLM ``RequestOutput``s (``n`` samples each) as :class:`Generations`."""
        n, device = sampling.num_generations, prompt_ids.device
        samples = [s for out in outputs for s in out.outputs]
        if len(samples) != prompt_ids.size(0) * n:
            raise RuntimeError(f"vLLM returned {len(samples)} completions for {prompt_ids.size(0)} prompts x {n}")
        ids = right_pad([list(s.token_ids) for s in samples], self.pad_token_id, device=device)
        logps = None
        if all(s.logprobs is not None for s in samples):
            rows = [[next(iter(d.values())).logprob if d else float("nan") for d in s.logprobs] for s in samples]
            logps = torch.zeros(ids.shape, dtype=torch.float32)
            for i, r in enumerate(rows):
                logps[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
            logps = logps.to(device)
        cmask, truncated = completion_mask(ids, eos)
        return Generations(
            prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids, cmask, truncated, logps
        )

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        from lit_align.models.reference import is_peft_model

        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
        merged = is_peft_model(model)
        if merged:
            model.merge_adapter()
        try:
            target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            for name, param in _vllm_named_parameters(model):
                target.load_weights([(name, param.data)])
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()


def _vllm_named_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under the names vLLM expects (PEFT prefixes and LoRA tensors removed)."""
    for name, param in model.named_parameters():
        if "lora_" in name or "original_module" in name:  # adapters (merged in) and the frozen copies
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        name = name.replace("modules_to_save.default.", "")
        yield name, param
