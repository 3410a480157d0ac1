"""Run methods for two steps each on one CPU process, or on two sharded with FSDP2 (Lightning's
``ModelParallelStrategy`` over gloo), and dump per-step losses, metrics and weights, one
``OUT_DIR/<method>.json`` per method (the weights gathered whole from the shards).

    python tests/sharded_run.py METHOD[,METHOD...] DEVICES OUT_DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/sharded_run.py generate 2 OUT_DIR
    LIT_ALIGN_TEST_SERVER=URL LIT_ALIGN_TEST_GROUP_PORT=PORT python tests/sharded_run.py grpo_server 2 OUT_DIR

Launched by tests/test_sharded.py as a plain script (the strategy re-executes ``sys.argv`` for the
second rank). The methods and their settings are tests/ddp_run.py's, plus ``reward`` and
``resume_<method>`` (four steps straight and resumed from the step-2 checkpoint). ``generate`` (under torchrun)
samples greedily from a sharded policy and reference, each rank its own prompts, lengths and number
of calls, and writes each rank's completions beside an unsharded copy's (``generate_<rank>.json``).
``grpo_server`` (tests/test_server_fit.py) trains GRPO on a ``lit-align serve`` process's samples and
writes the weights rank 0 pushed to it and the policy's gathered weights (``grpo_server.pt``).
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import lightning as L  # noqa: E402
import torch  # noqa: E402
from ddp_run import METHODS, Record, build  # noqa: E402  (tests/ is this script's directory)
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from lit_align import PreferenceDataModule, RewardModel  # noqa: E402
from lit_align.models.export import SaveHFModel  # noqa: E402
from lit_align.ops.sharding import full_state_dict, is_sharded  # noqa: E402

METHODS = {**METHODS, "reward": (RewardModel, PreferenceDataModule), "gkd_sampled": METHODS["gkd"], "dpo_sync": METHODS["dpo"],
           "sft_compile": METHODS["sft"], "sft_onednn": METHODS["sft"]}
OFFLINE = {
    "dpo_sync": {"sync_ref_model": True, "ref_model_sync_steps": 1},  # TR-DPO: the policy mixed into the reference each step
    "sft_compile": {"torch_compile": True},  # each layer compiled after sharding
    "sft_onednn": {"onednn_linear": True},  # the linear layers on oneDNN, their weights unsharded in each forward
}


def resume(method: str, devices: int, out_dir: str) -> None:
    """Four steps straight, and the same run resumed from its step-2 checkpoint (a sharded, distributed
    checkpoint: a folder of each rank's shards): the resumed steps' losses and the final weights."""
    from pathlib import Path

    def fit(folder: Path, ckpt_path: str | None):
        L.seed_everything(0)
        module_cls, data_cls = METHODS[method]
        module = module_cls(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
        data = data_cls("builtin:arithmetic?size=32", batch_size=8 // devices, seed=3)
        record = Record()
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=4, logger=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[record, checkpoints],
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer, record.losses, full_state_dict(module.model)

    straight = Path(out_dir) / f"{method}_straight"
    trainer, losses, state = fit(straight, None)
    step2 = str(straight / "epoch=0-step=2.ckpt")
    _, resumed_losses, resumed_state = fit(Path(out_dir) / f"{method}_resumed", step2)
    if trainer.is_global_zero:
        with open(os.path.join(out_dir, f"resume_{method}.json"), "w") as f:
            json.dump({"world_size": trainer.world_size, "checkpoint_is_folder": os.path.isdir(step2), "losses": losses,
                       "resumed_losses": resumed_losses,
                       "weights": {k: v.flatten()[:50].tolist() for k, v in state.items()},
                       "resumed_weights": {k: v.flatten()[:50].tolist() for k, v in resumed_state.items()}}, f)


def run(method: str, devices: int, out: str) -> None:
    if method.startswith("resume_"):
        return resume(method.removeprefix("resume_"), devices, os.path.dirname(out))
    L.seed_everything(0)
    module, data, callbacks = build(method, devices, out, METHODS, OFFLINE)
    if method == "sft":  # the policy written as one Hugging Face directory, from the shards when sharded
        callbacks.append(SaveHFModel(os.path.join(os.path.dirname(out), "hf_sft")))
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=4 if method == "ppo" else 2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, callbacks=callbacks, accumulate_grad_batches=2 if method == "grpo_spg" else 1,
    )
    trainer.fit(module, data)
    sharded = is_sharded(module.model)
    state = full_state_dict(module.model)  # every rank: a collective when sharded
    if trainer.is_global_zero:
        record = callbacks[0]
        weights = {k: v.flatten()[:50].tolist() for k, v in state.items()}
        with open(out, "w") as f:
            json.dump({"world_size": trainer.world_size, "sharded": sharded, "losses": record.losses,
                       "metrics": record.metrics, "weights": weights}, f)


def grpo_server(devices: int, out_dir: str) -> None:
    """GRPO for two steps, sampled by the ``lit-align serve`` process at ``$LIT_ALIGN_TEST_SERVER``
    (``vllm_mode="server"``; its weight-sync group on ``$LIT_ALIGN_TEST_GROUP_PORT``), its weights pushed
    before each rollout, and the final weights pushed after the run (``engine.sync_weights`` called on
    every rank, outside a rollout). Rank 0 writes every push (the tensors it broadcast) and the policy's
    weights gathered whole (``full_state_dict``) at each push."""
    from lit_align import GRPO, PromptOnlyDataModule
    from lit_align.rollout.server_engine import ServerEngine

    pushes, push = [], ServerEngine._push

    def recording_push(self, named):  # what rank 0 broadcasts to the server, as it sends it
        pushes.append({name: t.detach().clone() for name, t in named})
        return push(self, named)

    ServerEngine._push = recording_push

    class Gathered(L.Callback):
        """A trainer callback: runs before the module's RolloutCallback, which pushes the weights."""

        def __init__(self):
            self.states = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.states.append({k: v.clone() for k, v in full_state_dict(pl_module.model).items()})  # a collective

    def mean_token_id(completion_ids, **kwargs):  # spread within every group, whatever the untrained model samples
        return [sum(ids) / max(len(ids), 1) for ids in completion_ids]

    L.seed_everything(0)
    module = GRPO(reward_funcs=[mean_token_id], num_generations=4, beta=0.04, max_completion_length=8,
                  use_vllm=True, vllm_mode="server", vllm_server_base_url=os.environ["LIT_ALIGN_TEST_SERVER"],
                  vllm_group_port=int(os.environ["LIT_ALIGN_TEST_GROUP_PORT"]), vllm_server_timeout=60,
                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
    data = PromptOnlyDataModule("builtin:arithmetic?size=16&steps=1&max_operand=9", batch_size=16 // devices, shuffle=False)
    record, gathered = Record(), Gathered()
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[record, gathered],
    )
    trainer.fit(module, data)
    sharded = is_sharded(module.model)
    module.engine.sync_weights(module.model)  # the final weights, from the sharded policy outside any rollout
    gathered.states.append({k: v.clone() for k, v in full_state_dict(module.model).items()})
    module.engine.close()
    if trainer.is_global_zero:
        torch.save({"world_size": trainer.world_size, "sharded": sharded, "losses": record.losses, "pushes": pushes,
                    "states": gathered.states}, os.path.join(out_dir, "grpo_server.pt"))


def generate(out_dir: str) -> None:
    """Greedy completions of a sharded model equal an unsharded copy's, although each rank decodes its
    own number of tokens (its prompts, its ``max_completion_length``) and, inside one gather
    (``full_parameters``, as a multi-turn rollout), makes its own number of generate calls."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lit_align import GRPO
    from lit_align.models.builtin import builtin_model
    from lit_align.ops.completions import completion_logprobs
    from lit_align.ops.sharding import full_parameters
    from lit_align.rollout.engines import SamplingParams

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module = GRPO("builtin:tiny-sft", reward_funcs=["arithmetic_reward"], num_generations=2, beta=0.04, temperature=0.0)
    module.configure_model()
    module.shard(init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
    plain = builtin_model("builtin:tiny-sft")
    tok = module.tokenizer
    prompts = [["3+4=", "12+30="], ["7*8=", "1+1=", "(2+3)*4="]][rank % 2]
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    sampling = SamplingParams(max_completion_length=3 + 9 * rank, temperature=0.0, num_generations=2)
    expected = module.engine.generate(plain, ids, mask, sampling)
    got = {"policy": module.sample(module.model, ids, mask, sampling=sampling)}  # gathers for this call
    got["reference"] = module.sample(module.ref_model, ids, mask, policy=False, sampling=sampling)
    with full_parameters(module):  # one gather, then rank r makes r + 2 calls
        got["calls"] = [module.sample(module.model, ids, mask, sampling=sampling) for _ in range(rank + 2)][-1]
    # the sharded model still computes the same log-probs afterwards (training's forward)
    seqs = module.sequences(expected)
    logps = completion_logprobs(module.model, seqs, expected.completion_mask)[0]
    plain_logps = completion_logprobs(plain, seqs, expected.completion_mask)[0]
    result = {name: g.completion_ids.tolist() for name, g in got.items()}
    result.update(expected=expected.completion_ids.tolist(), logps=logps.tolist(), plain_logps=plain_logps.tolist())
    with open(os.path.join(out_dir, f"generate_{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main(methods: str, devices: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    if methods == "generate":
        return generate(out_dir)
    if methods == "grpo_server":
        return grpo_server(devices, out_dir)
    for method in methods.split(","):
        run(method, devices, os.path.join(out_dir, f"{method}.json"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
