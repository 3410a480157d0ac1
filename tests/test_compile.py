"""``torch_compile``: each transformer layer of the policy compiled on its own.

It must change nothing but the cost: the eager loss, gradients and checkpoint keys, whatever the batch
layout, and generation run eagerly (a KV cache and one-token steps would recompile every layer).
"""

import os
import subprocess
import sys
import zlib

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters
from torch.testing import assert_close

from lit_align import DPO, GRPO, SFT, PreferenceDataModule, PromptOnlyDataModule
from lit_align.models.compile import compile_layers
from lit_align.rollout.engines import generation_mode
from tests.test_online import DATA, fit
from tests.test_sft import batch_of


def loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_step(module, want_module, batch) -> None:
    """A training step of ``module`` gives ``want_module``'s loss and gradients, to fp32 rounding."""
    loss, grads = loss_and_grads(module, batch)
    want_loss, want = loss_and_grads(want_module, batch)
    assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want.keys() and len(want) > 0
    for name in want:
        assert_close(grads[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def assert_dpo_trains_as_without(flag: str, check_reference) -> None:
    """Two SGD steps of DPO with ``flag`` on give the metrics and weights of the run with it off
    (``check_reference(ref_model, on)`` looks at the frozen reference). SGD: Adam would turn the
    rounding noise of the first step into steps of its lr."""
    runs = []
    for on in (False, True):
        L.seed_everything(0, verbose=False)
        module = DPO(optimizer=lambda params: torch.optim.SGD(params, lr=1.0), **{flag: on})
        _, record = fit(module, PreferenceDataModule("builtin:arithmetic?size=16", batch_size=8, seed=3), steps=2)
        check_reference(module.ref_model, on)
        runs.append((record.metrics, module.model.state_dict()))
    (want_metrics, want_state), (metrics, state) = runs
    for got, want in zip(metrics, want_metrics, strict=True):
        for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert want_metrics[-1]["train/rewards/margins"] != 0.0  # the first step moved the policy
    for name, value in want_state.items():
        assert_close(state[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_layers_give_the_eager_loss_gradients_and_checkpoint(tokenizer):
    eager, compiled = SFT(), SFT(torch_compile=True)
    eager.configure_model()
    compiled.configure_model()
    compiled.model.load_state_dict(eager.model.state_dict())
    layers = [m for m in compiled.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(layers) == compiled.model.config.num_hidden_layers
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    counters.clear()
    for layout in ("padded", "padding_free"):  # a new shape and a new mask: recompiled, still equal
        assert_same_step(compiled, eager, batch_of(tokenizer, layout))
    assert counters["stats"]["unique_graphs"] > 0  # the layers did run compiled


@pytest.mark.parametrize("kwargs", [
    {"gradient_checkpointing": True},
    {"peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, "gradient_checkpointing": True},
], ids=["checkpointing", "lora_checkpointing"])
def test_compiled_layers_compose_with_checkpointing_and_lora(tokenizer, kwargs):
    """Compiled layers under activation checkpointing, with LoRA adapters inside: the eager loss and
    gradients. (With ``lora_dropout`` > 0 the compiled dropout draws other masks than eager's.)"""
    eager, compiled = SFT(**kwargs), SFT(torch_compile=True, **kwargs)
    eager.configure_model()
    compiled.configure_model()
    compiled.model.load_state_dict(eager.model.state_dict())
    assert_same_step(compiled, eager, batch_of(tokenizer, "padded"))


def test_generation_runs_the_compiled_layers_eagerly():
    module = SFT(torch_compile=True)
    module.configure_model()
    prompt = torch.tensor([[5, 6, 7, 8]])
    counters.clear()
    with generation_mode(module.model):
        out = module.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 0
    eager = SFT()
    eager.configure_model()
    with torch.no_grad():
        want = eager.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.tolist() == want.tolist()


def checksum_reward(completions, **kwargs) -> list[float]:
    """Varied within a group (the untrained model is never right on arithmetic): advantages not zero."""
    return [zlib.crc32(str(c).encode()) % 1000 / 1000 for c in completions]


def test_grpo_with_compiled_layers_samples_and_learns_as_eager():
    """The same seed gives the same rollouts (generation is eager) and the same update (to rounding).
    SGD: Adam would turn the rounding noise of the first step's zero KL gradient into steps of its lr."""
    runs = []
    for torch_compile in (False, True):
        L.seed_everything(0, verbose=False)
        module = GRPO(reward_funcs=[checksum_reward], num_generations=4, max_completion_length=8, beta=0.04,
                      optimizer=lambda params: torch.optim.SGD(params, lr=1.0), torch_compile=torch_compile)
        _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=2)
        runs.append((record.metrics, module.model.state_dict()))
    (eager_metrics, eager_state), (metrics, state) = runs
    for got, want in zip(metrics, eager_metrics, strict=True):
        assert got["train/completions/mean_length"] == want["train/completions/mean_length"]
        assert got["train/reward"] == want["train/reward"]
        for key in ("train/loss", "train/kl", "train/entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert eager_metrics[-1]["train/kl"] > 1e-4  # the first step moved the policy
    for name, value in eager_state.items():
        assert_close(state[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_dpo_compiles_its_reference_too_and_trains_as_eager():
    def check_reference(ref_model, on):
        compiled = [m for m in ref_model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(compiled) == (ref_model.config.num_hidden_layers if on else 0)

    assert_dpo_trains_as_without("torch_compile", check_reference)


def test_a_model_without_transformer_layers_is_refused():
    with pytest.raises(ValueError, match="Linear has no transformer layers to compile.*torch_compile: false"):
        compile_layers(torch.nn.Linear(2, 2))


CACHED_LAYER = """
import torch
from lit_align import SFT
from lit_align.models.compile import compile_layers
torch.manual_seed(0)
module = SFT()
module.configure_model()
decoder = module.model.get_decoder()
x = torch.randn(2, 7, module.model.config.hidden_size)
rotary = decoder.rotary_emb(x, torch.arange(7)[None].expand(2, 7))
want = decoder.layers[0](x, position_embeddings=rotary, attention_mask=None)
compile_layers(module.model)
got = decoder.layers[0](x, position_embeddings=rotary, attention_mask=None)
torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
print("ok", torch._inductor.config.cpp.simdlen)
"""


def test_a_layer_compiled_at_one_vector_width_is_not_reloaded_at_another(tmp_path):
    """Inductor's on-disk cache does not key on the vector width ``ATEN_CPU_CAPABILITY`` picks: AVX-512
    code reloaded under ``avx2`` gave NaN (and the other way round, heap corruption). ``compile_layers``
    writes the width into inductor's config, which the cache does key on. Two processes share one cache."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    widths = {isa.bit_width() for isa in valid_vec_isa_list()}
    if not {256, 512} <= widths:
        pytest.skip("needs a CPU with both AVX2 and AVX-512 (two vector widths to cross)")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    for capability, width in (("avx512", "512"), ("avx2", "256")):
        proc = subprocess.run([sys.executable, "-c", CACHED_LAYER], env={**env, "ATEN_CPU_CAPABILITY": capability},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.split()[-2:] == ["ok", width], (capability, proc.stderr[-2000:])
