"""GPU check: SFT, DPO and GRPO, lit-align against TRL 1.16, on a Qwen2.5-0.5B-shaped model in bf16.

One short run meant for a single CUDA GPU (an H200 here), offline: the model is a ``Qwen2ForCausalLM``
built from a config with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
vocabulary 151,936, tied embeddings: 494M parameters) and random weights drawn from a fixed seed, saved
in bf16 with the byte-level tokenizer of ``builtin:tiny`` beside it (as ``bench_*.py`` do, both sides
load that directory). The rows are synthetic text of fixed length (``common.synthetic_prompt_completion``,
``bench_preference.synthetic_pairs``; byte tokenizer: one character = one token), so every step of every
configuration trains on the same token batch shape. For each method a few warm-up steps, then timed
steps (wall time between the ends of two optimizer steps, after ``torch.cuda.synchronize``), for
lit-align (a Lightning ``Trainer``, ``precision="bf16-true"``, ``dtype="bfloat16"``) and TRL's trainer
(``bf16=True``, ``model_init_kwargs={"dtype": "bfloat16"}``) with the same hyper-parameters (AdamW,
no weight decay, TRL's learning rate of the method, clipping at 1.0, no gradient accumulation).

Printed and written as JSON (``--out``, else ``$OUT/gpu_check.json`` when ``$OUT`` is set): steps/s,
tokens/s, peak CUDA memory (``torch.cuda.max_memory_allocated`` since the run started) and MFU:

    MFU = model FLOPs of the timed steps / their wall time / peak FLOP/s
    model FLOPs per step (P = parameters that take part in matmuls: all but the input embedding,
    plus the LM head, i.e. all 494M of the tied model; T = tokens of the step; attention's
    T^2 terms are left out, so MFU is slightly underestimated):
        SFT   6 P T   (T: prompt + completion tokens trained on)
        DPO   8 P T   (6 P T policy forward + backward, 2 P T frozen reference forward; T: chosen + rejected)
        GRPO  8 P T   (2 P T generation, prefill + decode, 6 P T update; T: prompt + completion tokens
                      of every completion)
    peak FLOP/s: measured in the same run, the best mean of a large bf16 matmul (8192^3) on the device.

The same formula serves both frameworks, so MFU compares them as tokens/s does (lit-align's LM head runs
on completion tokens only and its generation prefills each prompt once: work the formula still counts).

    bash benchmarks/gpu_check.sh                  # on the GPU machine: installs the carried wheels, runs this
    python benchmarks/gpu_check.py --steps 5      # 5 timed steps each (default: SFT, DPO 10, GRPO 5), after --warmup 2
    python benchmarks/gpu_check.py --dry-run      # CPU, tiny model, fp32, 2 steps each: the same code path
    python benchmarks/gpu_check.py --methods sft --configs lit trl_fast

Configurations per method (``--configs``): ``lit`` (lit-align defaults), ``trl_fast`` (TRL,
``gradient_checkpointing=False``), ``trl_default`` (TRL's defaults: gradient checkpointing on),
``lit_gc`` (lit-align with ``gradient_checkpointing=True``), ``lit_shared`` (GRPO only: lit-align with
``shared_prompt_forward=True``, each prompt once per group in the update's forward), ``lit_compile``
(lit-align with ``torch_compile=True``: each decoder layer compiled), ``lit_shared_compile`` (GRPO only:
both), ``trl_compile`` (TRL with
``torch_compile=True``, the whole model compiled, and ``gradient_checkpointing=False``). Runs share one process by default (no
import or start-up repeated); ``--isolate`` runs each in its own process (``common.run_child``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # lit_align from the checkout (the GPU machine does not install it)

from bench_grpo import Phases  # noqa: E402
from bench_preference import synthetic_pairs  # noqa: E402
from common import (  # noqa: E402
    Result,
    StepClock,
    _fmt,
    emit,
    markdown_table,
    offline_env,
    peak_rss_gb,
    read_jsonl,
    run_child,
    synthetic_prompt_completion,
    write_jsonl,
)

METHODS = ("sft", "dpo", "grpo")
# name -> (framework, description, overrides: "gradient_checkpointing" for both frameworks)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "lit": ("lit", "lit-align defaults", {}),
    "trl_fast": ("trl", "TRL, gradient_checkpointing=False", {"gradient_checkpointing": False}),
    "trl_default": ("trl", "TRL defaults (gradient checkpointing on)", {}),
    "lit_gc": ("lit", "lit-align, gradient_checkpointing=True", {"gradient_checkpointing": True}),
    "lit_shared": ("lit", "lit-align, shared_prompt_forward=True (GRPO only)", {"shared_prompt_forward": True}),
    "lit_compile": ("lit", "lit-align, torch_compile=True (each decoder layer compiled)", {"torch_compile": True}),
    "lit_shared_compile": ("lit", "lit-align, shared_prompt_forward=True and torch_compile=True (GRPO only)",
                           {"shared_prompt_forward": True, "torch_compile": True}),
    "lit_onednn": ("lit", "lit-align, onednn_linear=True (the linear layers' fp32 CPU products on oneDNN)",
                   {"onednn_linear": True}),
    "lit_compile_onednn": ("lit", "lit-align, torch_compile=True and onednn_linear=True",
                           {"torch_compile": True, "onednn_linear": True}),
    "trl_compile": ("trl", "TRL, torch_compile=True, gradient_checkpointing=False",
                    {"torch_compile": True, "gradient_checkpointing": False}),
}
ONLY = {"lit_shared": ("grpo",), "lit_shared_compile": ("grpo",)}  # configurations that apply to some methods only
DEFAULT_CONFIGS = ["lit", "trl_fast", "trl_default", "lit_shared"]
LR = {"sft": 2e-5, "dpo": 1e-6, "grpo": 1e-6}  # TRL's defaults
STEPS = {"sft": 10, "dpo": 10, "grpo": 5}  # timed steps when --steps is not given (a GRPO step generates)
FLOPS_PER_PARAM_TOKEN = {"sft": 6, "dpo": 8, "grpo": 8}  # see the module docstring

# Qwen2.5-0.5B's shape (its config.json), random weights; special-token ids are the byte tokenizer's.
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    use_sliding_window=False,
    attention_dropout=0.0,
)
# --dry-run: builtin:tiny's shape (2 layers, hidden 64) as a tied Qwen2 over the byte vocabulary.
TINY = dict(
    QWEN25_05B,
    vocab_size=264,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


@dataclass
class Workload:
    """Sizes of one run of the check (characters = tokens with the byte tokenizer)."""

    batch_size: int = 8  # SFT rows, DPO pairs per step
    prompt_len: int = 768  # SFT/DPO prompt characters (plus the 17-character "Context: ...\nAnswer:" frame)
    completion_len: int = 256  # SFT completion, DPO chosen and rejected characters
    grpo_prompts: int = 8  # prompts per GRPO step
    grpo_generations: int = 8  # completions per prompt
    grpo_prompt_len: int = 128
    grpo_completion_len: int = 128  # max_completion_length = min_new_tokens: every completion this long
    frame: int = 32  # tokens around prompt and completion (the text frame, a chat template): max_length's margin

    @property
    def max_length(self) -> int:
        return self.prompt_len + self.completion_len + self.frame  # never truncates (frame, leading space, EOS)


DRY_WORKLOAD = Workload(batch_size=2, prompt_len=40, completion_len=16, grpo_prompts=2, grpo_generations=2,
                        grpo_prompt_len=16, grpo_completion_len=8)


# --------------------------------------------------------------------------- shared by the runs


def checksum_reward(completions: list, **kwargs) -> list[float]:
    """A deterministic reward in [0, 1) from each completion's text (CRC32): varied within a group, so
    advantages are not all zero, and the same function object for TRL and lit-align."""
    return [zlib.crc32(str(c).encode()) % 1000 / 1000 for c in completions]


@contextlib.contextmanager
def patched(cls, name: str, wrap):
    """``cls.name`` replaced by ``wrap(original)`` for the duration (restored after, so runs in one
    process do not stack timers)."""
    own = name in cls.__dict__
    original = cls.__dict__[name] if own else None
    setattr(cls, name, wrap(getattr(cls, name)))
    try:
        yield
    finally:
        if own:
            setattr(cls, name, original)
        else:
            delattr(cls, name)


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def run_lit(method: str, overrides: dict, ctx: argparse.Namespace) -> dict:
    import lightning as L

    from lit_align import (
        DPO,
        GRPO,
        SFT,
        PreferenceDataModule,
        PromptCompletionDataModule,
        PromptOnlyDataModule,
        keep_freed_memory,
    )
    from lit_align.methods.online import OnlineModule
    from lit_align.optim import default_adamw
    from lit_align.rollout.engines import HFEngine

    keep_freed_memory()  # as the lit-align command does (lit_align/allocator.py); TRL keeps glibc's default
    w: Workload = ctx.workload
    clock, phases = StepClock(probe=getattr(ctx, "probe", None)), Phases()

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            sync(ctx.cuda)
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(ctx.cuda)
            if method == "grpo":
                phases.step_end(clock)  # completion tokens; prompt tokens in phases.per_step
            else:
                clock.step_end(batch.num_tokens)  # real tokens (DPO: chosen + rejected)

    L.seed_everything(0, verbose=False)
    common = dict(
        dtype=ctx.dtype,
        gradient_checkpointing=overrides.get("gradient_checkpointing", False),
        torch_compile=overrides.get("torch_compile", False),
        onednn_linear=overrides.get("onednn_linear", False),
        optimizer=functools.partial(default_adamw, lr=LR[method]),  # lit-align's default, at TRL's lr
    )
    stack = contextlib.ExitStack()
    if method == "sft":
        module = SFT(ctx.model_dir, **common)
        data = PromptCompletionDataModule(ctx.data["sft"], batch_size=w.batch_size, max_length=w.max_length)
    elif method == "dpo":
        module = DPO(ctx.model_dir, **common)
        data = PreferenceDataModule(ctx.data["dpo"], batch_size=w.batch_size, max_length=w.max_length)
    else:
        def count(call_args, gens):  # HFEngine.generate(...) -> Generations (prompts already repeated G times)
            return int(gens.completion_mask.sum()), int(gens.prompt_mask.sum())

        stack.enter_context(patched(HFEngine, "generate", lambda fn: phases.timed("gen_s", fn, count)))
        stack.enter_context(patched(OnlineModule, "score", lambda fn: phases.timed("score_s", fn)))
        module = GRPO(
            ctx.model_dir,
            reward_funcs=[checksum_reward],
            num_generations=w.grpo_generations,
            max_completion_length=w.grpo_completion_len,
            temperature=1.0,
            loss_type="dapo",
            num_iterations=1,
            beta=0.0,
            generation_kwargs={"min_new_tokens": w.grpo_completion_len},
            shared_prompt_forward=overrides.get("shared_prompt_forward", False),
            **common,
        )
        data = PromptOnlyDataModule(ctx.data["grpo"], batch_size=w.grpo_prompts * w.grpo_generations)
    trainer = L.Trainer(
        max_steps=ctx.warmup + ctx.steps[method],
        accelerator="cuda" if ctx.cuda else "cpu",
        devices=1,
        precision="bf16-true" if ctx.dtype == "bfloat16" else "32-true",
        gradient_clip_val=1.0,  # TRL's max_grad_norm=1.0
        gradient_clip_algorithm="norm",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Clock(), *getattr(ctx, "lit_callbacks", [])],  # bench_real.py adds its profiler
    )
    with stack:
        trainer.fit(module, data)
    return {
        "clock": clock,
        "phases": phases if method == "grpo" else None,
        "extra": {
            "gradient_checkpointing": bool(module.gradient_checkpointing),
            "param_dtype": str(next(module.model.parameters()).dtype),
            "optimizer": type(trainer.optimizers[0]).__name__,
        },
    }


def run_trl(method: str, overrides: dict, ctx: argparse.Namespace) -> dict:
    import datasets
    from transformers import TrainerCallback

    w: Workload = ctx.workload
    clock, phases = StepClock(probe=getattr(ctx, "probe", None)), Phases()
    stack = contextlib.ExitStack()

    class Clock(TrainerCallback):
        """Step-end to step-end; SFT/DPO tokens from TRL's own real-token counter (attention mask sum)."""

        trainer = None
        seen = 0

        def on_train_begin(self, *a, **k):
            sync(ctx.cuda)
            self.seen = getattr(self.trainer, "_total_train_tokens", 0)
            clock.start()

        def on_step_end(self, *a, **k):
            sync(ctx.cuda)
            if method == "grpo":
                phases.step_end(clock)
                return
            total = self.trainer._total_train_tokens
            clock.step_end(total - self.seen)
            self.seen = total

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"gpu_check_trl_{method}_"),
        report_to="none",
        use_cpu=not ctx.cuda,
        bf16=ctx.dtype == "bfloat16",
        fp16=False,
        model_init_kwargs={"dtype": ctx.dtype},
        max_steps=ctx.warmup + ctx.steps[method],
        learning_rate=LR[method],
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **overrides,
    )
    if method == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

        config = Config(per_device_train_batch_size=w.batch_size, max_length=w.max_length, **common)
        kwargs = {}
    elif method == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        config = Config(per_device_train_batch_size=w.batch_size, max_length=w.max_length, **common)
        kwargs = {}
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        def count(call_args, out):  # _generate_single_turn(self, prompt_ids, ...) -> (completion_ids, logprobs)
            prompt_ids, completion_ids = call_args[1], out[0]
            return sum(len(c) for c in completion_ids), sum(len(p) for p in prompt_ids)

        stack.enter_context(patched(Trainer, "_generate_single_turn", lambda fn: phases.timed("gen_s", fn, count)))
        stack.enter_context(patched(Trainer, "_calculate_rewards", lambda fn: phases.timed("score_s", fn)))
        config = Config(
            per_device_train_batch_size=w.grpo_prompts * w.grpo_generations,
            num_generations=w.grpo_generations,
            max_completion_length=w.grpo_completion_len,
            temperature=1.0,
            loss_type="dapo",
            num_iterations=1,
            beta=0.0,
            logging_steps=1000,
            generation_kwargs={"min_new_tokens": w.grpo_completion_len},
            **common,
        )
        kwargs = {"reward_funcs": [checksum_reward]}
    callback = Clock()
    with stack:
        trainer = Trainer(
            model=ctx.model_dir,
            args=config,
            train_dataset=datasets.Dataset.from_list(read_jsonl(ctx.data[method])),
            callbacks=[callback, *getattr(ctx, "trl_callbacks", [])],
            **kwargs,
        )
        callback.trainer = trainer
        trainer.train()
    return {
        "clock": clock,
        "phases": phases if method == "grpo" else None,
        "extra": {
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "param_dtype": str(next(trainer.model.parameters()).dtype),
            "optimizer": str(trainer.args.optim),
        },
    }


def run_one(method: str, name: str, ctx: argparse.Namespace) -> Result:
    """One configuration of one method, in this process: its Result, with the peak memory of the run."""
    import torch

    framework, description, overrides = CONFIGS[name]
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 1024**3 if ctx.cuda else 0.0
    t0 = time.perf_counter()
    out = (run_lit if framework == "lit" else run_trl)(method, overrides, ctx)
    wall = time.perf_counter() - t0
    clock: StepClock = out["clock"]
    if len(clock.times) != ctx.warmup + ctx.steps[method]:
        raise RuntimeError(f"{method}/{name}: recorded {len(clock.times)} steps, expected {ctx.warmup + ctx.steps[method]}")
    extra = {
        **out["extra"],
        "method": method,
        "wall_s": round(wall, 2),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1024**3 if ctx.cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1024**3 if ctx.cuda else None,
        "mem_at_start_gb": base,
    }
    if out["phases"] is not None:
        extra.update(out["phases"].per_step)
    if clock.probes:
        extra["probes"] = clock.probes
    out = None
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return Result(
        name=name,
        framework=framework,
        description=description,
        steps=ctx.steps[method],
        warmup=ctx.warmup,
        step_times=clock.times,
        step_tokens=clock.tokens,
        rss_start_gb=clock.rss_start_gb,
        peak_rss_gb=peak_rss_gb(),
        extra=extra,
    )


# --------------------------------------------------------------------------- preparation


def build_model(dry_run: bool, model_dir: Path, cuda: bool, dtype_name: str) -> dict:
    """The Qwen2-shaped model with seeded random weights, saved (with the byte tokenizer) where both
    frameworks load it from. Returns its size and the parameter count that enters the FLOP formula."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from lit_align.models.builtin import builtin_tokenizer

    tokenizer = builtin_tokenizer("builtin:tiny")
    shape = TINY if dry_run else QWEN25_05B
    config = Qwen2Config(
        **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    config.architectures = ["Qwen2ForCausalLM"]
    dtype = getattr(torch, dtype_name)
    with torch.random.fork_rng(devices=[]), torch.device("cuda" if cuda else "cpu"):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)  # drawn in fp32 (fast on the GPU), then cast
    model.to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    params = sum(p.numel() for p in model.parameters())  # tied weights once
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    flop_params = params - embedding + (embedding if tied else 0)  # a lookup is free, the LM head a matmul
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    info = {
        "shape": {k: v for k, v in shape.items() if k != "rope_parameters"},
        "dtype": str(dtype).removeprefix("torch."),
        "params": params,
        "flop_params": flop_params,
        "tied_embeddings": tied,
    }
    del model
    if cuda:
        torch.cuda.empty_cache()
    return info


def write_data(w: Workload, steps_total: int, workdir: Path, seed: int = 0) -> dict[str, str]:
    """One JSONL per method that both frameworks read; rows for three times the steps (no 2nd epoch)."""
    fixed = lambda n: (n, n)  # noqa: E731
    n = 3 * steps_total * w.batch_size
    sft = synthetic_prompt_completion(n, fixed(w.prompt_len), fixed(w.completion_len), seed=seed)
    pairs = synthetic_pairs(n, fixed(w.prompt_len), fixed(w.completion_len), seed=seed)
    prompts = synthetic_prompt_completion(3 * steps_total * w.grpo_prompts, fixed(w.grpo_prompt_len), (1, 1), seed=seed)
    return {
        "sft": str(write_jsonl(sft, workdir / "sft.jsonl")),
        "dpo": str(write_jsonl(pairs, workdir / "dpo.jsonl")),
        "grpo": str(write_jsonl([{"prompt": r["prompt"]} for r in prompts], workdir / "grpo.jsonl")),
    }


def peak_flops(cuda: bool, dtype_name: str, size: int | None = None, warmup: int = 3, reps: int = 10,
               kernel: str = "torch") -> dict:
    """Dense matmul FLOP/s on this device in the training dtype (bf16 on CUDA): ``size^3`` (default 8192
    on CUDA, 512 on CPU); the best of three means of ``reps`` products after ``warmup``. ``kernel``:
    ``torch`` (``a @ b``: MKL for fp32 on a CPU) or ``onednn`` (CPU: ``lit_align.ops.onednn``)."""
    import torch

    matmul = torch.matmul
    if kernel == "onednn":
        from lit_align.ops.onednn import onednn_kernel as matmul  # a @ b.T: the same FLOPs

    size = size or (8192 if cuda else 512)
    dtype = getattr(torch, dtype_name)
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    for _ in range(warmup):
        matmul(a, b)
    sync(cuda)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            matmul(a, b)
        sync(cuda)
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - t0))
    del a, b
    return {"flops": best, "matmul": f"{size}x{size}x{size} {str(dtype).removeprefix('torch.')} ({kernel})", "reps": reps}


# --------------------------------------------------------------------------- report


def summary(r: Result, flop_params: int, peak: float) -> dict:
    """steps/s, tokens/s (the tokens of the FLOP formula), model FLOP/s and MFU of the timed steps."""
    w = r.warmup
    times = r.step_times[w:]
    tokens = list(r.step_tokens[w:])
    method = r.extra["method"]
    if method == "grpo":  # completion tokens + prompt tokens of every completion
        tokens = [c + p for c, p in zip(tokens, r.extra["prompt_tokens"][w:])]
    flops = FLOPS_PER_PARAM_TOKEN[method] * flop_params * sum(tokens)
    out = {
        "method": method,
        "config": r.name,
        "framework": r.framework,
        "steps_per_s": len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "model_tflops_per_s": flops / sum(times) / 1e12,
        "mfu": flops / sum(times) / peak,
        "peak_mem_gb": r.extra.get("peak_mem_gb"),
        "peak_rss_gb": r.peak_rss_gb,
        "gradient_checkpointing": r.extra.get("gradient_checkpointing"),
    }
    if method == "grpo":
        out["completion_tokens_per_s"] = sum(r.step_tokens[w:]) / sum(times)
        out["generation_s_per_step"] = statistics.mean(r.extra["gen_s"][w:])
        out["update_s_per_step"] = statistics.mean(times) - out["generation_s_per_step"] - statistics.mean(
            r.extra["score_s"][w:]
        )
    return out


def table(rows: list[dict], cuda: bool) -> str:
    mem = "peak CUDA mem (GB)" if cuda else "peak RSS, process (GB)"
    headers = ["method", "config", "steps/s", "tokens/step", "tokens/s", mem, "model TFLOP/s", "MFU", "notes"]
    body = []
    for s in rows:
        if "skipped" in s:
            body.append([s["method"], s["config"], "-", "-", "-", "-", "-", "-", s["skipped"]])
            continue
        notes = "GC" if s["gradient_checkpointing"] else ""
        if s["method"] == "grpo":
            notes = ", ".join(x for x in (notes, f"gen {s['generation_s_per_step']:.2f} s + update "
                                               f"{s['update_s_per_step']:.2f} s per step") if x)
        body.append([
            s["method"],
            s["config"],
            _fmt(s["steps_per_s"], 3),
            _fmt(s["tokens_per_step"], 0),
            _fmt(s["tokens_per_s"], 0),
            _fmt(s["peak_mem_gb"] if cuda else s["peak_rss_gb"], 2),
            _fmt(s["model_tflops_per_s"], 3 if not cuda else 1),
            f"{100 * s['mfu']:.1f}%",
            notes,
        ])
    return markdown_table(headers, body)


def ratios(rows: list[dict], cuda: bool) -> str:
    """lit-align / each TRL configuration of the same method: steps/s and memory."""
    done = [s for s in rows if "skipped" not in s]
    body = []
    for a in (s for s in done if s["framework"] == "lit"):
        for b in (s for s in done if s["framework"] == "trl" and s["method"] == a["method"]):
            mem = "peak_mem_gb" if cuda else "peak_rss_gb"
            body.append([f"{a['method']}: {a['config']} / {b['config']}",
                         _fmt(a["steps_per_s"] / b["steps_per_s"]) + "x",
                         _fmt(a[mem] / b[mem]) + "x" if b[mem] else "-"])
    return markdown_table(["lit-align / TRL", "steps/s", "peak memory"], body) if body else ""


# --------------------------------------------------------------------------- main


def versions() -> dict:
    import lightning
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "lightning": lightning.__version__}
    for name in ("trl", "datasets", "peft", "accelerate", "pyarrow"):
        if importlib.util.find_spec(name) is not None:
            out[name] = __import__(name).__version__
    return out


def out_path(args: argparse.Namespace) -> Path | None:
    if args.out:
        return Path(args.out)
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None


def plan(args: argparse.Namespace, have_trl: bool) -> list[tuple[str, str, str | None]]:
    """(method, config, reason to skip or None), in order: lit-align and TRL without gradient
    checkpointing for every method first, then the other configurations (cut first by --budget-s)."""
    first = [c for c in args.configs if c in ("lit", "trl_fast")]
    rest = [c for c in args.configs if c not in first]
    runs = [(m, c) for m in args.methods for c in first] + [(m, c) for c in rest for m in args.methods if m in ONLY.get(c, METHODS)]
    return [(m, c, None if have_trl or CONFIGS[c][0] == "lit" else "skipped: trl is not installed") for m, c in runs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline_env()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load notices
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # nor "Loading weights" bars
    if args.child:
        return child_main(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.cuda = not args.dry_run
    if args.cuda and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.cuda else "float32"
    args.workload = DRY_WORKLOAD if args.dry_run else Workload()
    have_trl = importlib.util.find_spec("trl") is not None
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if args.cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"gpu_check: {'DRY RUN, ' if args.dry_run else ''}{device}; {json.dumps(versions())}", flush=True)
    peak = peak_flops(args.cuda, args.dtype)
    print(f"peak matmul: {peak['flops'] / 1e12:.4g} TFLOP/s ({peak['matmul']})", flush=True)
    payload: dict = {
        "dry_run": args.dry_run,
        "device": device,
        "versions": versions(),
        "peak": peak,
        "workload": asdict(args.workload),
        "steps": args.steps,
        "warmup": args.warmup,
        "flop_formula": "model FLOPs/step = k * P * T; k = 6 (SFT), 8 (DPO: + reference forward), 8 (GRPO: + generation); "
                        "P = params in matmuls (tied LM head counted, input lookup not); attention T^2 terms excluded",
        "runs": [],
        "summary": [],
    }
    path = out_path(args)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        args.model_dir = str(workdir / "model")
        model = build_model(args.dry_run, Path(args.model_dir), args.cuda, args.dtype)
        args.data = write_data(args.workload, args.warmup + max(args.steps.values()), workdir)
        payload["model"] = model
        w = args.workload
        print(
            f"model: Qwen2ForCausalLM {model['shape']['num_hidden_layers']} layers, hidden {model['shape']['hidden_size']}, "
            f"vocab {model['shape']['vocab_size']}, {model['params'] / 1e6:.1f}M params ({model['flop_params'] / 1e6:.1f}M in "
            f"matmuls), {model['dtype']}, random weights (seed 0)\nworkload: SFT/DPO batch {w.batch_size}, prompt "
            f"{w.prompt_len}+17 tokens, completion {w.completion_len}+1(+EOS); GRPO {w.grpo_prompts} prompts x "
            f"{w.grpo_generations} completions of {w.grpo_completion_len} tokens, prompt {w.grpo_prompt_len}+17; "
            f"{args.warmup} warm-up + timed steps {json.dumps(args.steps)}; {'in one process' if not args.isolate else 'one process each'}",
            flush=True,
        )
        failures = 0
        for method, name, skip in plan(args, have_trl):
            elapsed = time.perf_counter() - started
            if skip is None and args.budget_s and elapsed > args.budget_s:
                skip = f"skipped: past --budget-s {args.budget_s:.0f} s ({elapsed:.0f} s)"
            if skip:
                print(f"{method} {name}: {skip}", flush=True)
                payload["summary"].append({"method": method, "config": name, "skipped": skip})
                continue
            print(f"{method} {name}: {CONFIGS[name][1]} ...", flush=True)
            try:
                result = run_isolated(method, name, args) if args.isolate else run_one(method, name, args)
            except Exception as err:  # keep going: the other runs still report
                failures += 1
                msg = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"[:300]
                print(f"    {msg}", flush=True)
                trace = traceback.format_exc()
                print(trace, file=sys.stderr, flush=True)  # a GPU run is not cheap to repeat: always say where
                payload["summary"].append({"method": method, "config": name, "skipped": msg, "traceback": trace[-4000:]})
                if path:
                    write(path, payload)
                continue
            s = summary(result, model["flop_params"], peak["flops"])
            payload["runs"].append(json.loads(result.to_json()))
            payload["summary"].append(s)
            mem = f"peak CUDA memory {s['peak_mem_gb']:.2f} GB" if args.cuda else f"peak RSS {s['peak_rss_gb']:.2f} GB"
            print(f"    {s['steps_per_s']:.3f} steps/s, {s['tokens_per_s']:.0f} tokens/s, {mem}, "
                  f"MFU {100 * s['mfu']:.1f}% ({result.extra['wall_s']:.0f} s)", flush=True)
            if path:
                write(path, payload)
    payload["total_s"] = round(time.perf_counter() - started, 1)
    print()
    print(f"{f'DRY RUN (CPU, tiny model, {args.dtype}): numbers mean nothing; ' if args.dry_run else ''}"
          f"{device}, peak {peak['flops'] / 1e12:.4g} TFLOP/s measured; timed steps {json.dumps(args.steps)} after {args.warmup}; "
          f"MFU = k * P * tokens / time / peak, k = 6 SFT, 8 DPO, 8 GRPO, P = {model['flop_params'] / 1e6:.1f}M")
    print()
    print(table(payload["summary"], args.cuda))
    r = ratios(payload["summary"], args.cuda)
    if r:
        print()
        print(r)
    print(f"\ntotal {payload['total_s']:.0f} s")
    if path:
        write(path, payload)
        print(f"wrote {path}")
    return 1 if failures else 0


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def run_isolated(method: str, name: str, args: argparse.Namespace) -> Result:
    """One configuration in a child process (its own CUDA context and peak memory)."""
    ctx = {"method": method, "config": name, "model_dir": args.model_dir, "data": args.data, "dtype": args.dtype,
           "cuda": args.cuda, "steps": args.steps, "warmup": args.warmup, "workload": asdict(args.workload),
           "threads": args.threads}
    return run_child([__file__, "--child", json.dumps(ctx)], verbose=args.verbose)


def child_main(args: argparse.Namespace) -> int:
    import torch

    ctx = argparse.Namespace(**json.loads(args.child))
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    ctx.workload = Workload(**ctx.workload)
    emit(run_one(ctx.method, ctx.config, ctx))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, a tiny Qwen2 (2 layers, hidden 64) in fp32, short rows, 1 warm-up + 1 timed step")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration (default: SFT and DPO 10, GRPO 5; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 2; dry run 1)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS),
                   help="lit, trl_fast, trl_default, lit_gc, lit_shared, lit_compile, lit_shared_compile, trl_compile (default: lit trl_fast trl_default lit_shared)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no further run after this many seconds (0: no limit); runs not started are listed")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="weights and training precision (auto: bfloat16 on CUDA, float32 with --dry-run)")
    p.add_argument("--isolate", action="store_true", help="each configuration in its own process")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--out", help="JSON results (default: $OUT/gpu_check.json when $OUT is set)")
    p.add_argument("--verbose", action="store_true", help="the children's stderr with --isolate")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if not args.child:
        args.steps = {m: args.steps or (1 if args.dry_run else STEPS[m]) for m in METHODS}
    if args.warmup is None:
        args.warmup = 1 if args.dry_run else 2
    return args


if __name__ == "__main__":
    sys.exit(main())
