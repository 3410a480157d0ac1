"""FSDP2 on CPU: Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``
over gloo, each method's models sharded by ``AlignModule.configure_model``
(:mod:`lit_align.ops.sharding`), gives the same losses, metrics and weights as one unsharded process
on the same global batch: SFT, DPO (a sharded frozen reference), GRPO, KTO, the reward model (a
score head), GKD (a sharded teacher), PPO (manual optimisation, a value head, gradient clipping),
RLOO, BCO, Online DPO, Nash-MD and XPO (pairs scored against the sharded reference), CPO and ORPO
(their NLL a token mean over both ranks), the PRM (a token-classification head), GRPO with
multi-turn tool rollouts, TR-DPO (the sharded policy mixed into the sharded reference), SFT with
``torch_compile`` (each layer compiled after sharding) and SFT with ``onednn_linear``.
Also: the sharded checkpoint (a folder of shards, the frozen reference left out) resumes exactly;
SaveHFModel writes one loadable Hugging Face directory from the shards; generation on sharded
weights keeps ranks that decode different lengths, or call generate a different number of times, from
waiting on each other, and equals an unsharded model's. (A sharded policy's weight pushes to a
``lit-align serve`` process: tests/test_server_fit.py.)

Lightning's other sharded strategies do not run on CPU: ``FSDPStrategy`` (FSDP1) and
``DeepSpeedStrategy`` refuse a non-CUDA accelerator (see the README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).with_name("sharded_run.py")
METHODS = ["sft", "dpo", "grpo", "kto", "reward", "gkd", "ppo", "rloo", "bco", "online_dpo", "nash_md", "xpo", "cpo", "orpo",
           "prm", "grpo_tools", "dpo_sync", "sft_compile", "sft_onednn"]
SAMPLED = ["grpo_sampled", "gkd_sampled"]  # the HF engine on sharded weights: two processes only, each its own samples
# Adam at lr 1e-2 turns the float rounding of a two-way split batch into weight differences of a few
# 1e-5 for the reward model (the same under DDP); the rest agree to test_ddp's tolerances.
LOOSER = {"reward": dict(atol=1e-4, rtol=1e-3)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gkd_teacher):
    """Every method on one process and on two sharded ones: two launches side by side."""
    tmp = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, LIT_ALIGN_TEST_TEACHER=str(gkd_teacher), OMP_NUM_THREADS="1")
    methods = [*METHODS, "resume_dpo"]
    launches = {
        devices: subprocess.Popen([sys.executable, str(SCRIPT), ",".join(names), str(devices), str(tmp / str(devices))],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for devices, names in ((1, methods), (2, [*methods, *SAMPLED]))
    }
    for devices, proc in launches.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{devices} process(es): {err[-3000:]}"
    return tmp


def result(runs: Path, devices: int, name: str) -> dict:
    return json.loads((runs / str(devices) / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_sharded_two_processes_match_one(method, runs):
    one, two = result(runs, 1, method), result(runs, 2, method)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["sharded"] and not one["sharded"]
    assert len(one["losses"]) == len(two["losses"]) == 2  # PPO: one entry per rollout
    tol = LOOSER.get(method, dict(atol=1e-5, rtol=1e-5))
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    for step, metrics in enumerate(one["metrics"]):  # every logged metric is the global one
        for name, value in metrics.items():
            assert two["metrics"][step][name] == pytest.approx(value, abs=tol["atol"], rel=tol["rtol"]), name
    assert one["weights"].keys() == two["weights"].keys()  # gathered whole, under the model's own names
    for name, w in one["weights"].items():
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(w), atol=tol["atol"],
                                   rtol=max(tol["rtol"], 1e-4), msg=name)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly(runs):
    """DPO's sharded checkpoint at step 2 (a folder: each rank's shards of the policy and the optimizer
    state, no reference) resumes to the uninterrupted run's steps 3-4 and final weights."""
    two = result(runs, 2, "resume_dpo")
    assert two["world_size"] == 2 and two["checkpoint_is_folder"]
    assert two["resumed_losses"] == two["losses"][2:]
    assert two["resumed_weights"] == two["weights"]
    one = result(runs, 1, "resume_dpo")
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sharded_save_hf_model_writes_one_loadable_directory(runs):
    from transformers import AutoModelForCausalLM

    two = result(runs, 2, "sft")
    model = AutoModelForCausalLM.from_pretrained(runs / "2" / "hf_sft")
    state = model.state_dict()
    assert state.keys() == two["weights"].keys()
    for name, w in two["weights"].items():  # the run's gathered weights, bit for bit
        assert state[name].flatten()[:50].tolist() == w, name
    assert (runs / "2" / "hf_sft" / "tokenizer.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", SAMPLED)
def test_sharded_sampled_generation_finishes(method, runs):
    """Each rank samples its own completions with the HF engine on sharded weights (GRPO: gathered for
    the rollout; GKD: in training_step, from the student or the sharded teacher): ranks that stop
    decoding at different steps do not wait on each other."""
    two = result(runs, 2, method)
    assert two["sharded"] and len(two["losses"]) == 2
    assert method != "grpo_sampled" or "train/reward" in two["metrics"][-1]


@pytest.fixture(scope="module")
def generations(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_generate")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
            "generate", "2", str(out)]
    proc = subprocess.run(args, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"generate_{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_sharded_greedy_generation_equals_unsharded(rank, generations):
    """Rank 0 decodes 3 tokens, rank 1 up to 12 (other prompts); inside one gather rank r makes r + 2
    generate calls. The policy's and the (sharded) reference's greedy completions equal an unsharded
    copy's, and the resharded model's log-probs do too."""
    got = generations[rank]
    assert len(got["expected"][0]) == (3 if rank == 0 else 12)
    for name in ("policy", "reference", "calls"):
        assert got[name] == got["expected"], name
    torch.testing.assert_close(torch.tensor(got["logps"]), torch.tensor(got["plain_logps"]), atol=1e-6, rtol=1e-6)


class FakeMesh:
    """A device mesh as ``shard_module`` reads it (names and sizes), with no process group."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, sizes):
        self.sizes = dict(zip(self.mesh_dim_names, sizes))

    def __getitem__(self, name):
        mesh = FakeMesh(())
        mesh.size = lambda: self.sizes[name]
        return mesh


def test_sharding_refuses_a_tensor_parallel_mesh():
    """ModelParallelStrategy's default sizes put a node's devices on the tensor-parallel axis (every
    rank would read the same batch): the error says which sizes to pass."""
    from lit_align.ops.sharding import shard_module

    with pytest.raises(ValueError, match=r"data_parallel_size=<number of devices>, tensor_parallel_size=1"):
        shard_module(nn.Module(), FakeMesh((1, 2)))


def test_sharding_refuses_peft_models():
    from lit_align.ops.sharding import shard_module

    parent = nn.Module()
    parent.model = nn.Linear(2, 2)
    parent.model.peft_config = {}
    with pytest.raises(NotImplementedError, match="strategy='ddp'"):
        shard_module(parent, FakeMesh((2, 1)))
