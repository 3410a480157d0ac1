"""GRPO with a reward function written in this script.

    python examples/grpo_custom_reward.py --sft-steps 500 --grpo-steps 200

A reward function has TRL's signature: it receives the prompts, the completions (strings, or
message lists for conversational data), their token ids, and every extra dataset column as a
keyword list (here the task's ``answer``), and returns one float (or None) per completion.
Several functions combine with ``reward_weights``; each is logged as ``rewards/<name>/mean``.
"""

import argparse
import functools

import lightning as L
import torch

from lit_align import GRPO, SFT, PromptCompletionDataModule, PromptOnlyDataModule, SaveHFModel
from lit_align.data.arithmetic import parse_answer


def close_answer(prompts, completions, completion_ids, answer, **kwargs):
    """Partial credit: 1 for the right answer, less the further off it is; None without an answer."""
    rewards = []
    for text, truth in zip(completions, answer):
        guess = parse_answer(text)
        rewards.append(None if guess is None else 1.0 / (1.0 + abs(guess - int(truth))))
    return rewards


def brevity(prompts, completions, completion_ids, **kwargs):
    """A small cost per token beyond the 16 a one-step solution needs."""
    return [-0.01 * max(0, len(ids) - 16) for ids in completion_ids]


def main(sft_steps: int = 500, grpo_steps: int = 200, out_dir: str = "runs/example-grpo") -> dict:
    L.seed_everything(0)
    common = dict(accelerator="auto", log_every_n_steps=5, logger=L.pytorch.loggers.CSVLogger(out_dir), enable_checkpointing=False)
    sft = SFT("builtin:tiny", optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    L.Trainer(max_steps=sft_steps, callbacks=[SaveHFModel(f"{out_dir}/sft")], **common).fit(
        sft, PromptCompletionDataModule("builtin:arithmetic?size=2000&steps=1&max_operand=9", batch_size=16)
    )

    grpo = GRPO(
        f"{out_dir}/sft",
        reward_funcs=[close_answer, brevity],
        reward_weights=[1.0, 0.5],
        num_generations=8,
        max_completion_length=24,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
    )
    trainer = L.Trainer(max_steps=grpo_steps, callbacks=[SaveHFModel(f"{out_dir}/grpo")], **common)
    trainer.fit(grpo, PromptOnlyDataModule("builtin:arithmetic?size=2000&steps=1&max_operand=4", batch_size=128))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith("train/reward")})
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=500)
    parser.add_argument("--grpo-steps", type=int, default=200)
    parser.add_argument("--out-dir", default="runs/example-grpo")
    args = parser.parse_args()
    main(args.sft_steps, args.grpo_steps, args.out_dir)
