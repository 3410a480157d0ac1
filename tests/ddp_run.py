"""Run a method for two steps on one or two CPU processes and dump per-step losses, metrics and weights.

Launched by tests/test_ddp.py as a plain script: Lightning's ``ddp`` strategy re-executes
``sys.argv`` for the second rank, which must be this script, not pytest.
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_align import (  # noqa: E402
    BCO,
    DPO,
    KTO,
    SFT,
    PreferenceDataModule,
    PromptCompletionDataModule,
    UnpairedPreferenceDataModule,
)

METHODS = {
    "sft": (SFT, PromptCompletionDataModule),
    "dpo": (DPO, PreferenceDataModule),
    "kto": (KTO, UnpairedPreferenceDataModule),
    "bco": (BCO, UnpairedPreferenceDataModule),
}


class Record(L.Callback):
    def __init__(self):
        self.losses, self.metrics = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def main(method: str, devices: int, out: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    global_batch = 8
    module_cls, data_cls = METHODS[method]
    module = module_cls(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
    data = data_cls(
        "builtin:arithmetic?size=32", batch_size=global_batch // devices, shuffle=False, group_by_length=False
    )
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, callbacks=[record],
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        weights = {k: v.flatten()[:50].tolist() for k, v in module.model.state_dict().items()}
        with open(out, "w") as f:
            json.dump({"losses": record.losses, "metrics": record.metrics, "weights": weights}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
