"""ORPO: one stage, no reference model, straight from the base model on preference pairs.

    python examples/orpo_single_stage.py --steps 150

The NLL on the chosen solutions teaches the task while the odds-ratio term pushes the
chosen solutions above the rejected ones; a greedy answer is printed at the end.
"""

import argparse
import functools

import lightning as L
import torch

from lit_align import ORPO, PreferenceDataModule, SaveHFModel


def main(steps: int = 150, out_dir: str = "runs/example-orpo") -> dict:
    L.seed_everything(0)
    module = ORPO("builtin:tiny", beta=0.1, optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    data = PreferenceDataModule("builtin:arithmetic?size=2000", eval_split="test", batch_size=16, packing=True, max_length=512)
    trainer = L.Trainer(
        accelerator="auto", max_steps=steps, val_check_interval=min(50, steps), limit_val_batches=4,
        log_every_n_steps=10, logger=L.pytorch.loggers.CSVLogger(out_dir), enable_checkpointing=False,
        callbacks=[SaveHFModel(f"{out_dir}/hf_model")],
    )
    trainer.fit(module, data)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(f"{out_dir}/hf_model")
    tokenizer = AutoTokenizer.from_pretrained(f"{out_dir}/hf_model")
    prompt = tokenizer("Compute 3+4-2+5.\n", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    print("Compute 3+4-2+5. ->", tokenizer.decode(out, skip_special_tokens=True))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out-dir", default="runs/example-orpo")
    args = parser.parse_args()
    main(args.steps, args.out_dir)
