"""GRPO with generation in a ``lit-align serve`` process against generation in the training process.

    python benchmarks/bench_server.py                       # 8 timed steps after 2 warm-up, builtin:tiny-32k
    python benchmarks/bench_server.py --steps 8 --repeats 3 --json server.json
    python benchmarks/bench_server.py --quick               # smoke run: 2 timed steps after 1 warm-up

The workload is ``bench_grpo.py``'s (arithmetic prompts, 32 completions of exactly 64 tokens per
step, 8 per prompt, ``loss_type="dapo"``, fp32, 2 threads per process). Two configurations, each
in its own child process: ``inprocess`` (lit-align ``GRPO`` with its HF engine) and ``server``
(``use_vllm: true, vllm_mode: server`` against a ``lit-align serve`` child on this machine, the
same model, the HF engine inside). Measured per step: the step time, the time spent waiting for
the server's completions (``generation``), and the weight push before each rollout (the policy's
36 MB to the server over the gloo weight group, its ``/update_weights/`` call included), in ms
and as a share of the step. The trainer idles while the server generates, so the two never
compete for the cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    Result,
    StepClock,
    _fmt,
    emit,
    markdown_table,
    offline_env,
    peak_rss_gb,
    pick_result,
    run_child,
    set_threads,
    write_jsonl,
)

CONFIGS = {"inprocess": "GRPO, HF engine in the training process", "server": "GRPO, lit-align serve in another process"}


def child_main(args: argparse.Namespace) -> None:
    offline_env()
    set_threads(args.threads)
    import lightning as L
    import torch

    from lit_align import GRPO, PromptOnlyDataModule
    from lit_align.rewards import arithmetic_reward
    from lit_align.rollout.engines import HFEngine
    from lit_align.rollout.server_engine import ServerEngine

    clock, spent = StepClock(), {"gen_s": [], "sync_s": []}
    pending = {"gen_s": 0.0, "sync_s": 0.0}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                pending[name] += time.perf_counter() - t0
        return wrapper

    engine_cls = ServerEngine if args.child == "server" else HFEngine
    engine_cls.generate = timed("gen_s", engine_cls.generate)
    engine_cls.sync_weights = timed("sync_s", engine_cls.sync_weights)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, *a):
            clock.step_end(args.batch_size * args.max_completion_length)
            for k in pending:
                spent[k].append(pending[k])
                pending[k] = 0.0

    server = {}
    if args.child == "server":
        server = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": args.url, "vllm_group_port": args.group_port}
    L.seed_everything(0, verbose=False)
    module = GRPO(
        args.model_dir, reward_funcs=[arithmetic_reward], num_generations=8, max_completion_length=args.max_completion_length,
        loss_type="dapo", generation_kwargs={"min_new_tokens": args.max_completion_length},
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0), **server,
    )
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()])
    trainer.fit(module, PromptOnlyDataModule(args.data, batch_size=args.batch_size))
    emit(Result(name=args.child, framework="lit", description=CONFIGS[args.child], steps=args.steps, warmup=args.warmup,
                step_times=clock.times, step_tokens=clock.tokens, rss_start_gb=clock.rss_start_gb, peak_rss_gb=peak_rss_gb(),
                extra=spent))



def phases(r: Result) -> dict[str, float]:
    w = r.warmup
    return {"step": statistics.mean(r.step_times[w:]), "gen": statistics.mean(r.extra["gen_s"][w:]),
            "sync": statistics.mean(r.extra["sync_s"][w:])}


def report(runs: dict[str, list[Result]], pick: str) -> None:
    results = {n: pick_result(rs, pick) for n, rs in runs.items()}
    rows = []
    for name, r in results.items():
        p = phases(r)
        rows.append([name, _fmt(r.steps_per_s, 3), _fmt(p["step"], 3), _fmt(p["gen"], 3), _fmt(1000 * p["sync"], 1),
                     _fmt(100 * p["sync"] / p["step"], 1) + "%", _fmt(r.peak_rss_gb, 2)])
    print(markdown_table(["config", "steps/s", "step (s)", "generation (s/step)", "weight push (ms/step)",
                          "push share of step", "trainer peak RSS (GB)"], rows))
    if {"inprocess", "server"} <= set(results):
        a, b = results["server"], results["inprocess"]
        print(f"\nserver / in-process: {a.steps_per_s / b.steps_per_s:.2f}x steps/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--model", default="builtin:tiny-32k")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--pick", default="quiet-median", choices=["quiet-median", "quietest", "median"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    for hidden in ("--data", "--model-dir", "--url"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--group-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.child:
        return child_main(args)
    offline_env()
    import os

    from lit_align.data.arithmetic import arithmetic_rows
    from lit_align.models.builtin import builtin_model, builtin_tokenizer
    from lit_align.rollout.server import free_port, launch

    runs: dict[str, list[Result]] = {n: [] for n in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        model_dir = Path(tmp) / "model"
        builtin_model(args.model).save_pretrained(model_dir)
        builtin_tokenizer(args.model).save_pretrained(model_dir)
        rows = arithmetic_rows("prompt_only", "train", size=3 * (args.warmup + args.steps) * args.batch_size // 8, steps=1, max_operand=9)
        data = write_jsonl(rows, Path(tmp) / "prompts.jsonl")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server, url = launch(["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"], env=env, timeout=300)
        try:
            for rep in range(args.repeats):
                for name in CONFIGS:
                    argv = [__file__, "--child", name, "--data", str(data), "--model-dir", str(model_dir), "--url", url,
                            "--group-port", str(free_port()), "--steps", str(args.steps), "--warmup", str(args.warmup),
                            "--batch-size", str(args.batch_size), "--max-completion-length", str(args.max_completion_length),
                            "--threads", str(args.threads)]
                    result = run_child(argv)
                    runs[name].append(result)
                    p = phases(result)
                    print(f"[{rep + 1}/{args.repeats}] {name}: {result.steps_per_s:.3f} steps/s, generation {p['gen']:.3f} s, "
                          f"weight push {1000 * p['sync']:.1f} ms per step", flush=True)
        finally:
            server.kill()
    print()
    report(runs, args.pick)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": {n: [json.loads(r.to_json()) for r in rs]
                                                                             for n, rs in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
