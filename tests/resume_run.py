"""Train a method on the embedded default, checkpointing every EVERY steps and appending each
step's ``train/`` metrics to ``OUT_DIR/losses.jsonl``.

With ``resume STRAIGHT_DIR`` the same process first trains uninterrupted into ``STRAIGHT_DIR``,
then, from a fresh module, DataModule and seed, resumes ``OUT_DIR/ckpt/last.ckpt`` (one process
start instead of two); ``resume -`` only resumes. ``jobs FILE`` does that for each one-process job
of a JSON list (``{"case", "out", "steps", "every", "straight"}``), one after another.

Launched by tests/test_resume.py as a plain script (so the test can SIGKILL it mid-run, and
Lightning's ``ddp`` strategy can re-execute it for the second rank).

    python tests/resume_run.py CASE DEVICES OUT_DIR MAX_STEPS EVERY [resume STRAIGHT_DIR|-]
    python tests/resume_run.py jobs FILE
"""

import json
import os
import signal
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_align import (  # noqa: E402
    DPO,
    GRPO,
    KTO,
    SFT,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    UnpairedPreferenceDataModule,
)

DATA = "builtin:arithmetic?size=40&steps=1&max_operand=9"


def case(name: str, devices: int):
    adamw = lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0)  # noqa: E731
    batch = 4 // devices
    if name == "sft":
        return SFT(optimizer=adamw), PromptCompletionDataModule(DATA, batch_size=batch, seed=3)
    if name == "sft_packed":
        return SFT(optimizer=adamw), PromptCompletionDataModule(DATA, batch_size=batch, seed=3, packing=True, max_length=64)
    if name == "dpo_precomputed":
        return DPO(precompute_ref_log_probs=True, optimizer=adamw), PreferenceDataModule(DATA, batch_size=batch, seed=3)
    if name == "kto":
        return KTO(optimizer=adamw), UnpairedPreferenceDataModule(DATA, batch_size=batch, seed=3)
    if name == "grpo":  # each rollout serves two steps: kills land between them too
        module = GRPO(
            "builtin:tiny-sft", reward_funcs=["arithmetic_reward"], num_generations=4, num_iterations=2,
            max_completion_length=12, beta=0.04, optimizer=adamw,
        )
        return module, PromptOnlyDataModule(DATA, batch_size=8 // devices, seed=3, eval_split="test")
    raise ValueError(name)


class StepLog(L.Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx,
               "rank": trainer.global_rank,
               "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def fit(name: str, devices: int, out: Path, max_steps: int, every: int, ckpt_path: str | None) -> None:
    L.seed_everything(0)
    out.mkdir(parents=True, exist_ok=True)
    module, data = case(name, devices)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_last=True, save_top_k=-1)
    # GRPO validates (sampling completions) right after each checkpoint: validation must leave the
    # random streams of training as they were, or the resumed run would sample differently.
    validate = dict(val_check_interval=every, check_val_every_n_epoch=None, limit_val_batches=1) if name == "grpo" else {}
    trainer = L.Trainer(
        **validate,
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=max_steps,
        logger=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        callbacks=[checkpoints, StepLog(out / "losses.jsonl")], default_root_dir=out, num_sanity_val_steps=0,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)


def run(name: str, devices: int, out: str, max_steps: int, every: int, straight: str | None) -> None:
    out = Path(out)
    if straight is None:
        fit(name, devices, out, max_steps, every, None)
        return
    if straight != "-":
        fit(name, devices, Path(straight), max_steps, every, None)
    fit(name, devices, out, max_steps, every, str(out / "ckpt" / "last.ckpt"))


if __name__ == "__main__":
    # Ctrl-C raises KeyboardInterrupt, as in a terminal (a parent started in the background, as CI
    # scripts often are, hands its children SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if args[0] == "jobs":
        for job in json.loads(Path(args[1]).read_text()):
            run(job["case"], 1, job["out"], job["steps"], job["every"], job["straight"])
    else:
        run(args[0], int(args[1]), args[2], int(args[3]), int(args[4]), args[6] if args[5:6] == ["resume"] else None)
