"""GRPO (and OnlineDPO) throughput and memory: TRL 1.16 against lit-align, side by side.

``--method grpo`` (default): ``GRPOTrainer`` against ``GRPO``; ``--method online_dpo``:
``trl.experimental.online_dpo.OnlineDPOTrainer`` against ``OnlineDPO`` (two completions per prompt,
reward ``arithmetic_reward``, sigmoid loss, beta 0.1, a frozen reference on both sides; run it with
``--num-generations 2``). The GRPO workload:

Same model (``builtin:tiny-32k``, fp32, the same seeded weights on both sides: TRL loads the
``save_pretrained`` copy), the same prompts (the synthetic arithmetic task, one-step sums of
operands 0-9: ``"Compute 7+5.\\n"``, about 13 tokens), the same reward function
(``lit_align.rewards.arithmetic_reward``), 8 completions per prompt, 32 completions (4 prompts) per
optimizer step, ``max_completion_length`` 64 at temperature 1, ``loss_type="dapo"``, one update per
rollout, AdamW lr 1e-6, and the same number of CPU threads. ``min_new_tokens=64`` goes to both
frameworks' ``generate`` (TRL: ``GRPOConfig.generation_kwargs``, lit-align: ``GRPO(generation_kwargs=)``),
so EOS is suppressed and every completion is exactly 64 tokens long on both sides: the same decode
work and the same update batch shape, whatever the (random) model samples. Each configuration runs in
its own process (clean peak RSS).

    python benchmarks/bench_grpo.py                                  # 8 timed steps after 2 warm-up
    python benchmarks/bench_grpo.py --steps 8 --warmup 2 --repeats 3 --json grpo.json
    python benchmarks/bench_grpo.py --configs trl_fast_kl lit_kl       # beta=0.04: with a reference model
    python benchmarks/bench_grpo.py --report grpo.json                 # print the tables of a saved run
    python benchmarks/bench_grpo.py --quick                            # smoke run: 2 timed steps, 1 warm-up

Configurations (``--configs``, default: trl_default trl_fast lit):

    trl_default     TRL GRPOTrainer defaults (gradient checkpointing on), beta=0
    trl_fast        TRL, gradient_checkpointing=False, beta=0
    lit             lit-align GRPO defaults, beta=0
    trl_default_kl  as trl_default with beta=0.04 (a frozen reference model scores every rollout)
    trl_fast_kl     as trl_fast with beta=0.04
    lit_kl          as lit with beta=0.04

Each step is also split into **generation** (the framework's call that samples the completions:
TRL ``GRPOTrainer._generate_single_turn``, which wraps ``model.generate``; lit-align
``HFEngine.generate``, its lean decoding loop over the same model's forward with the KV cache;
both build the completion mask), **scoring** (TRL
``_calculate_rewards``; lit-align ``OnlineModule.score``, which also decodes the completions) and
**update** (the rest of the step: reference log-probs when beta > 0, advantages, forward, backward,
optimizer, and the framework's per-step work). The timers are monkeypatched in the child process only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Result,
    StepClock,
    _fmt,
    emit,
    markdown_table,
    offline_env,
    peak_rss_gb,
    pick_result,
    read_jsonl,
    run_child,
    set_threads,
    write_jsonl,
)

KL_BETA = 0.04
# name -> (framework, description, overrides: "beta" for both, the rest TRL GRPOConfig / lit-align GRPO kwargs)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "trl_default": ("trl", "TRL GRPOTrainer defaults (gradient checkpointing), beta=0", {}),
    "trl_fast": ("trl", "TRL, gradient_checkpointing=False, beta=0", {"gradient_checkpointing": False}),
    "lit": ("lit", "lit-align GRPO defaults, beta=0", {}),
    "trl_default_kl": ("trl", f"TRL defaults, beta={KL_BETA}", {"beta": KL_BETA}),
    "trl_fast_kl": (
        "trl",
        f"TRL, gradient_checkpointing=False, beta={KL_BETA}",
        {"gradient_checkpointing": False, "beta": KL_BETA},
    ),
    "lit_kl": ("lit", f"lit-align GRPO, beta={KL_BETA}", {"beta": KL_BETA}),
    # one generation serves 4 steps (a rollout of 4 x batch size completions, cut into 4 slices)
    "trl_fast_spg4": (
        "trl",
        "TRL, gradient_checkpointing=False, beta=0, steps_per_generation=4",
        {"gradient_checkpointing": False, "steps_per_generation": 4},
    ),
    "lit_spg4": ("lit", "lit-align GRPO, beta=0, steps_per_generation=4", {"steps_per_generation": 4}),
}
DEFAULT_CONFIGS = ["trl_default", "trl_fast", "lit"]
# OnlineDPO (--method online_dpo): TRL's experimental OnlineDPOTrainer against lit-align OnlineDPO.
# TRL generates without its KV cache when gradient checkpointing is on (its default).
ONLINE_DPO_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "trl_default": ("trl", "TRL OnlineDPOTrainer defaults (gradient checkpointing: no KV cache in generate)", {}),
    "trl_fast": ("trl", "TRL OnlineDPOTrainer, gradient_checkpointing=False", {"gradient_checkpointing": False}),
    "lit": ("lit", "lit-align OnlineDPO defaults", {}),
}


def _beta(name: str) -> float:
    return CONFIGS.get(name, ("", "", {}))[2].get("beta", 0.0)


def _pairing(name: str) -> tuple[float, int]:
    """What a lit-align configuration must share with a TRL one to be compared: beta and steps_per_generation."""
    overrides = CONFIGS.get(name, ("", "", {}))[2]
    return overrides.get("beta", 0.0), overrides.get("steps_per_generation", 1)


# --------------------------------------------------------------------------- children


class Phases:
    """Seconds spent generating and scoring, and the tokens generated, since the last step end."""

    def __init__(self) -> None:
        self.gen_s = self.score_s = 0.0
        self.completion_tokens = self.prompt_tokens = 0
        self.per_step: dict[str, list] = {"gen_s": [], "score_s": [], "prompt_tokens": []}

    def timed(self, field_name: str, fn, count=None):
        """``fn`` wrapped so that its wall time adds to ``field_name`` (and ``count(args, out)`` tokens)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            setattr(self, field_name, getattr(self, field_name) + time.perf_counter() - t0)
            if count is not None:
                completion, prompt = count(args, out)
                self.completion_tokens += completion
                self.prompt_tokens += prompt
            return out

        return wrapper

    def step_end(self, clock: StepClock) -> None:
        clock.step_end(self.completion_tokens)
        self.per_step["gen_s"].append(self.gen_s)
        self.per_step["score_s"].append(self.score_s)
        self.per_step["prompt_tokens"].append(self.prompt_tokens)
        self.gen_s = self.score_s = 0.0
        self.completion_tokens = self.prompt_tokens = 0


def _reward_func():
    from lit_align.rewards import arithmetic_reward

    return arithmetic_reward


def run_trl(args: argparse.Namespace, overrides: dict) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    clock, phases = StepClock(), Phases()

    def count(call_args, out):  # _generate_single_turn(self, prompt_ids, ...) -> (completion_ids, logprobs)
        prompt_ids, completion_ids = call_args[1], out[0]
        return sum(len(c) for c in completion_ids), sum(len(p) for p in prompt_ids)

    GRPOTrainer._generate_single_turn = phases.timed("gen_s", GRPOTrainer._generate_single_turn, count)
    GRPOTrainer._calculate_rewards = phases.timed("score_s", GRPOTrainer._calculate_rewards)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            phases.step_end(clock)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"),
        report_to="none",
        use_cpu=True,
        bf16=False,  # fp32 on CPU (TRL would otherwise turn bf16 autocast on)
        fp16=False,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        learning_rate=args.lr,
        loss_type="dapo",
        num_iterations=1,
        max_steps=args.warmup + args.steps,
        logging_steps=1000,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        generation_kwargs={"min_new_tokens": args.max_completion_length},
        **{"beta": 0.0, **overrides},
    )
    trainer = GRPOTrainer(
        model=args.model_dir,
        reward_funcs=[_reward_func()],
        args=config,
        train_dataset=datasets.Dataset.from_list(read_jsonl(args.data)),
        callbacks=[Clock()],
    )
    trainer.train()
    return {
        "clock": clock,
        "phases": phases,
        "extra": {
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "beta": float(trainer.beta),
            "reference_model": trainer.ref_model is not None,
            "optim": str(trainer.args.optim),
            "generation_kwargs": {k: str(v) for k, v in trainer.generation_kwargs.items()},
        },
    }


def run_lit(args: argparse.Namespace, overrides: dict) -> dict:
    import lightning as L

    from lit_align import GRPO, PromptOnlyDataModule
    from lit_align.methods.online import OnlineModule
    from lit_align.optim import default_adamw
    from lit_align.rollout.engines import HFEngine

    clock, phases = StepClock(), Phases()

    def count(call_args, gens):  # HFEngine.generate(...) -> Generations (prompts already repeated G times)
        return int(gens.completion_mask.sum()), int(gens.prompt_mask.sum())

    HFEngine.generate = phases.timed("gen_s", HFEngine.generate, count)
    OnlineModule.score = phases.timed("score_s", OnlineModule.score)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            phases.step_end(clock)

    L.seed_everything(0, verbose=False)
    module = GRPO(
        args.model,
        reward_funcs=[_reward_func()],
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        loss_type="dapo",
        num_iterations=1,
        generation_kwargs={"min_new_tokens": args.max_completion_length},
        optimizer=functools.partial(default_adamw, lr=args.lr),
        **{"beta": 0.0, **overrides},
    )
    data = PromptOnlyDataModule(args.data, batch_size=args.batch_size)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Clock()],
    )
    trainer.fit(module, data)
    return {
        "clock": clock,
        "phases": phases,
        "extra": {
            "gradient_checkpointing": bool(module.gradient_checkpointing),
            "beta": float(module.beta),
            "reference_model": module.ref_model is not None,
            "generation_kwargs": dict(module.sampling.generation_kwargs),
        },
    }


def run_trl_online_dpo(args: argparse.Namespace, overrides: dict) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    clock, phases = StepClock(), Phases()

    def count(call_args, out):  # _generate(self, model, prompts) -> (prompt_ids, prompt_mask, completion_ids, mask, ...)
        return int(out[3].sum()), int(out[1].sum())

    OnlineDPOTrainer._generate = phases.timed("gen_s", OnlineDPOTrainer._generate, count)
    OnlineDPOTrainer._calculate_rewards_from_functions = phases.timed(
        "score_s", OnlineDPOTrainer._calculate_rewards_from_functions
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            phases.step_end(clock)

    config = OnlineDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_online_dpo_trl_"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=args.batch_size // 2,  # prompts; each gets two completions
        max_new_tokens=args.max_completion_length,
        learning_rate=args.lr,
        beta=[0.1],
        loss_type="sigmoid",
        max_steps=args.warmup + args.steps,
        logging_steps=1000,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        generation_kwargs={"min_new_tokens": args.max_completion_length},
        **overrides,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model_dir),
        processing_class=AutoTokenizer.from_pretrained(args.model_dir),
        reward_funcs=[_reward_func()],
        args=config,
        train_dataset=datasets.Dataset.from_list(read_jsonl(args.data)),
        callbacks=[Clock()],
    )
    trainer.train()
    extra = {"gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "beta": 0.1, "reference_model": True}
    return {"clock": clock, "phases": phases, "extra": extra}


def run_lit_online_dpo(args: argparse.Namespace, overrides: dict) -> dict:
    import lightning as L

    from lit_align import OnlineDPO, PromptOnlyDataModule
    from lit_align.methods.online_preference import OnlinePreferenceModule
    from lit_align.optim import default_adamw
    from lit_align.rollout.engines import HFEngine

    clock, phases = StepClock(), Phases()

    def count(call_args, gens):
        return int(gens.completion_mask.sum()), int(gens.prompt_mask.sum())

    HFEngine.generate = phases.timed("gen_s", HFEngine.generate, count)
    OnlinePreferenceModule.prefer = phases.timed("score_s", OnlinePreferenceModule.prefer)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            phases.step_end(clock)

    L.seed_everything(0, verbose=False)
    module = OnlineDPO(
        args.model,
        reward_funcs=[_reward_func()],
        max_new_tokens=args.max_completion_length,
        beta=0.1,
        loss_type="sigmoid",
        generation_kwargs={"min_new_tokens": args.max_completion_length},
        optimizer=functools.partial(default_adamw, lr=args.lr),
        **overrides,
    )
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()],
    )
    trainer.fit(module, PromptOnlyDataModule(args.data, batch_size=args.batch_size // 2))
    extra = {"gradient_checkpointing": bool(module.gradient_checkpointing), "beta": 0.1, "reference_model": module.ref_model is not None}
    return {"clock": clock, "phases": phases, "extra": extra}


RUNNERS = {
    ("grpo", "trl"): run_trl,
    ("grpo", "lit"): run_lit,
    ("online_dpo", "trl"): run_trl_online_dpo,
    ("online_dpo", "lit"): run_lit_online_dpo,
}


def method_configs(method: str) -> dict[str, tuple[str, str, dict]]:
    return CONFIGS if method == "grpo" else ONLINE_DPO_CONFIGS


def child_main(args: argparse.Namespace) -> None:
    offline_env()
    set_threads(args.threads)
    framework, description, overrides = method_configs(args.method)[args.child]
    out = RUNNERS[(args.method, framework)](args, overrides)
    clock: StepClock = out["clock"]
    if len(clock.times) != args.warmup + args.steps:
        raise RuntimeError(
            f"{args.child}: recorded {len(clock.times)} steps, expected {args.warmup + args.steps}"
        )
    emit(
        Result(
            name=args.child,
            framework=framework,
            description=description,
            steps=args.steps,
            warmup=args.warmup,
            step_times=clock.times,
            step_tokens=clock.tokens,  # completion tokens generated in the step
            rss_start_gb=clock.rss_start_gb,
            peak_rss_gb=peak_rss_gb(),
            extra={**out["extra"], **out["phases"].per_step},
        )
    )


# --------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace, workdir: Path) -> None:
    """Write the prompt rows (one JSONL both frameworks read) and the model directory TRL loads."""
    offline_env()
    from lit_align.data.arithmetic import arithmetic_rows
    from lit_align.models.builtin import builtin_model, builtin_tokenizer

    prompts_per_step = args.batch_size // args.num_generations
    n_rows = 3 * (args.warmup + args.steps) * prompts_per_step  # no configuration starts a second epoch
    rows = arithmetic_rows("prompt_only", "train", size=n_rows, steps=1, max_operand=9)
    args.data = str(write_jsonl(rows, workdir / "prompts.jsonl"))
    args.model_dir = str(workdir / "model")
    builtin_model(args.model).save_pretrained(args.model_dir)
    builtin_tokenizer(args.model).save_pretrained(args.model_dir)
    print(
        f"workload: {n_rows} arithmetic prompts ({prompts_per_step} per step x {args.num_generations} completions "
        f"= {args.batch_size}), {args.max_completion_length} completion tokens each (min_new_tokens = max)",
        flush=True,
    )


def child_argv(args: argparse.Namespace, name: str) -> list[str]:
    return [
        __file__,
        "--child",
        name,
        "--data",
        args.data,
        "--model-dir",
        args.model_dir,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--num-generations",
        str(args.num_generations),
        "--max-completion-length",
        str(args.max_completion_length),
        "--lr",
        str(args.lr),
        "--threads",
        str(args.threads),
        "--method",
        args.method,
    ]


def parent_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        prepare(args, Path(tmp))
        runs: dict[str, list[Result]] = {name: [] for name in args.configs}
        for rep in range(args.repeats):  # round-robin, so a slow spell of a shared machine hits every config
            for name in args.configs:
                print(f"[{rep + 1}/{args.repeats}] {name}: {method_configs(args.method)[name][1]} ...", flush=True)
                result = run_child(child_argv(args, name), verbose=args.verbose)
                runs[name].append(result)
                p = phases(result)
                print(
                    f"    {result.steps_per_s:.3f} steps/s, {result.tokens_per_s:.0f} completion tokens/s "
                    f"(generation {p['gen']:.2f} s + scoring {p['score']:.3f} s + update {p['update']:.2f} s per step), "
                    f"peak RSS {result.peak_rss_gb:.2f} GB; other processes kept "
                    f"{result.extra['other_cpus_busy']:.2f} CPUs busy meanwhile",
                    flush=True,
                )
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "model_dir", "child", "report")}
    settings["cpu_count"] = os.cpu_count()
    if args.json:
        payload = {
            "args": settings,
            "runs": {n: [json.loads(r.to_json()) for r in rs] for n, rs in runs.items()},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    report(settings, runs, args.pick)
    if args.json:
        print(f"\nwrote {args.json}")


def phases(r: Result) -> dict[str, float]:
    """Mean seconds per timed step: generation, scoring, update (the rest of the step)."""
    w = r.warmup
    gen = statistics.mean(r.extra["gen_s"][w:])
    score = statistics.mean(r.extra["score_s"][w:])
    step = statistics.mean(r.step_times[w:])
    prompt = statistics.mean(r.extra["prompt_tokens"][w:])
    return {"step": step, "gen": gen, "score": score, "update": step - gen - score, "prompt_tokens": prompt}


def grpo_table(results: list[Result]) -> str:
    headers = [
        "config",
        "steps/s",
        "median step (s)",
        "completion tokens/step",
        "completion tokens/s",
        "generation (s/step)",
        "scoring (s/step)",
        "update (s/step)",
        "peak RSS (GB)",
        "RSS at start (GB)",
        "other CPUs busy",
    ]
    rows = []
    for r in results:
        p = phases(r)
        rows.append(
            [
                r.name,
                _fmt(r.steps_per_s, 3),
                _fmt(r.median_step_s, 3),
                _fmt(r.tokens_per_step, 0),
                _fmt(r.tokens_per_s, 0),
                _fmt(p["gen"], 3),
                _fmt(p["score"], 3),
                _fmt(p["update"], 3),
                _fmt(r.peak_rss_gb, 2),
                _fmt(r.rss_start_gb, 2),
                _fmt(r.extra.get("other_cpus_busy", float("nan")), 2),
            ]
        )
    return markdown_table(headers, rows)


def grpo_ratio_table(results: list[Result]) -> str:
    """lit-align / TRL at the same beta: speed ratios (higher is better; generation and update as
    TRL's seconds / lit-align's, so also higher is better) and the peak-RSS ratio (lower is better)."""
    headers = [
        "lit-align / TRL",
        "steps/s",
        "completion tokens/s",
        "generation speed",
        "update speed",
        "peak RSS",
    ]
    rows = []
    for a in (r for r in results if r.framework == "lit"):
        for b in (r for r in results if r.framework == "trl" and _pairing(r.name) == _pairing(a.name)):
            pa, pb = phases(a), phases(b)
            rows.append(
                [
                    f"{a.name} / {b.name}",
                    _fmt(a.steps_per_s / b.steps_per_s) + "x",
                    _fmt(a.tokens_per_s / b.tokens_per_s) + "x",
                    _fmt(pb["gen"] / pa["gen"]) + "x",
                    _fmt(pb["update"] / pa["update"]) + "x",
                    _fmt(a.peak_rss_gb / b.peak_rss_gb) + "x",
                ]
            )
    return markdown_table(headers, rows) if rows else ""


def report(settings: dict, runs: dict[str, list[Result]], pick: str) -> None:
    """Print the results table, the lit-align / TRL ratios, and a warning if the decode work differs."""
    results = [pick_result(rs, pick) for rs in runs.values()]
    s = settings
    print()
    print(
        f"{s.get('method', 'grpo')}, {s['model']}, fp32, {s['batch_size']} completions per step ({s['num_generations']} per prompt), "
        f"{s['max_completion_length']} completion tokens (min_new_tokens = max), "
        f"{'loss dapo' if s.get('method', 'grpo') == 'grpo' else 'loss sigmoid, beta 0.1'}, lr {s['lr']}, "
        f"{s['steps']} timed steps after {s['warmup']} warm-up, torch threads {s['threads']}, "
        f"{s['cpu_count']} CPUs; {pick} of {s['repeats']} run(s) per configuration"
    )
    print()
    print(grpo_table(results))
    table = grpo_ratio_table(results)
    if table:
        print()
        print(table)
    expected = s["batch_size"] * s["max_completion_length"]  # per step on average (a generation may serve several)
    odd = [r.name for r in results if sum(r.step_tokens[r.warmup:]) != expected * r.steps]
    if odd:
        per_step = {r.name: r.step_tokens for r in results if r.name in odd}
        print(
            f"\nwarning: {', '.join(odd)} did not decode {expected} completion tokens in every step: {per_step}"
        )
    prompt = {r.name: phases(r)["prompt_tokens"] for r in results}
    if len(set(prompt.values())) > 1:
        print(f"\nnote: prompt tokens per step differ: {prompt}")


def report_main(args: argparse.Namespace) -> None:
    payload = json.loads(Path(args.report).read_text())
    runs = {name: [Result(**r) for r in rs] for name, rs in payload["runs"].items()}
    report(payload["args"], runs, args.pick)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument(
        "--batch-size", type=int, default=32, help="completions per step (TRL's per_device_train_batch_size)"
    )
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    p.add_argument(
        "--max-completion-length", type=int, default=64, help="completion tokens (also min_new_tokens)"
    )
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (TRL's GRPO default)")
    p.add_argument("--model", default="builtin:tiny-32k")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    p.add_argument(
        "--method",
        choices=["grpo", "online_dpo"],
        default="grpo",
        help="grpo (GRPOTrainer vs GRPO) or online_dpo (OnlineDPOTrainer vs OnlineDPO: two completions per\n"
        "prompt, so --batch-size completions are --batch-size / 2 prompts; use --num-generations 2)",
    )
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (round-robin; see --pick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps, 1 warm-up")
    p.add_argument("--json", "--out", dest="json", help="also write every run to this JSON file")
    p.add_argument("--report", help="print the tables of a JSON file written by --json, run nothing")
    p.add_argument(
        "--pick",
        choices=["quiet-median", "quietest", "median"],
        default="quiet-median",
        help="which of --repeats runs to report (see common.pick_result)",
    )
    p.add_argument("--verbose", action="store_true", help="show the children's stderr")
    # internal: a child runs one configuration
    p.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size % args.num_generations:
        p.error(
            f"--batch-size {args.batch_size} must be divisible by --num-generations {args.num_generations}"
        )
    if args.method == "online_dpo" and args.lr == 1e-6:
        args.lr = 5e-7  # TRL's OnlineDPO default
    if args.quick and not args.child:
        args.steps, args.warmup = 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
    elif args.report:
        report_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
