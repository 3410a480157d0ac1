"""Tests for lit_align.ops.logprobs: chunked selected-token log-probs against the naive full-logits path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_align.ops.logprobs import TokenStats, naive_selected_logprobs, selected_logprobs

N, H, V = 13, 8, 37
IGNORE = -100


def _inputs(
    dtype: torch.dtype = torch.float32, seed: int = 0, n: int = N, bias: bool = True, n_ignored: int = 3
) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[:n_ignored]] = IGNORE
    return {"hidden": hidden, "weight": weight, "bias": b, "labels": labels}


def _run(fn, inp: dict, **kw) -> tuple[TokenStats, list[torch.Tensor | None]]:
    """Call ``fn``, backprop a fixed random weighting of the logps, return stats and input grads."""
    params = [inp["hidden"], inp["weight"], inp["bias"]]
    for p in params:
        if p is not None:
            p.grad = None
    stats = fn(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"], **kw)
    upstream = torch.linspace(-1.0, 2.0, stats.logps.numel()).view_as(stats.logps)
    (stats.logps * upstream).sum().backward()
    return stats, [p.grad.clone() if p is not None and p.grad is not None else None for p in params]


def _assert_match(kw: dict, dtype: torch.dtype = torch.float32, atol: float = 1e-5, **inp_kw) -> None:
    inp = _inputs(dtype, **inp_kw)
    got, got_grads = _run(selected_logprobs, inp, **kw)
    ref, ref_grads = _run(naive_selected_logprobs, inp, **{k: v for k, v in kw.items() if k != "chunk_size"})
    assert got.logps.dtype == torch.float32 and got.logps.shape == inp["labels"].shape
    torch.testing.assert_close(got.logps, ref.logps, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=atol, rtol=1e-5)
    assert torch.equal(got.correct, ref.correct)
    assert got.entropy.requires_grad and not got.correct.requires_grad and got.correct.dtype == torch.bool
    for g, r in zip(got_grads, ref_grads, strict=True):
        if r is None:
            assert g is None
        else:
            assert g.dtype == r.dtype
            torch.testing.assert_close(g, r, atol=atol, rtol=1e-4)


def _log_softmax_by_hand(z: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in z))
    return [v - lse for v in z]


# --- the reference itself ------------------------------------------------------------------------------


def test_naive_matches_hand_computed_log_softmax() -> None:
    hidden = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [4.0, 0.0, 0.0]])
    weight = torch.eye(3)  # logits == hidden
    labels = torch.tensor([0, 2, IGNORE])
    stats = naive_selected_logprobs(hidden, weight, labels)

    row0, row1 = _log_softmax_by_hand([1.0, 2.0, 3.0]), _log_softmax_by_hand([0.5, -1.0, 0.0])
    assert stats.logps.tolist() == pytest.approx([row0[0], row1[2], 0.0], abs=1e-6)
    ent0 = -sum(math.exp(lp) * lp for lp in row0)
    ent1 = -sum(math.exp(lp) * lp for lp in row1)
    assert stats.entropy.tolist() == pytest.approx([ent0, ent1, 0.0], abs=1e-6)
    assert stats.correct.tolist() == [False, False, False]  # argmaxes are 2, 0, (ignored)
    assert naive_selected_logprobs(hidden, weight, torch.tensor([2, 0, 0])).correct.tolist() == [True] * 3


def test_naive_matches_hand_computed_transforms() -> None:
    hidden = torch.tensor([[1.0, 2.0, 3.0]])
    labels = torch.tensor([1])
    scale, cap, temp = 2.0, 3.0, 0.5
    stats = naive_selected_logprobs(
        hidden, torch.eye(3), labels, logit_scale=scale, softcap=cap, temperature=temp
    )
    z = [cap * math.tanh(v * scale / cap) / temp for v in (1.0, 2.0, 3.0)]  # scale -> cap -> /T
    assert stats.logps.item() == pytest.approx(_log_softmax_by_hand(z)[1], abs=1e-6)


# --- chunked vs naive, fp32 ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 5, N, 1024])  # 4 and 5 do not divide 13; 1024 > N
@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_fp32(chunk_size: int, bias: bool) -> None:
    _assert_match({"chunk_size": chunk_size}, bias=bias)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.7},
        {"temperature": 1.9},
        {"logit_scale": 1.7},
        {"softcap": 1.5},
        {"logit_scale": 0.8, "softcap": 2.0, "temperature": 0.6},
    ],
    ids=["temp0.7", "temp1.9", "scale", "softcap", "all"],
)
def test_transforms_match_naive(kw: dict) -> None:
    _assert_match({"chunk_size": 4, **kw})


def test_chunk_with_only_ignored_labels_is_skipped_correctly() -> None:
    """A whole chunk of ignored rows (skipped in backward) next to normal chunks still matches naive."""
    inp = _inputs(n_ignored=0)
    inp["labels"][4:8] = IGNORE  # chunk 1 of 4 rows is entirely ignored
    got, got_grads = _run(selected_logprobs, inp, chunk_size=4)
    ref, ref_grads = _run(naive_selected_logprobs, inp)
    torch.testing.assert_close(got.logps, ref.logps, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_grads[0][4:8], torch.zeros(4, H))
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_custom_ignore_index_that_is_a_valid_class() -> None:
    """ignore_index need not be negative; rows carrying it are ignored, other rows are untouched."""
    inp = _inputs(n_ignored=0)
    inp["labels"][:4] = 5
    kw = {"ignore_index": 5}
    got, got_grads = _run(selected_logprobs, inp, chunk_size=3, **kw)
    ref, ref_grads = _run(naive_selected_logprobs, inp, **kw)
    assert (got.logps[inp["labels"] == 5] == 0).all()
    torch.testing.assert_close(got.logps, ref.logps, atol=1e-5, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_leading_dims_are_flattened_and_restored() -> None:
    inp = _inputs(n=12)
    hidden3d = inp["hidden"].detach().view(3, 4, H).requires_grad_()
    stats = selected_logprobs(
        hidden3d, inp["weight"], inp["labels"].view(3, 4), bias=inp["bias"], chunk_size=5
    )
    ref = naive_selected_logprobs(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"])
    assert stats.logps.shape == stats.entropy.shape == stats.correct.shape == (3, 4)
    torch.testing.assert_close(stats.logps.flatten(), ref.logps, atol=1e-5, rtol=1e-5)
    stats.logps.sum().backward()
    assert hidden3d.grad.shape == (3, 4, H)


def test_optional_outputs_can_be_skipped() -> None:
    inp = _inputs()
    stats = selected_logprobs(
        inp["hidden"], inp["weight"], inp["labels"], with_entropy=False, with_accuracy=False, chunk_size=4
    )
    assert stats.entropy is None and stats.correct is None
    stats.logps.sum().backward()
    assert inp["hidden"].grad is not None and inp["weight"].grad is not None


# --- low precision -------------------------------------------------------------------------------------


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32_reference(dtype: torch.dtype) -> None:
    low = _inputs(dtype, n=64)
    got, got_grads = _run(selected_logprobs, low, chunk_size=24)
    assert got.logps.dtype == torch.float32
    assert [g.dtype for g in got_grads] == [dtype] * 3
    # fp32 reference from the very same (rounded) low-precision values, upcast
    ref_inp = {
        k: (v.detach().float().requires_grad_() if v is not None and v.is_floating_point() else v)
        for k, v in low.items()
    }
    ref, ref_grads = _run(naive_selected_logprobs, ref_inp)
    torch.testing.assert_close(got.logps, ref.logps, atol=2e-2, rtol=0)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=2e-2, rtol=0)
    assert (got.correct == ref.correct).float().mean() > 0.95  # near-ties may flip in low precision
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert _cosine(g, r) > 0.999
    # and against the naive path run in the same dtype (same lm_head matmul precision)
    same, same_grads = _run(naive_selected_logprobs, low)
    torch.testing.assert_close(got.logps, same.logps, atol=1e-2, rtol=0)
    for g, r in zip(got_grads, same_grads, strict=True):
        assert _cosine(g, r) > 0.999


def test_autocast_matches_naive_and_keeps_fp32_master_grads() -> None:
    """Under autocast (Lightning bf16-mixed) the matmul runs in bf16 like lm_head would; grads stay fp32."""
    inp = _inputs(n=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _run(selected_logprobs, inp, chunk_size=7)
        ref, ref_grads = _run(naive_selected_logprobs, inp)
    assert got.logps.dtype == torch.float32
    assert [g.dtype for g in got_grads] == [torch.float32] * 3
    torch.testing.assert_close(got.logps, ref.logps, atol=1e-2, rtol=0)
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert _cosine(g, r) > 0.999


# --- edge cases ----------------------------------------------------------------------------------------


def test_all_labels_ignored_gives_zeros_and_zero_grads() -> None:
    inp = _inputs(n_ignored=N)
    stats, grads = _run(selected_logprobs, inp, chunk_size=4)
    assert torch.equal(stats.logps, torch.zeros(N))
    assert torch.equal(stats.entropy, torch.zeros(N))
    assert not stats.correct.any()
    for g in grads:
        assert g is not None and torch.equal(g, torch.zeros_like(g))


def test_frozen_weight_gives_hidden_grad_only() -> None:
    inp = _inputs(bias=False)
    inp["weight"].requires_grad_(False)
    got, (gh, gw, _) = _run(selected_logprobs, inp, chunk_size=4)
    ref, (rh, _, _) = _run(naive_selected_logprobs, inp)
    assert gw is None and inp["weight"].grad is None
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-4)


def test_frozen_hidden_gives_weight_grad_only() -> None:
    inp = _inputs()
    inp["hidden"].requires_grad_(False)
    _, (gh, gw, gb) = _run(selected_logprobs, inp, chunk_size=4)
    _, (_, rw, rb) = _run(naive_selected_logprobs, inp)
    assert gh is None
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb, rb, atol=1e-5, rtol=1e-4)


def test_no_nan_grad_from_ignored_rows_with_nan_upstream() -> None:
    """An upstream NaN on an ignored row (e.g. 0 * inf in a loss mask) must not leak into the grads."""
    inp = _inputs()
    stats = selected_logprobs(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"], chunk_size=4)
    ignored = inp["labels"] == IGNORE
    upstream = torch.where(ignored, torch.full((N,), float("nan")), torch.ones(N))
    stats.logps.backward(upstream)
    assert torch.isfinite(inp["weight"].grad).all() and torch.isfinite(inp["hidden"].grad).all()
    assert torch.equal(inp["hidden"].grad[ignored], torch.zeros_like(inp["hidden"].grad[ignored]))


def test_bad_arguments_raise() -> None:
    inp = _inputs()
    h, w, y = inp["hidden"], inp["weight"], inp["labels"]
    with pytest.raises(ValueError):
        selected_logprobs(h, w, y[:-1])
    with pytest.raises(ValueError):
        selected_logprobs(h, w[:, :-1], y)
    with pytest.raises(ValueError):
        selected_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError):
        selected_logprobs(h, w, y, chunk_size=0)
    with pytest.raises(TypeError):
        selected_logprobs(h, w.detach().double(), y)


# --- memory: nothing [N, V]-sized is kept for backward ------------------------------------------------


def _max_saved_numel(fn, inp: dict, **kw) -> int:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = fn(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"], **kw)
    stats.logps.sum().backward()  # the unpack hook path still works
    return max(sizes)


def test_no_saved_tensor_of_size_n_times_v() -> None:
    n = 64  # N * V = 2368 > V * H = 296 (the weight), so only a logits-sized tensor can trip the check
    inp = _inputs(n=n)
    kw = {"softcap": 2.0, "temperature": 0.8, "logit_scale": 1.1}
    assert _max_saved_numel(naive_selected_logprobs, inp, **kw) >= n * V  # the check can see logits
    assert _max_saved_numel(selected_logprobs, inp, chunk_size=16, **kw) < n * V


@pytest.mark.parametrize("chunk_size, products", [(N, 1), (5, 3 + 3)])  # 13 rows: one chunk, or three each way
def test_one_chunk_keeps_its_logits_for_the_backward(monkeypatch, chunk_size: int, products: int) -> None:
    """Where one chunk holds every row, the backward uses the forward's logits (one head product, not
    two); a second backward (``retain_graph``) recomputes them and gives the same gradients."""
    from lit_align.ops import logprobs

    calls = []
    real = logprobs._LogitTransform.logits
    monkeypatch.setattr(logprobs._LogitTransform, "logits", lambda self, *a: calls.append(1) or real(self, *a))
    inp = _inputs(n_ignored=0)
    stats = selected_logprobs(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"], chunk_size=chunk_size,
                              softcap=2.0, temperature=0.8)
    loss = (stats.logps * torch.linspace(-1.0, 2.0, N)).sum() + stats.entropy.sum()
    params = [inp["hidden"], inp["weight"], inp["bias"]]
    first = torch.autograd.grad(loss, params, retain_graph=True)
    assert len(calls) == products
    second = torch.autograd.grad(loss, params)
    naive = naive_selected_logprobs(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"], softcap=2.0,
                                    temperature=0.8)
    expected = torch.autograd.grad((naive.logps * torch.linspace(-1.0, 2.0, N)).sum() + naive.entropy.sum(), params)
    for a, b, e in zip(first, second, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, a)


# --- gradcheck -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [{}, {"logit_scale": 1.3, "softcap": 1.5, "temperature": 0.7}], ids=["plain", "transforms"]
)
def test_gradcheck_float64(kw: dict) -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, IGNORE, 3, 3])

    def f(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return selected_logprobs(h, w, labels, bias=b, chunk_size=2, **kw).logps

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw", [{}, {"logit_scale": 1.3, "softcap": 1.5, "temperature": 0.7}], ids=["plain", "transforms"]
)
def test_gradcheck_entropy_float64(kw: dict) -> None:
    """The entropy is differentiable (GRPO's entropy bonus), alone and with the log-probs."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, IGNORE, 3, 3])

    def entropy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return selected_logprobs(h, w, labels, bias=b, chunk_size=2, **kw).entropy

    def both(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        stats = selected_logprobs(h, w, labels, bias=b, chunk_size=2, **kw)
        return stats.logps - 0.3 * stats.entropy

    assert torch.autograd.gradcheck(entropy, (hidden, weight, bias), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(both, (hidden, weight, bias), eps=1e-6, atol=1e-6)


def test_entropy_gradient_matches_naive() -> None:
    inp = _inputs()
    grads = []
    for fn in (naive_selected_logprobs, lambda *a, **k: selected_logprobs(*a, chunk_size=4, **k)):
        for p in (inp["hidden"], inp["weight"], inp["bias"]):
            p.grad = None
        stats = fn(inp["hidden"], inp["weight"], inp["labels"], bias=inp["bias"], temperature=0.9)
        (stats.logps.sum() - 0.5 * stats.entropy.sum()).backward()
        grads.append([p.grad.clone() for p in (inp["hidden"], inp["weight"], inp["bias"])])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_extras_match_naive():
    """Mean logit and log sum p^2 (DPO's logits metrics, WPO weights) against the full-logits path."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 6), torch.randn(11, 6)
    labels = torch.tensor([1, 2, -100, 3, 4, 5, 6, -100, 7])
    kw = dict(temperature=0.7, softcap=3.0, with_extras=True)
    chunked = selected_logprobs(hidden, weight, labels, chunk_size=4, **kw)
    naive = naive_selected_logprobs(hidden, weight, labels, **kw)
    torch.testing.assert_close(chunked.mean_logit, naive.mean_logit)
    torch.testing.assert_close(chunked.log_sum_sq_probs, naive.log_sum_sq_probs)
    z = torch.log_softmax(3.0 * torch.tanh(hidden @ weight.T / 3.0) / 0.7, -1)
    assert abs(chunked.log_sum_sq_probs[0].item() - torch.log((z[0].exp() ** 2).sum()).item()) < 1e-5
