"""Two-process DDP on CPU (gloo) gives the same losses, metrics and weights as one process on the same
global batch: SFT's global token normalisation (also on a shuffled stream, each rank reading every
other row), DPO's pair means, KTO's KL estimate (``train/kl``),
BCO's running reward mean (``train/delta``), GRPO's batch-scaled advantages and DAPO token count,
RLOO's normalised advantages, PPO's whitening and GKD's token mean are all computed over both ranks;
multi-turn rollouts with a tool give both ranks' tool metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")


METHODS = ["sft", "sft_stream", "sft_vlm", "dpo", "kto", "bco", "grpo", "rloo", "ppo", "gkd", "online_dpo", "grpo_tools", "grpo_compile"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gkd_teacher):
    """Every method on one process and on two: two launches in all (a process start and a process
    group cost more than two steps of a tiny model), the one-process run beside the two-process one."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, LIT_ALIGN_TEST_TEACHER=str(gkd_teacher))
    launches = {
        devices: subprocess.Popen([sys.executable, str(SCRIPT), ",".join(methods), str(devices), str(tmp / str(devices))],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for devices, methods in ((1, [*METHODS, "grpo_spg"]), (2, [*METHODS, "grpo_sampled", "grpo_spg"]))
    }
    for devices, proc in launches.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{devices} process(es): {err[-3000:]}"
    return tmp


def result(runs: Path, devices: int, method: str) -> dict:
    return json.loads((runs / str(devices) / f"{method}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ddp_two_processes_match_one(method, runs):
    one, two = result(runs, 1, method), result(runs, 2, method)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 2  # PPO: one entry per rollout
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    for step, metrics in enumerate(one["metrics"]):  # every logged metric is the global one
        for name, value in metrics.items():
            assert two["metrics"][step][name] == pytest.approx(value, abs=1e-5, rel=1e-5), name
    for name, w in one["weights"].items():
        if "vision_tower" in name and name.endswith("k_proj.bias"):
            continue  # softmax ignores a key bias: its gradient is rounding noise, which Adam scales up to a full step
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(w), atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_ddp_sampled_generation_finishes_when_ranks_decode_different_lengths(runs):
    """Each rank samples its own completions (different lengths, different stopping steps); HF
    generation needs no collective, and the reward gathers have fixed shapes, so nothing waits."""
    two = result(runs, 2, "grpo_sampled")
    assert len(two["losses"]) == 2 and "train/reward" in two["metrics"][-1]


@pytest.mark.slow
def test_ddp_one_generation_per_optimizer_step_matches_one_process(runs):
    """steps_per_generation=2 (from accumulate_grad_batches=2): each rank shuffles and slices its own
    rows, so a micro-batch's loss differs from one process's, but each optimizer step sees the same
    generation batch with dapo's global token count: the per-step sums and the weights are equal. The
    forward shares the prompt of a slice's same-prompt rows, wherever the shuffle put them (shared_prompt_forward)."""
    one, two = result(runs, 1, "grpo_spg"), result(runs, 2, "grpo_spg")
    assert len(one["losses"]) == len(two["losses"]) == 4  # two optimizer steps of two micro-batches
    pairs = [sum(r["losses"][i : i + 2]) for r in (one, two) for i in (0, 2)]
    torch.testing.assert_close(torch.tensor(pairs[2:]), torch.tensor(pairs[:2]), atol=1e-5, rtol=1e-5)
    for name, w in one["weights"].items():
        if "vision_tower" in name and name.endswith("k_proj.bias"):
            continue  # softmax ignores a key bias: its gradient is rounding noise, which Adam scales up to a full step
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(w), atol=1e-5, rtol=1e-4, msg=name)
