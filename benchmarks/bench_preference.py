"""DPO, KTO and reward-model throughput and memory: TRL 1.16 against lit-align, side by side.

Same model (``builtin:tiny-32k``, fp32, the same seeded weights on both sides; the reward model gets
the same seeded score head), the same synthetic preference rows (prompts of 256-768 tokens,
chosen/rejected completions of 16-64 tokens, varied lengths), batch size, learning rate, gradient
clipping (1.0) and CPU threads. Each configuration runs in its own process (clean peak RSS).

    python benchmarks/bench_preference.py --method dpo            # 10 timed steps after 2 warm-up
    python benchmarks/bench_preference.py --method kto --steps 10
    python benchmarks/bench_preference.py --method reward --quick

Configurations: ``trl_default`` (TRL's defaults: gradient checkpointing on), ``trl_fast``
(``gradient_checkpointing=False``, TRL's fastest honest setting on this CPU), ``lit`` (lit-align
defaults: length-grouped batches, LM head only on completion tokens), ``lit_packed`` (packing).
A KTO "example" is one unpaired row (and its KL pair); DPO and the reward model count pairs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Result,
    StepClock,
    _words,
    emit,
    offline_env,
    peak_rss_gb,
    pick_result,
    ratio_table,
    read_jsonl,
    results_table,
    run_child,
    set_threads,
    write_jsonl,
)

CONFIGS = {
    "trl_default": ("trl", "TRL defaults (gradient checkpointing)", {}),
    "trl_fast": ("trl", "TRL, gradient_checkpointing=False", {"gradient_checkpointing": False}),
    "lit": ("lit", "lit-align defaults (length-grouped batches)", {}),
    "lit_packed": ("lit", "lit-align, packing=True", {"packing": True}),
}
LR = {"dpo": 1e-6, "kto": 1e-6, "reward": 1e-4}  # TRL's defaults


def synthetic_pairs(n: int, prompt_chars, completion_chars, seed: int = 0) -> list[dict]:
    rng = random.Random(f"bench-pref/{seed}")
    rows = []
    for _ in range(n):
        prompt = "Context: " + _words(rng, rng.randint(*prompt_chars)) + "\nAnswer:"
        chosen = " " + _words(rng, rng.randint(*completion_chars))
        rejected = " " + _words(rng, rng.randint(*completion_chars))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def run_trl(args, overrides: dict) -> StepClock:
    import datasets
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    clock = StepClock()

    class Clock(TrainerCallback):
        trainer = None

        def on_train_begin(self, *a, **k):
            self.seen = self.trainer._total_train_tokens
            clock.start()

        def on_step_end(self, *a, **k):
            total = self.trainer._total_train_tokens
            clock.step_end(total - self.seen)
            self.seen = total

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_pref_trl_"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=LR[args.method],
        max_grad_norm=1.0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        max_length=args.max_length,
        **overrides,
    )
    rows = read_jsonl(args.data)
    if args.method == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        model = args.model_dir
    elif args.method == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        model = args.model_dir
    else:
        from trl import RewardConfig as Config
        from trl import RewardTrainer as Trainer

        model = AutoModelForSequenceClassification.from_pretrained(args.reward_dir)
    callback = Clock()
    trainer = Trainer(
        model=model,
        args=Config(**common),
        train_dataset=datasets.Dataset.from_list(rows),
        callbacks=[callback],
    )
    callback.trainer = trainer
    trainer.train()
    return clock


def run_lit(args, overrides: dict) -> StepClock:
    import lightning as L

    from lit_align import DPO, KTO, PreferenceDataModule, RewardModel, UnpairedPreferenceDataModule
    from lit_align.optim import default_adamw

    clock = StepClock()
    e = args.batch_size

    class Clock(L.Callback):
        def on_train_start(self, *a):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rows = (batch.sequence_ids >= 0) & (batch.sequence_ids < (e if args.method == "kto" else 2 * e))
            clock.step_end(int(rows.sum()))  # KTO: the rows' tokens, as TRL counts them

    optimizer = functools.partial(default_adamw, lr=LR[args.method])  # lit-align's default optimizer
    module_cls, data_cls, model = {
        "dpo": (DPO, PreferenceDataModule, args.model_dir),
        "kto": (KTO, UnpairedPreferenceDataModule, args.model_dir),
        "reward": (RewardModel, PreferenceDataModule, args.reward_dir),
    }[args.method]
    module = module_cls(model, optimizer=optimizer)
    data = data_cls(args.data, batch_size=args.batch_size, max_length=args.max_length, **overrides)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Clock()],
    )
    trainer.fit(module, data)
    return clock


def child_main(args) -> None:
    offline_env()
    set_threads(args.threads)
    framework, description, overrides = CONFIGS[args.child]
    clock = (run_trl if framework == "trl" else run_lit)(args, overrides)
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
            extra={},
        )
    )


def prepare(args, workdir: Path) -> None:
    offline_env()
    from lit_align.models.builtin import builtin_model, builtin_tokenizer
    from lit_align.models.heads import load_classifier

    n_rows = 3 * (args.warmup + args.steps) * args.batch_size
    args.data = str(
        write_jsonl(synthetic_pairs(n_rows, args.prompt_len, args.completion_len), workdir / "data.jsonl")
    )
    args.model_dir, args.reward_dir = str(workdir / "model"), str(workdir / "reward")
    builtin_model(args.model).save_pretrained(args.model_dir)
    load_classifier(args.model, "sequence", 1).save_pretrained(args.reward_dir)
    for d in (args.model_dir, args.reward_dir):
        builtin_tokenizer(args.model).save_pretrained(d)


def child_argv(args, name: str) -> list[str]:
    return [
        __file__,
        "--child",
        name,
        "--method",
        args.method,
        "--data",
        args.data,
        "--model-dir",
        args.model_dir,
        "--reward-dir",
        args.reward_dir,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--threads",
        str(args.threads),
    ]


def parent_main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_pref_") as tmp:
        prepare(args, Path(tmp))
        runs: dict[str, list[Result]] = {name: [] for name in args.configs}
        for rep in range(args.repeats):
            for name in args.configs:
                print(f"[{rep + 1}/{args.repeats}] {args.method} {name}: {CONFIGS[name][1]} ...", flush=True)
                result = run_child(child_argv(args, name), verbose=args.verbose)
                runs[name].append(result)
                print(
                    f"    {result.steps_per_s:.3f} steps/s, {result.tokens_per_s:.0f} tokens/s, peak RSS "
                    f"{result.peak_rss_gb:.2f} GB",
                    flush=True,
                )
    results = [pick_result(rs, "quietest") for rs in runs.values()]
    print(
        f"\n{args.method.upper()}, {args.model}, fp32, batch size {args.batch_size}, max_length {args.max_length}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, torch threads {args.threads}, {os.cpu_count()} CPUs\n"
    )
    print(results_table(results))
    table = ratio_table(
        results,
        [r.name for r in results if r.framework == "lit"],
        [r.name for r in results if r.framework == "trl"],
    )
    if table:
        print("\n" + table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({n: [json.loads(r.to_json()) for r in rs] for n, rs in runs.items()}, indent=2)
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["dpo", "kto", "reward"], default="dpo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[256, 768])
    p.add_argument("--completion-len", type=int, nargs=2, default=[16, 64])
    p.add_argument("--model", default="builtin:tiny-32k")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps, short rows")
    p.add_argument("--json")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--reward-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.prompt_len, args.completion_len = 2, 1, [64, 128], [8, 16]
    return args


if __name__ == "__main__":
    a = parse_args()
    child_main(a) if a.child else parent_main(a)
