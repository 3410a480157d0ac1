"""The basic pipeline in Python: SFT on demonstrations, then DPO from the SFT model on preferences.

    python examples/sft_then_dpo.py --sft-steps 300 --dpo-steps 100

The SFT stage's Hugging Face export is the DPO stage's policy *and* reference
(``model_name_or_path``; the reference is a frozen copy of the same directory).
"""

import argparse
import functools

import lightning as L
import torch

from lit_align import DPO, SFT, PreferenceDataModule, PromptCompletionDataModule, SaveHFModel


def main(sft_steps: int = 300, dpo_steps: int = 100, out_dir: str = "runs/example-sft-dpo") -> dict:
    L.seed_everything(0)
    common = dict(accelerator="auto", log_every_n_steps=10, logger=L.pytorch.loggers.CSVLogger(out_dir), enable_checkpointing=False)

    sft = SFT("builtin:tiny", optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    demos = PromptCompletionDataModule("builtin:arithmetic?size=2000", batch_size=16)
    L.Trainer(max_steps=sft_steps, callbacks=[SaveHFModel(f"{out_dir}/sft")], **common).fit(sft, demos)

    dpo = DPO(f"{out_dir}/sft", beta=0.1, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    pairs = PreferenceDataModule("builtin:arithmetic?size=256&seed=1", batch_size=16)
    trainer = L.Trainer(max_steps=dpo_steps, callbacks=[SaveHFModel(f"{out_dir}/dpo")], **common)
    trainer.fit(dpo, pairs)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith("train/rewards")})
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=100)
    parser.add_argument("--out-dir", default="runs/example-sft-dpo")
    args = parser.parse_args()
    main(args.sft_steps, args.dpo_steps, args.out_dir)
