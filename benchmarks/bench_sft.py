"""SFT throughput and memory: TRL ``SFTTrainer`` against lit-align ``SFT``, side by side.

Same model (``builtin:tiny-32k``: a small Llama with a 32k-vocabulary LM head, fp32, the same seeded
weights on both sides), same prompt-completion rows (synthetic random text, prompts much longer than
completions, so the completion-only loss trains on a small share of the tokens), same batch size,
learning rate, max_length, gradient clipping (1.0) and number of CPU threads. Each configuration
runs in its own process; see ``benchmarks/README.md`` for what is measured and the results.

    python benchmarks/bench_sft.py                    # default: 20 timed steps after 3 warm-up steps
    python benchmarks/bench_sft.py --steps 20 --batch-size 8
    python benchmarks/bench_sft.py --quick             # smoke run (a few steps, short sequences)
    python benchmarks/bench_sft.py --configs trl_nogc lit --profile /tmp/prof   # per-op profiles
    python benchmarks/bench_sft.py --method gkd        # GKD: TRL GKDTrainer vs lit-align GKD (lmbda=0)

Configurations (``--configs``, default: trl_default trl_fast lit lit_packed):

    trl_default        TRL defaults (gradient_checkpointing=True, random order, padded batches)
    trl_fast           TRL's fastest honest setting measured here on CPU (see README): no gradient
                       checkpointing, length-grouped batches
    trl_nogc           gradient_checkpointing=False, otherwise defaults
    trl_padding_free   gradient_checkpointing=False, padding_free=True (one flattened row per batch)
    trl_packing        gradient_checkpointing=False, packing=True (bfd, rows of max_length, padding-free)
    lit                lit-align defaults (length-grouped batches, LM head on completion tokens only)
    lit_packed         lit-align packing=True (rows of max_length, block-diagonal attention)
    lit_nogroup        lit-align with group_by_length=False (random order, like TRL's default)
    lit_gc             lit-align with gradient_checkpointing=True (like TRL's default)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Result,
    StepClock,
    emit,
    offline_env,
    peak_rss_gb,
    pick_result,
    ratio_table,
    read_jsonl,
    results_table,
    run_child,
    set_threads,
    synthetic_prompt_completion,
    write_jsonl,
)

# name -> (framework, description, overrides of the framework's defaults)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "trl_default": ("trl", "TRL SFTTrainer defaults (gradient checkpointing, random order, padded)", {}),
    "trl_fast": (
        "trl",
        "TRL, gradient_checkpointing=False, train_sampling_strategy=group_by_length",
        {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
    ),
    "trl_nogc": ("trl", "TRL, gradient_checkpointing=False", {"gradient_checkpointing": False}),
    "trl_padding_free": (
        "trl",
        "TRL, gradient_checkpointing=False, padding_free=True",
        # TRL refuses padding_free with a max_length it would not enforce; the rows are shorter anyway.
        {"gradient_checkpointing": False, "padding_free": True, "max_length": None},
    ),
    "trl_packing": (
        "trl",
        "TRL, gradient_checkpointing=False, packing=True (bfd)",
        {"gradient_checkpointing": False, "packing": True},
    ),
    "lit": ("lit", "lit-align SFT defaults (length-grouped batches)", {}),
    "lit_packed": ("lit", "lit-align SFT, packing=True", {"data": {"packing": True}}),
    "lit_nogroup": ("lit", "lit-align SFT, group_by_length=False", {"data": {"group_by_length": False}}),
    "lit_gc": (
        "lit",
        "lit-align SFT, gradient_checkpointing=True",
        {"module": {"gradient_checkpointing": True}},
    ),
}
DEFAULT_CONFIGS = ["trl_default", "trl_fast", "lit", "lit_packed"]


# --------------------------------------------------------------------------- children


def _profiler(args: argparse.Namespace):
    """A torch profiler over the timed steps only (``prof.step()`` is called at every step end)."""
    if not args.profile:
        return None
    import torch

    return torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=args.warmup, warmup=0, active=args.steps, repeat=1),
    )


def _write_profile(prof, args: argparse.Namespace) -> None:
    if prof is None:
        return
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (out / f"{args.child}.txt").write_text(table)


def run_trl(args: argparse.Namespace, overrides: dict) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock, prof = StepClock(), _profiler(args)

    class Clock(TrainerCallback):
        """Step-end to step-end wall time; tokens from TRL's own real-token counter (attention mask sum,
        or the flattened row length when padding-free)."""

        trainer = None
        seen = 0

        def on_train_begin(self, args_, state, control, **kwargs):
            if prof is not None:
                prof.start()
            self.seen = self.trainer._total_train_tokens
            clock.start()

        def on_step_end(self, args_, state, control, **kwargs):
            total = self.trainer._total_train_tokens
            clock.step_end(total - self.seen)
            self.seen = total
            if prof is not None:
                prof.step()

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_sft_trl_"),
        report_to="none",
        use_cpu=True,
        bf16=False,  # fp32 on CPU (TRL would otherwise turn bf16 on)
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=args.lr,
        max_grad_norm=1.0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **{"max_length": args.max_length, **overrides},
    )
    callback = Clock()
    trainer = SFTTrainer(
        model=args.model_dir,
        args=config,
        train_dataset=datasets.Dataset.from_list(read_jsonl(args.data)),
        callbacks=[callback],
    )
    callback.trainer = trainer
    trainer.train()
    if prof is not None:
        prof.stop()
    _write_profile(prof, args)
    return {
        "clock": clock,
        "extra": {
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            "padding_free": bool(trainer.args.padding_free),
            "packing": bool(trainer.args.packing),
            "optim": str(trainer.args.optim),
        },
    }


def run_lit(args: argparse.Namespace, overrides: dict) -> dict:
    import lightning as L

    from lit_align import SFT, PromptCompletionDataModule
    from lit_align.optim import default_adamw

    clock, prof = StepClock(), _profiler(args)

    class Clock(L.Callback):
        """Step-end to step-end wall time; tokens are the batch's real (non-padding) tokens."""

        def on_train_start(self, trainer, pl_module):
            if prof is not None:
                prof.start()
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step_end(batch.num_tokens)
            if prof is not None:
                prof.step()

    module = SFT(
        args.model,
        optimizer=functools.partial(default_adamw, lr=args.lr),
        **overrides.get("module", {}),
    )
    data = PromptCompletionDataModule(
        args.data, batch_size=args.batch_size, max_length=args.max_length, **overrides.get("data", {})
    )
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        gradient_clip_val=1.0,  # TRL's max_grad_norm=1.0
        gradient_clip_algorithm="norm",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Clock()],
    )
    trainer.fit(module, data)
    if prof is not None:
        prof.stop()
    _write_profile(prof, args)
    return {
        "clock": clock,
        "extra": {
            "gradient_checkpointing": bool(module.gradient_checkpointing),
            "packing": bool(data.packing),
            "group_by_length": bool(data.group_by_length),
        },
    }


# GKD (--method gkd): TRL's experimental GKDTrainer against lit-align GKD on the same rows as
# conversations (user: prompt, assistant: completion; TRL's GKD collator takes messages only), a frozen
# teacher of the same size (the same weights: the cost does not depend on them), beta 0.5, lmbda 0
# (distillation on the data: the divergence, not sampling, is what is compared here).
GKD_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "trl_default": ("trl", "TRL GKDTrainer defaults (gradient checkpointing), lmbda=0", {}),
    "trl_fast": ("trl", "TRL GKDTrainer, gradient_checkpointing=False, lmbda=0", {"gradient_checkpointing": False}),
    "lit": ("lit", "lit-align GKD defaults, lmbda=0", {}),
}


def _messages(rows: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]


def run_trl_gkd(args: argparse.Namespace, overrides: dict) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.step_end(clock_tokens.pop() if clock_tokens else 0)

    clock_tokens: list[int] = []
    compute_loss = GKDTrainer.compute_loss

    def counting(self, model, inputs, *a, **k):  # real tokens of the batch (attention mask)
        clock_tokens[:] = [int(inputs["attention_mask"].sum())]
        return compute_loss(self, model, inputs, *a, **k)

    GKDTrainer.compute_loss = counting
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_gkd_trl_"), report_to="none", use_cpu=True, bf16=False,
        per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps, learning_rate=args.lr,
        max_grad_norm=1.0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        max_length=args.max_length, lmbda=0.0, beta=0.5, **overrides,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model_dir),
        teacher_model=AutoModelForCausalLM.from_pretrained(args.model_dir),
        processing_class=AutoTokenizer.from_pretrained(args.model_dir),
        args=config, train_dataset=datasets.Dataset.from_list(_messages(read_jsonl(args.data))), callbacks=[Clock()],
    )
    trainer.train()
    return {"clock": clock, "extra": {"gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}}


def run_lit_gkd(args: argparse.Namespace, overrides: dict) -> dict:
    import lightning as L

    from lit_align import GKD, LanguageModelingDataModule
    from lit_align.optim import default_adamw

    clock = StepClock()

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step_end(batch.num_tokens)

    rows = Path(args.data).with_name("messages.jsonl")
    write_jsonl(_messages(read_jsonl(args.data)), rows)
    module = GKD(args.model, teacher_model_name_or_path=args.model_dir, lmbda=0.0, beta=0.5,
                 optimizer=functools.partial(default_adamw, lr=args.lr))
    data = LanguageModelingDataModule(str(rows), batch_size=args.batch_size, max_length=args.max_length)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps, accelerator="cpu", devices=1, precision="32-true", gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Clock()],
    )
    trainer.fit(module, data)
    return {"clock": clock, "extra": {"gradient_checkpointing": bool(module.gradient_checkpointing)}}


def method_configs(method: str) -> dict[str, tuple[str, str, dict]]:
    return GKD_CONFIGS if method == "gkd" else CONFIGS


def child_main(args: argparse.Namespace) -> None:
    offline_env()
    set_threads(args.threads)
    framework, description, overrides = method_configs(args.method)[args.child]
    runners = {("sft", "trl"): run_trl, ("sft", "lit"): run_lit, ("gkd", "trl"): run_trl_gkd, ("gkd", "lit"): run_lit_gkd}
    out = runners[(args.method, framework)](args, overrides)
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
            step_tokens=clock.tokens,
            rss_start_gb=clock.rss_start_gb,
            peak_rss_gb=peak_rss_gb(),
            extra=out["extra"],
        )
    )


# --------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace, workdir: Path) -> None:
    """Write the rows (one JSONL both frameworks read) and the model directory TRL loads."""
    offline_env()
    from lit_align.models.builtin import builtin_model, builtin_tokenizer

    # Enough rows for every step of every configuration, packed ones included (about two
    # examples per packed row of max_length), with no second epoch.
    n_rows = args.rows or 3 * (args.warmup + args.steps) * args.batch_size
    rows = synthetic_prompt_completion(
        n_rows, tuple(args.prompt_len), tuple(args.completion_len), seed=args.seed
    )
    args.data = str(write_jsonl(rows, workdir / "data.jsonl"))
    args.model_dir = str(workdir / "model")
    builtin_model(args.model).save_pretrained(args.model_dir)
    builtin_tokenizer(args.model).save_pretrained(args.model_dir)
    prompt = sum(len(r["prompt"]) for r in rows)
    completion = sum(len(r["completion"]) for r in rows)
    print(
        f"workload: {n_rows} rows, prompt {args.prompt_len[0]}-{args.prompt_len[1]} chars, completion "
        f"{args.completion_len[0]}-{args.completion_len[1]} chars (byte tokenizer: 1 char = 1 token, +1 EOS); "
        f"prompt share of tokens {prompt / (prompt + completion + n_rows):.0%}",
        flush=True,
    )


def child_argv(args: argparse.Namespace, name: str) -> list[str]:
    argv = [
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
        "--lr",
        str(args.lr),
        "--max-length",
        str(args.max_length),
        "--threads",
        str(args.threads),
        "--method",
        args.method,
    ]
    if args.profile:
        argv += ["--profile", args.profile]
    return argv


def parent_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        prepare(args, Path(tmp))
        runs: dict[str, list[Result]] = {name: [] for name in args.configs}
        for rep in range(args.repeats):  # round-robin, so a slow spell of a shared machine hits every config
            for name in args.configs:
                print(f"[{rep + 1}/{args.repeats}] {name}: {method_configs(args.method)[name][1]} ...", flush=True)
                result = run_child(child_argv(args, name), verbose=args.verbose)
                runs[name].append(result)
                print(
                    f"    {result.steps_per_s:.3f} steps/s, {result.tokens_per_s:.0f} tokens/s, "
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


def report(settings: dict, runs: dict[str, list[Result]], pick: str) -> None:
    """Print the results table and the lit-align / TRL ratios."""
    results = [pick_result(rs, pick) for rs in runs.values()]
    s = settings
    print()
    print(
        f"{s.get('method', 'sft').upper()}, {s['model']}, fp32, batch size {s['batch_size']}, max_length {s['max_length']}, lr {s['lr']}, "
        f"{s['steps']} timed steps after {s['warmup']} warm-up, torch threads {s['threads']}, "
        f"{s['cpu_count']} CPUs; {pick} of {s['repeats']} run(s) per configuration"
    )
    print()
    print(results_table(results))
    lit = [r.name for r in results if r.framework == "lit"]
    trl = [r.name for r in results if r.framework == "trl"]
    table = ratio_table(results, lit, trl)
    if table:
        print()
        print(table)


def report_main(args: argparse.Namespace) -> None:
    payload = json.loads(Path(args.report).read_text())
    runs = {name: [Result(**r) for r in rs] for name, rs in payload["runs"].items()}
    report(payload["args"], runs, args.pick)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (packed: rows of max_length)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate (TRL's SFT default)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[256, 768], metavar=("MIN", "MAX"))
    p.add_argument("--completion-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    p.add_argument(
        "--rows", type=int, default=0, help="dataset rows (0: enough for every step, no 2nd epoch)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows")
    p.add_argument("--model", default="builtin:tiny-32k")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    p.add_argument("--method", choices=["sft", "gkd"], default="sft", help="sft, or gkd (GKDTrainer vs GKD, lmbda=0)")
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(set(CONFIGS) | set(GKD_CONFIGS)))
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (round-robin; see --pick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 timed steps, 1 warm-up, short rows")
    p.add_argument("--json", help="also write every run to this JSON file")
    p.add_argument("--report", help="print the tables of a JSON file written by --json, run nothing")
    p.add_argument(
        "--pick",
        choices=["quiet-median", "quietest", "median"],
        default="quiet-median",
        help="which of --repeats runs to report (see common.pick_result): the median of the runs other\n"
        "processes disturbed least, the least disturbed one, or the median of all",
    )
    p.add_argument(
        "--profile", help="directory: write a torch.profiler op table of the timed steps per config"
    )
    p.add_argument("--verbose", action="store_true", help="show the children's stderr")
    # internal: a child runs one configuration
    p.add_argument("--child", choices=sorted(set(CONFIGS) | set(GKD_CONFIGS)), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.configs is None:
        args.configs = DEFAULT_CONFIGS if args.method == "sft" else list(GKD_CONFIGS)
    if args.quick and not args.child:
        args.steps, args.warmup = 3, 1
        args.prompt_len, args.completion_len = [64, 192], [8, 32]
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
