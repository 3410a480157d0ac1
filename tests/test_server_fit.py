"""``lit-align fit`` against a ``lit-align serve`` process: two trainer ranks share one server, and
a server that dies stops the run with an error naming it, within its timeout; a policy sharded over
two processes (FSDP2) pushes its whole weights. (``configs/grpo_server.yaml`` as shipped runs in
``tests/test_cli.py``.)"""

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


@pytest.mark.slow
def test_sharded_policy_pushes_its_whole_weights(tmp_path):
    """GRPO on two FSDP2 processes (``ModelParallelStrategy(data_parallel_size=2)``, tests/sharded_run.py)
    sampled by a ``lit-align serve`` process: before each rollout, and once after the run from outside
    any rollout, rank 0 broadcasts every tensor whole, equal to the policy's weights gathered from the
    shards; the server then samples with the trainer's final weights (its log-probs are theirs, not
    those of the weights it started with)."""
    import torch

    from lit_align.models.builtin import builtin_model, builtin_tokenizer
    from lit_align.rollout.engines import SamplingParams
    from lit_align.rollout.server_engine import ServerEngine

    port = free_port()  # the trainers start beside the server (they wait for it): the two start-ups overlap
    env = {**ENV, "OMP_NUM_THREADS": "1", "LIT_ALIGN_TEST_SERVER": f"http://127.0.0.1:{port}",
           "LIT_ALIGN_TEST_GROUP_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("sharded_run.py")), "grpo_server", "2", str(tmp_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = None
    try:
        server, url = launch(["--model", "builtin:tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"],
                             env=ENV, timeout=120)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert health(url)["weights_version"] == 3  # before each of the two rollouts and after the run, once (rank 0)
        run = torch.load(tmp_path / "grpo_server.pt")
        assert run["world_size"] == 2 and run["sharded"] and len(run["losses"]) == 2
        assert len(run["pushes"]) == len(run["states"]) == 3
        names = {name for name, _ in builtin_model("builtin:tiny").named_parameters()}
        for pushed, state in zip(run["pushes"], run["states"]):
            assert pushed.keys() == names  # every parameter, at its full shape: gathered from the shards
            for name, tensor in pushed.items():
                assert torch.equal(tensor, state[name]), name
        for before, after in zip(run["pushes"], run["pushes"][1:]):  # a training step apart
            assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])

        tok = builtin_tokenizer()
        ids = torch.tensor([tok("12+7=", add_special_tokens=False)["input_ids"]])
        engine = ServerEngine(base_url=url, tokenizer=tok, group_port=free_port(), connection_timeout=30.0)
        policy, start = builtin_model("builtin:tiny"), builtin_model("builtin:tiny")
        policy.load_state_dict(run["states"][-1])
        gens = engine.generate(policy, ids, torch.ones_like(ids), SamplingParams(max_completion_length=8, num_generations=4))

        def logps(model):
            seqs = torch.cat([gens.prompt_ids, gens.completion_ids], 1)
            with torch.no_grad():
                logits = model(input_ids=seqs).logits[:, ids.size(1) - 1 : -1].float()
            return logits.log_softmax(-1).gather(-1, gens.completion_ids[..., None])[..., 0] * gens.completion_mask

        torch.testing.assert_close(gens.sampling_logps, logps(policy), atol=1e-4, rtol=1e-4)
        assert (gens.sampling_logps - logps(start)).abs().max() > 1e-2
    finally:
        proc.kill()
        if server is not None:
            server.kill()
            server.wait(timeout=30)
