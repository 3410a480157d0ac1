"""``lit-align serve`` and :class:`ServerEngine`: the protocol end to end, two real processes on CPU.

The server is a ``lit-align serve --model builtin:tiny`` subprocess (HF engine); the trainer's
side runs in the test process. Greedy completions through the server are compared with the
in-process :class:`HFEngine` on the same weights, before and after a weight sync.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from lit_align.models.builtin import builtin_config, builtin_model, builtin_tokenizer
from lit_align.rollout.engines import HFEngine, SamplingParams
from lit_align.rollout.server import free_port, launch
from lit_align.rollout.server_engine import ServerEngine
from lit_align.rollout.weight_sync import parameter_fingerprint, plan_buckets

os.environ["HF_HUB_OFFLINE"] = "1"

PROMPTS = ["12+7=", "3*4-5=", "hello"]
GREEDY = SamplingParams(max_completion_length=12, temperature=0.0, num_generations=1)



def start_server() -> tuple[subprocess.Popen, str]:
    """A ``lit-align serve`` process on a free port, and its URL once it printed its ready line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return launch(["--model", "builtin:tiny", "--host", "127.0.0.1", "--port", "0", "--dtype", "float32"], env=env, timeout=120)


@pytest.fixture(scope="module")
def server():
    process, url = start_server()
    yield url
    process.kill()
    process.wait(timeout=30)


@pytest.fixture
def tok():
    return builtin_tokenizer()


def left_padded(tok, prompts=PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def engine_for(url: str, tok, **kwargs) -> ServerEngine:
    return ServerEngine(base_url=url, tokenizer=tok, group_port=free_port(), connection_timeout=30.0, **kwargs)


def test_plan_buckets_group_dtypes_and_cap():
    dtypes = ["float32", "bfloat16", "float32", "float32"]
    shapes = [[4, 4], [3], [2, 2], [100]]  # 64, 6, 16, 400 bytes
    assert plan_buckets(dtypes, shapes, 1 << 20) == [("float32", [0, 2, 3]), ("bfloat16", [1])]
    assert plan_buckets(dtypes, shapes, 100) == [("float32", [0, 2]), ("float32", [3]), ("bfloat16", [1])]


def test_fingerprint_depends_on_names_and_shapes_not_order():
    a = parameter_fingerprint([("w", [2, 3]), ("b", [3])])
    assert a == parameter_fingerprint([("b", (3,)), ("w", torch.Size([2, 3]))])
    assert a["fingerprint"] != parameter_fingerprint([("w", [3, 2]), ("b", [3])])["fingerprint"]
    assert (a["num_parameters"], a["num_values"]) == (2, 9)


@pytest.mark.slow
def test_generate_matches_the_in_process_engine(server, tok):
    engine = engine_for(server, tok)
    model = builtin_model()
    ids, mask = left_padded(tok)
    sampled = engine.generate(model, ids, mask, SamplingParams(max_completion_length=8, temperature=1.0, num_generations=3))
    n, width = len(PROMPTS) * 3, sampled.completion_ids.size(1)
    assert sampled.completion_ids.shape == sampled.completion_mask.shape == sampled.sampling_logps.shape == (n, width)
    assert width <= 8 and sampled.prompt_ids.shape == (n, ids.size(1))
    assert torch.equal(sampled.prompt_ids[::3], ids) and torch.equal(sampled.prompt_mask[1::3], mask)
    real = sampled.completion_mask.bool()
    assert (sampled.completion_ids[~real] == tok.pad_token_id).all()
    assert torch.isfinite(sampled.sampling_logps[real]).all() and (sampled.sampling_logps[real] <= 0).all()
    assert (sampled.sampling_logps[~real] == 0).all()
    assert torch.equal(sampled.is_truncated, ~(sampled.completion_ids == tok.eos_token_id).any(1))

    served = engine.generate(model, ids, mask, GREEDY)
    local = HFEngine(tok).generate(model, ids, mask, GREEDY)
    assert torch.equal(served.completion_ids, local.completion_ids)
    assert torch.equal(served.completion_mask, local.completion_mask)
    if local.sampling_logps is not None:
        torch.testing.assert_close(served.sampling_logps, local.sampling_logps, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_weight_sync_reaches_the_server(server, tok):
    engine = engine_for(server, tok)
    policy = builtin_model()
    ids, mask = left_padded(tok)
    before = engine.generate(policy, ids, mask, GREEDY).completion_ids
    version = engine._request("GET", "/health/")["weights_version"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    try:
        engine.sync_weights(policy)
        assert engine._request("GET", "/health/")["weights_version"] == version + 1
        served = engine.generate(policy, ids, mask, GREEDY).completion_ids
        assert torch.equal(served, HFEngine(tok).generate(policy, ids, mask, GREEDY).completion_ids)
        assert not torch.equal(served, before)
    finally:  # the group is reused, and the shared server gets its weights back
        engine.sync_weights(builtin_model())
        assert engine._request("GET", "/health/")["weights_version"] == version + 2
        engine.close()
    assert torch.equal(engine.generate(policy, ids, mask, GREEDY).completion_ids, before)


@pytest.mark.slow
def test_a_policy_of_another_shape_is_refused(server, tok):
    config = builtin_config()
    config.intermediate_size *= 2
    with torch.random.fork_rng():
        other = LlamaForCausalLM(config)
    engine = engine_for(server, tok)
    with pytest.raises(ValueError, match=rf"the server at {server} serves builtin:tiny with \d+ parameters") as info:
        engine.sync_weights(other)
    assert "mlp.up_proj.weight" in str(info.value) and "in the policy" in str(info.value)


@pytest.mark.slow
def test_a_bad_request_reports_the_servers_message(server, tok):
    engine = engine_for(server, tok, structured_outputs_regex=r"\d+")
    ids, mask = left_padded(tok)
    with pytest.raises(ValueError, match=f"the generation server at {server} refused .*needs the vLLM engine"):
        engine.generate(builtin_model(), ids, mask, GREEDY)


def test_no_server_times_out_with_a_clear_error(tok):
    engine = pickle.loads(pickle.dumps(ServerEngine(port=free_port(), host="127.0.0.1", tokenizer=tok, connection_timeout=1.0)))
    ids, mask = left_padded(tok)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="no generation server answered at http://127.0.0.1:.* within 1s; start one"):
        engine.generate(builtin_model(), ids, mask, GREEDY)
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_a_server_that_dies_fails_fast(tok):
    process, url = start_server()
    try:
        engine = engine_for(url, tok)
        model = builtin_model()
        ids, mask = left_padded(tok)
        assert len(engine.generate(model, ids, mask, GREEDY)) == len(PROMPTS)
    finally:
        process.kill()
        process.wait(timeout=30)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"the generation server at {url} stopped answering"):
        engine.generate(model, ids, mask, GREEDY)
    with pytest.raises(RuntimeError, match=f"the generation server at {url} stopped answering"):
        engine.sync_weights(model)
    assert time.monotonic() - start < 15


@pytest.mark.slow
def test_serve_refuses_vllm_where_it_cannot_run():
    run = subprocess.run([sys.executable, "-m", "lit_align.cli", "serve", "--model", "builtin:tiny", "--engine", "vllm"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2
    assert "error: lit-align serve: --engine vllm needs vLLM installed and a CUDA GPU" in run.stderr
