"""``onednn_linear``: the linear layers' fp32 CPU products on oneDNN instead of MKL.

It must change nothing but the speed: the products and their gradients to fp32 rounding, the loss and
gradients of a training step, the parameters and checkpoint keys, under ``torch_compile``, with LoRA, and
generation; other dtypes keep ``F.linear``.
"""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lit_align import SFT
from lit_align.models import onednn
from lit_align.models.onednn import OneDNNLinear, use_onednn_linear
from lit_align.ops.distill import LMHead, chunked_generalized_jsd
from lit_align.ops.forward import lm_head_params
from lit_align.ops.logprobs import selected_logprobs
from lit_align.ops.onednn import onednn_available, onednn_matmul
from lit_align.rollout.engines import generation_mode
from tests.test_compile import assert_dpo_trains_as_without, assert_same_step
from tests.test_sft import batch_of

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5)], ids=["2d", "3d"])
def test_the_layer_and_its_gradients_are_f_linear_to_rounding(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(5, 4, bias=bias)
    layer = nn.Linear(5, 4, bias=bias)
    layer.load_state_dict(plain.state_dict())
    assert use_onednn_linear(layer) == 1 and type(layer) is OneDNNLinear
    x = torch.randn(*shape, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    out, want = layer(x), plain(x_plain)
    assert_close(out, want, atol=1e-6, rtol=1e-5)
    grad = torch.randn(*want.shape).transpose(0, -1).contiguous().transpose(0, -1)  # a strided upstream grad
    out.backward(grad)
    want.backward(grad)
    assert_close(x.grad, x_plain.grad, atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), plain.parameters(), strict=True):
        assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_op_against_float64_and_torch_check():
    """The op against float64 (fp32 accuracy, not bf16's), and torch's own check of a custom op's
    registrations (fake tensor, autograd, schema)."""
    torch.manual_seed(0)
    a, w = torch.randn(64, 256), torch.randn(32, 256)
    exact = a.double() @ w.double().t()
    assert (onednn_matmul(a, w).double() - exact).abs().max() < 1e-3  # bf16 products would be off by ~0.5
    torch.library.opcheck(onednn_matmul, (a.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("bias", [False, True])
def test_the_chunked_head_on_onednn_gives_its_mkl_values_and_gradients(bias, monkeypatch):
    """``selected_logprobs(onednn=True)`` (a OneDNNLinear LM head): log-probs, entropies and the gradients
    of hidden, weight and bias as on MKL, over two chunks and an ignored label; then GKD's chunked JSD."""
    from lit_align.ops import logprobs

    calls = []
    monkeypatch.setattr(logprobs, "onednn_kernel", lambda a, w: calls.append(a.shape) or onednn.onednn_kernel(a, w))
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 16), torch.randn(50, 16) * 0.3
    b = torch.randn(50) if bias else None
    labels = torch.randint(0, 50, (10,))
    labels[3] = -100
    results = []
    for on in (False, True):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, *([b] if bias else []))]
        stats = selected_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None, chunk_size=4,
                                  softcap=5.0, onednn=on)
        (stats.logps.sum() + 0.1 * stats.entropy.sum()).backward()
        results.append([stats.logps, stats.entropy, *[t.grad for t in leaves]])
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want, atol=1e-5, rtol=1e-5)
    # on: forward, recompute and input gradient of each of the 3 chunks (the first two hold 4 rows)
    assert len(calls) == 9 and calls[0] == (4, 16)
    calls.clear()
    jsd = []
    for on in (False, True):
        h = hidden.clone().requires_grad_()
        out = chunked_generalized_jsd(h, hidden.flip(0), LMHead(weight, onednn=on), LMHead(weight * 0.5, onednn=on),
                                      chunk_size=4)
        out.sum().backward()
        jsd.append((out.detach(), h.grad))
    assert_close(jsd[1], jsd[0], atol=1e-6, rtol=1e-5)
    assert calls  # GKD's heads went through the same products


def test_a_onednn_model_tells_the_chunked_head():
    model = SFT(onednn_linear=True)
    model.configure_model()
    assert lm_head_params(model.model)["onednn"] is True
    plain = SFT()
    plain.configure_model()
    assert lm_head_params(plain.model)["onednn"] is False


def test_other_dtypes_keep_f_linear(monkeypatch):
    layer = nn.Linear(5, 4).to(torch.bfloat16)
    use_onednn_linear(layer)
    monkeypatch.setattr(onednn, "onednn_matmul", lambda *a: pytest.fail("bf16 went to oneDNN"))
    monkeypatch.setattr(onednn, "onednn_kernel", lambda *a: pytest.fail("bf16 went to oneDNN"))
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer = nn.Linear(5, 4)  # fp32 weights under CPU autocast (bf16-mixed): autocast's bf16 product
    use_onednn_linear(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = layer(x.float()), nn.functional.linear(x.float(), layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


@pytest.mark.parametrize("kwargs", [{}, {"torch_compile": True},
                                    {"peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}],
                         ids=["eager", "compiled", "lora"])
def test_a_training_step_gives_the_mkl_loss_gradients_and_checkpoint(tokenizer, kwargs):
    plain, fast = SFT(**kwargs), SFT(onednn_linear=True, **kwargs)
    plain.configure_model()
    fast.configure_model()
    fast.model.load_state_dict(plain.model.state_dict())
    assert any(type(m) is OneDNNLinear for m in fast.model.modules())
    assert not any(type(m) is OneDNNLinear for m in plain.model.modules())
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    assert_same_step(fast, plain, batch_of(tokenizer, "padded"))


def test_generation_is_unchanged():
    plain, fast = SFT(), SFT(onednn_linear=True)
    plain.configure_model()
    fast.configure_model()
    fast.model.load_state_dict(plain.model.state_dict())
    prompt = torch.tensor([[5, 6, 7, 8]])
    outs = []
    for module in (plain, fast):
        with generation_mode(module.model):
            outs.append(module.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                              do_sample=False).tolist())
    assert outs[0] == outs[1]


def test_dpo_with_its_reference_trains_as_with_mkl():
    """Two SGD steps of DPO (policy and reference on oneDNN) against MKL: metrics and weights to rounding."""
    def check_reference(ref_model, on):
        assert any(type(m) is OneDNNLinear for m in ref_model.modules()) == on

    assert_dpo_trains_as_without("onednn_linear", check_reference)


def test_refused_by_name_without_onednn(monkeypatch):
    monkeypatch.setattr("lit_align.methods.base.onednn_available", lambda: False)
    with pytest.raises(ValueError, match="onednn_linear=True: this torch build has no oneDNN"):
        SFT(onednn_linear=True)
