"""``lit-align fit`` against a ``lit-align serve`` process: two trainer ranks share one server, and
a server that dies stops the run with an error naming it, within its timeout.
(``configs/grpo_server.yaml`` as shipped runs in ``tests/test_cli.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lit_align.rollout.server import free_port, launch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_server.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}



def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health/", timeout=10) as r:
        return json.loads(r.read())


def fit(url: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lit_align.cli", "fit", f"--config={CONFIG}", "--trainer.enable_progress_bar=false",
         "--trainer.logger=false", "--trainer.limit_val_batches=0", f"--model.init_args.vllm_server_base_url={url}",
         f"--model.init_args.vllm_group_port={free_port()}", *args],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_two_trainer_ranks_share_one_server(tmp_path):
    server, url = launch(["--model", "builtin:tiny-sft", "--host", "127.0.0.1", "--port", "0"], env=ENV, timeout=120)
    try:
        proc = fit(url, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=2",
                   "--data.init_args.batch_size=32", cwd=tmp_path)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert health(url)["weights_version"] == 2  # rank 0 pushed before each of the two rollouts, once each
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_dead_server_stops_the_run_with_a_clear_error(tmp_path):
    server, url = launch(["--model", "builtin:tiny-sft", "--host", "127.0.0.1", "--port", "0"], env=ENV, timeout=120)
    proc = fit(url, "--trainer.max_steps=500", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while health(url)["weights_version"] < 2:  # training, with weights pushed
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() else "slow"
            time.sleep(0.2)
        server.kill()
        server.wait(timeout=30)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.monotonic() - killed < 60
        assert f"the generation server at {url} stopped answering" in err, err[-3000:]
    finally:
        server.kill()
        proc.kill()


@pytest.mark.slow
def test_tool_turns_through_the_server(tmp_path):
    """configs/grpo_tools.yaml with its rollouts on a ``lit-align serve`` process: the server generates
    every turn (the first and each continuation after a tool result), the calculator runs in the trainer."""
    server, url = launch(["--model", "builtin:tiny-tools", "--host", "127.0.0.1", "--port", "0"], env=ENV, timeout=120)
    config = CONFIG.with_name("grpo_tools.yaml")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lit_align.cli", "fit", f"--config={config}", "--trainer.enable_progress_bar=false",
             "--trainer.limit_val_batches=0", "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
             "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir=logs",
             "--model.init_args.use_vllm=true", "--model.init_args.vllm_mode=server",
             f"--model.init_args.vllm_server_base_url={url}", f"--model.init_args.vllm_group_port={free_port()}"],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert health(url)["weights_version"] == 3
    finally:
        server.kill()
        server.wait(timeout=30)
    (metrics,) = tmp_path.glob("logs/*/version_*/metrics.csv")
    import csv

    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/tools/call_frequency")]
    calls = [float(r["train/tools/call_frequency"]) for r in rows]
    assert len(calls) == 3 and sum(calls) > 0, calls  # the policy called the calculator, and the calls were answered
    assert all(float(r["train/tools/failure_frequency"]) <= 0.5 for r in rows)
