"""Run methods for two steps each on one or two CPU processes and dump per-step losses, metrics and
weights, one ``OUT_DIR/<method>.json`` per method.

    python tests/ddp_run.py METHOD[,METHOD...] DEVICES OUT_DIR

Launched by tests/test_ddp.py as a plain script: Lightning's ``ddp`` strategy re-executes
``sys.argv`` for the second rank, which must be this script, not pytest. The methods run one after
another in the same processes (the process group is set up once), each from its own seed.
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import lightning as L  # noqa: E402
import torch  # noqa: E402
from scripted_engine import TOOL_TEMPLATE, ScriptedEngine, ToolCaller, add  # noqa: E402  (tests/ is this script's directory)

from lit_align import (  # noqa: E402
    BCO,
    CPO,
    DPO,
    GKD,
    GRPO,
    KTO,
    ORPO,
    PPO,
    PRM,
    RLOO,
    SFT,
    XPO,
    LanguageModelingDataModule,
    NashMD,
    OnlineDPO,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    RolloutCallback,
    StepwiseDataModule,
    UnpairedPreferenceDataModule,
)
from lit_align.models.builtin import builtin_tokenizer  # noqa: E402

METHODS = {
    "sft": (SFT, PromptCompletionDataModule),
    "sft_stream": (SFT, LanguageModelingDataModule),  # a shuffled stream, each rank reading every other row
    "sft_vlm": (SFT, PromptCompletionDataModule),  # builtin:tiny-vlm on builtin:shapes: each rank collates its rows' pixels
    "dpo": (DPO, PreferenceDataModule),
    "kto": (KTO, UnpairedPreferenceDataModule),
    "bco": (BCO, UnpairedPreferenceDataModule),
    "grpo": (GRPO, PromptOnlyDataModule),
    "rloo": (RLOO, PromptOnlyDataModule),
    "ppo": (PPO, PromptOnlyDataModule),
    "grpo_sampled": (GRPO, PromptOnlyDataModule),
    "grpo_spg": (GRPO, PromptOnlyDataModule),  # steps_per_generation=2 (accumulate_grad_batches=2), shared_prompt_forward
    "grpo_tools": (GRPO, PromptOnlyDataModule),  # multi-turn rollouts with a tool
    "grpo_compile": (GRPO, PromptOnlyDataModule),  # torch_compile: the policy's and the reference's layers
    "gkd": (GKD, PromptCompletionDataModule),
    "online_dpo": (OnlineDPO, PromptOnlyDataModule),
    "nash_md": (NashMD, PromptOnlyDataModule),
    "xpo": (XPO, PromptOnlyDataModule),
    "cpo": (CPO, PreferenceDataModule),
    "orpo": (ORPO, PreferenceDataModule),
    "prm": (PRM, StepwiseDataModule),
}
# Online methods: global batch statistics on (batch scaling, the KL, whitening) and a scripted engine,
# so one and two processes see the same completions; grpo_sampled samples with the real engine
# (ranks then decode different lengths) and only has to finish.
ONLINE = {
    "grpo": {"num_generations": 4, "beta": 0.04, "scale_rewards": "batch", "loss_type": "dapo"},
    "rloo": {"num_generations": 4, "beta": 0.05, "normalize_advantages": True},
    "ppo": {"num_ppo_epochs": 2, "kl_estimator": "k3", "whiten_rewards": True},
    "grpo_sampled": {"num_generations": 4, "beta": 0.04},
    "grpo_spg": {"num_generations": 4, "beta": 0.04, "loss_type": "dapo", "shared_prompt_forward": True},
    "grpo_tools": {"num_generations": 4, "beta": 0.04, "loss_type": "dapo", "tools": [add]},
    "grpo_compile": {"num_generations": 4, "beta": 0.04, "scale_rewards": "batch", "loss_type": "dapo",
                     "torch_compile": True},
    "online_dpo": {"beta": 0.1, "missing_eos_penalty": 1.0},
    "nash_md": {"beta": 0.1, "mixture_coef": 0.5},
    "xpo": {"beta": 0.1, "alpha": 0.1},
}
PAIRED = ("online_dpo", "nash_md", "xpo")  # two samples per prompt, max_new_tokens (TRL's name for these methods)


class Record(L.Callback):
    def __init__(self):
        self.losses, self.metrics = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def build(method: str, devices: int, out: str, methods: dict = METHODS, offline: dict | None = None):
    """The module, DataModule and callbacks of ``method`` (its settings above; ``offline``: extra arguments
    of the offline methods), each rank's batch a ``devices``-th of the global one. tests/sharded_run.py
    builds its runs here too."""
    global_batch = 8
    module_cls, data_cls = methods[method]
    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0)  # noqa: E731
    callbacks = [Record()]
    dataset = "builtin:arithmetic?size=32"
    if method in ONLINE:
        length = {"max_new_tokens" if method in PAIRED else "max_completion_length": 16}
        if method == "grpo_tools":  # a template that renders tools, and room for the tool turn and the answer
            template = os.path.join(os.path.dirname(out), "tools.jinja")
            with open(template, "w") as f:
                f.write(TOOL_TEMPLATE)
            length = {"max_completion_length": 160, "chat_template_path": template}
        module = module_cls(reward_funcs=["arithmetic_reward"], optimizer=optimizer, **length, **ONLINE[method])
        dataset = "builtin:arithmetic?size=32&steps=1&max_operand=9"
        if method == "grpo_tools":
            dataset += "&conversational=true"
        global_batch = {"ppo": 8, **dict.fromkeys(PAIRED, 4)}.get(method, 16)  # paired methods: prompts
        if method == "grpo_tools":
            callbacks.append(RolloutCallback(engine=ToolCaller()))
        elif method != "grpo_sampled":
            callbacks.append(RolloutCallback(engine=ScriptedEngine(builtin_tokenizer())))
    elif method == "gkd":  # distillation on the data (lmbda=0), from a teacher the test wrote
        module = module_cls(teacher_model_name_or_path=os.environ["LIT_ALIGN_TEST_TEACHER"], lmbda=0.0, optimizer=optimizer)
    elif method == "gkd_sampled":  # every batch sampled in training_step: half the student's, half the teacher's (seq_kd)
        module = module_cls(teacher_model_name_or_path=os.environ["LIT_ALIGN_TEST_TEACHER"], lmbda=0.5, seq_kd=True,
                            max_new_tokens=12, optimizer=optimizer)
    elif method == "sft_vlm":
        module, dataset = module_cls("builtin:tiny-vlm", optimizer=optimizer), "builtin:shapes?size=32"
    else:
        module = module_cls(optimizer=optimizer, **(offline or {}).get(method, {}))
    if method == "sft_stream":
        data = data_cls(dataset, batch_size=global_batch // devices, streaming=True, shuffle_buffer_size=8)
    else:
        data = data_cls(dataset, batch_size=global_batch // devices, shuffle=False, group_by_length=False)
    return module, data, callbacks


def run(method: str, devices: int, out: str) -> None:
    L.seed_everything(0)
    module, data, callbacks = build(method, devices, out)
    record = callbacks[0]
    max_steps = 4 if method == "ppo" else 2  # PPO: two rollouts of two epochs
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=max_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, callbacks=callbacks, accumulate_grad_batches=2 if method == "grpo_spg" else 1,
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        weights = {k: v.flatten()[:50].tolist() for k, v in module.model.state_dict().items()}
        with open(out, "w") as f:
            json.dump({"world_size": trainer.world_size, "losses": record.losses, "metrics": record.metrics, "weights": weights}, f)


def main(methods: str, devices: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    for method in methods.split(","):
        run(method, devices, os.path.join(out_dir, f"{method}.json"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
