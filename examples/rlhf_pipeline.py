"""The full RLHF pipeline in Python: SFT, then a reward model, then PPO against it.

    python examples/rlhf_pipeline.py --sft-steps 500 --rm-steps 300 --ppo-steps 200

1. SFT teaches the tiny model the task's format on demonstrations (prompt-completion data).
2. A reward model (the SFT model's backbone with a scalar head) learns from preference pairs
   which of two solutions is right; it is exported as a Hugging Face sequence-classification
   directory.
3. PPO samples from the SFT policy, scores completions with that reward model, and trains the
   policy and a critic initialised from the reward model (as TRL's PPO recipe does), with the
   per-token KL to the frozen SFT policy in the reward.
"""

import argparse
import functools

import lightning as L
import torch

from lit_align import (
    PPO,
    SFT,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    RewardModel,
    SaveHFModel,
)

TASK = "builtin:arithmetic?size=2000&steps=1&max_operand=9"


def adamw(lr: float):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def main(sft_steps: int = 500, rm_steps: int = 300, ppo_steps: int = 200, out_dir: str = "runs/example-rlhf") -> dict:
    L.seed_everything(0)
    common = dict(accelerator="auto", log_every_n_steps=10, logger=L.pytorch.loggers.CSVLogger(out_dir), enable_checkpointing=False)

    sft = SFT("builtin:tiny", optimizer=adamw(3e-3))
    L.Trainer(max_steps=sft_steps, callbacks=[SaveHFModel(f"{out_dir}/sft")], **common).fit(
        sft, PromptCompletionDataModule(TASK, batch_size=16)
    )

    rm = RewardModel(f"{out_dir}/sft", optimizer=adamw(1e-3))
    L.Trainer(max_steps=rm_steps, callbacks=[SaveHFModel(f"{out_dir}/reward")], **common).fit(
        rm, PreferenceDataModule(TASK, batch_size=16)
    )

    ppo = PPO(
        f"{out_dir}/sft",
        reward_model_name_or_path=f"{out_dir}/reward",
        value_model_name_or_path=f"{out_dir}/reward",
        max_completion_length=24,
        temperature=1.0,
        num_ppo_epochs=4,
        num_mini_batches=2,
        missing_eos_penalty=1.0,
        optimizer=adamw(5e-4),
    )
    trainer = L.Trainer(max_steps=ppo_steps, callbacks=[SaveHFModel(f"{out_dir}/ppo")], **common)
    trainer.fit(ppo, PromptOnlyDataModule("builtin:arithmetic?size=2000&steps=1&max_operand=4", batch_size=32))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith("train/objective")})
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--rm-steps", type=int, default=300)
    parser.add_argument("--ppo-steps", type=int, default=200)
    parser.add_argument("--out-dir", default="runs/example-rlhf")
    args = parser.parse_args()
    main(args.sft_steps, args.rm_steps, args.ppo_steps, args.out_dir)
