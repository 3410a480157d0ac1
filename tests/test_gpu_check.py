"""benchmarks/gpu_check.py --dry-run: the GPU check's code path end to end, on CPU with a tiny model.

The real check (bf16 on CUDA, a Qwen2.5-0.5B-shaped model) needs a GPU machine; this runs the same
runners, timing, FLOP accounting, table and JSON with a 2-layer Qwen2 in fp32, one warm-up and one
timed step per configuration, so a change to lit-align or TRL that breaks the check shows up here.
The TRL side is skipped (and reported as skipped) when trl is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRL = importlib.util.find_spec("trl") is not None


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    configs = ["lit", "trl_fast", "lit_shared"] if HAVE_TRL else ["lit", "lit_shared"]  # trl_default only adds TRL's own checkpointing flag
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--threads", "1",
         "--configs", *configs, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert "| method | config" in proc.stdout  # the results table
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    assert result["peak"]["flops"] > 0
    model = result["model"]
    assert model["tied_embeddings"] and model["flop_params"] == model["params"]
    rows = {(s["method"], s["config"]): s for s in result["summary"]}
    assert set(rows) == {(m, c) for m in ("sft", "dpo", "grpo") for c in configs if c != "lit_shared"} | {("grpo", "lit_shared")}
    for (method, config), s in rows.items():
        assert "skipped" not in s, (method, config, s)
        assert s["steps_per_s"] > 0 and s["tokens_per_s"] > 0
        assert 0 < s["mfu"] < 1, (method, config, s["mfu"])
        assert s["gradient_checkpointing"] is False
    # Same rows on both sides: the token counts agree to within the EOS of a row.
    w = result["workload"]
    sft_tokens = w["batch_size"] * (w["prompt_len"] + 17 + w["completion_len"] + 2)
    assert rows[("sft", "lit")]["tokens_per_step"] == sft_tokens
    grpo_tokens = w["grpo_prompts"] * w["grpo_generations"] * (w["grpo_prompt_len"] + 17 + w["grpo_completion_len"])
    assert rows[("grpo", "lit")]["tokens_per_step"] == rows[("grpo", "lit_shared")]["tokens_per_step"] == grpo_tokens
    if HAVE_TRL:
        for method in ("sft", "dpo", "grpo"):
            lit, trl = rows[(method, "lit")]["tokens_per_step"], rows[(method, "trl_fast")]["tokens_per_step"]
            assert abs(lit - trl) <= w["batch_size"], (method, lit, trl)
