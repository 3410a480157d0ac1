"""lit-align inside your own Lightning project: your Trainer, callbacks and logger; no CLI.

    python examples/sft_in_lightning.py --max-steps 200

Swap ``builtin:tiny`` / ``builtin:arithmetic`` for a Hub model and dataset (for example
``Qwen/Qwen2.5-0.5B`` and ``trl-lib/Capybara``) to train for real.
"""

import argparse
import functools

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lit_align import SFT, LinearWarmupDecay, PromptCompletionDataModule, SaveHFModel


def main(max_steps: int = 200, out_dir: str = "runs/example-sft") -> dict:
    L.seed_everything(0)
    module = SFT(
        model_name_or_path="builtin:tiny",
        loss_type="nll",
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0),
        lr_scheduler=functools.partial(LinearWarmupDecay, warmup_steps=10),
    )
    data = PromptCompletionDataModule("builtin:arithmetic?size=2000", eval_split="test", batch_size=16, max_length=256)
    trainer = L.Trainer(
        accelerator="auto",
        max_steps=max_steps,
        val_check_interval=min(50, max_steps),
        limit_val_batches=4,
        log_every_n_steps=5,
        default_root_dir=out_dir,
        logger=CSVLogger(out_dir),
        callbacks=[
            ModelCheckpoint(monitor="val/loss", save_last=True),
            LearningRateMonitor(logging_interval="step"),
            SaveHFModel(f"{out_dir}/hf_model"),
        ],
    )
    trainer.fit(module, data)

    # The exported directory is a plain Hugging Face model: generate from it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(f"{out_dir}/hf_model")
    tokenizer = AutoTokenizer.from_pretrained(f"{out_dir}/hf_model")
    prompt = tokenizer("Compute 3+4-2+5.\n", return_tensors="pt")
    completion = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    print("Compute 3+4-2+5. ->", tokenizer.decode(completion, skip_special_tokens=True))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--out-dir", default="runs/example-sft")
    args = parser.parse_args()
    main(args.max_steps, args.out_dir)
