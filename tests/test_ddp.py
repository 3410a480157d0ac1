"""Two-process DDP on CPU (gloo) gives the same losses, metrics and weights as one process on the same
global batch: SFT's global token normalisation, DPO's pair means, KTO's KL estimate (``train/kl``),
BCO's running reward mean (``train/delta``), GRPO's batch-scaled advantages and DAPO token count,
RLOO's normalised advantages, PPO's whitening and GKD's token mean are all computed over both ranks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(method: str, devices: int, out: Path) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), method, str(devices), str(out)], check=True, timeout=600, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "bco", "grpo", "rloo", "ppo", "gkd", "online_dpo"])
def test_ddp_two_processes_match_one(method, tmp_path, monkeypatch):
    if method == "gkd":  # a teacher that differs from the student: builtin:tiny with seeded noise
        from lit_align.models.builtin import builtin_model, builtin_tokenizer

        teacher = builtin_model("builtin:tiny")
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        teacher.save_pretrained(tmp_path / "teacher")
        builtin_tokenizer().save_pretrained(tmp_path / "teacher")
        monkeypatch.setenv("LIT_ALIGN_TEST_TEACHER", str(tmp_path / "teacher"))
    one = run(method, 1, tmp_path / "one.json")
    two = run(method, 2, tmp_path / "two.json")
    assert len(one["losses"]) == len(two["losses"]) == 2  # PPO: one entry per rollout
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    for step, metrics in enumerate(one["metrics"]):  # every logged metric is the global one
        for name, value in metrics.items():
            assert two["metrics"][step][name] == pytest.approx(value, abs=1e-5, rel=1e-5), name
    for name, w in one["weights"].items():
        torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(w), atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_ddp_sampled_generation_finishes_when_ranks_decode_different_lengths(tmp_path):
    """Each rank samples its own completions (different lengths, different stopping steps); HF
    generation needs no collective, and the reward gathers have fixed shapes, so nothing waits."""
    two = run("grpo_sampled", 2, tmp_path / "two.json")
    assert len(two["losses"]) == 2 and "train/reward" in two["metrics"][-1]
