"""Reference-free losses (lit_align.losses.odds): CPO/SimPO/AlphaPO and ORPO by hand, and parity with
TRL 1.16's ``CPOTrainer``/``ORPOTrainer.get_batch_loss_metrics`` run on a fake self and fixed logits
(which also pins down which tokens TRL averages and which its NLL term covers)."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

from lit_align.losses.odds import CPOLossConfig, cpo_loss, log1mexp, orpo_loss

BETA, EPS, GAMMA = 0.5, 0.1, 0.5
# Two pairs: sums, lengths, and the per-token averages they give
CHOSEN, LEN_C = [-2.0, -6.0], [2.0, 3.0]  # averages [-1, -2]
REJECTED, LEN_R = [-4.5, -1.5], [3.0, 1.0]  # averages [-1.5, -1.5]
NLL = 1.6  # -(-2 - 6) / (2 + 3): token mean over the chosen completions


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def tensors():
    t = torch.tensor
    return t(CHOSEN), t(REJECTED), t(LEN_C), t(LEN_R)


def mean(xs):
    return sum(xs) / len(xs)


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(BETA * z) - eps * logsig(-BETA * z)


def averages():
    return [c / n for c, n in zip(CHOSEN, LEN_C)], [r / n for r, n in zip(REJECTED, LEN_R)]


def test_cpo_sigmoid_and_hinge_on_sums():
    z = [c - r for c, r in zip(CHOSEN, REJECTED)]  # [1.5, -4.5]
    loss, m = cpo_loss(*tensors(), cfg=CPOLossConfig(loss_type="sigmoid", beta=BETA, label_smoothing=EPS))
    assert loss.item() == pytest.approx(mean([smoothed(x, EPS) for x in z]) + NLL, rel=1e-6)
    assert m["nll_loss"].item() == pytest.approx(NLL)
    assert m["logps/chosen"].item() == pytest.approx(mean(CHOSEN))
    assert m["rewards/chosen"].item() == pytest.approx(BETA * mean(CHOSEN))
    assert m["rewards/rejected"].item() == pytest.approx(BETA * mean(REJECTED))
    assert m["rewards/margins"].item() == pytest.approx(BETA * mean(z))
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    loss, _ = cpo_loss(*tensors(), cfg=CPOLossConfig(loss_type="hinge", beta=BETA, label_smoothing=EPS, cpo_alpha=0.5))
    assert loss.item() == pytest.approx(mean([max(0.0, 1 - BETA * x) for x in z]) + 0.5 * NLL, rel=1e-6)


def test_cpo_ipo_and_simpo_average_per_token():
    chosen, rejected = averages()
    z = [c - r for c, r in zip(chosen, rejected)]  # [0.5, -0.5]
    loss, m = cpo_loss(*tensors(), cfg=CPOLossConfig(loss_type="ipo", beta=BETA))
    assert loss.item() == pytest.approx(mean([(x - 1 / (2 * BETA)) ** 2 for x in z]) + NLL, rel=1e-6)
    assert m["logps/chosen"].item() == pytest.approx(mean(chosen))
    assert m["rewards/rejected"].item() == pytest.approx(BETA * mean(rejected))
    assert m["nll_loss"].item() == pytest.approx(NLL)  # the NLL stays a token mean, not a mean of means
    loss, _ = cpo_loss(*tensors(), cfg=CPOLossConfig(loss_type="simpo", beta=BETA, label_smoothing=EPS, simpo_gamma=GAMMA))
    assert loss.item() == pytest.approx(mean([smoothed(x - GAMMA / BETA, EPS) for x in z]) + NLL, rel=1e-6)


def test_alphapo_reward_shape_and_sugar():
    alpha = 0.25
    chosen, rejected = averages()

    def reward(logp):  # r = (1 - p^-alpha) / alpha
        return (1 - math.exp(logp) ** -alpha) / alpha

    z = [reward(c) - reward(r) for c, r in zip(chosen, rejected)]
    # "alphapo" = SimPO on the shaped rewards, without the NLL term (cpo_alpha forced to 0)
    loss, m = cpo_loss(*tensors(), cfg=CPOLossConfig(loss_type="alphapo", beta=BETA, simpo_gamma=GAMMA, alpha=alpha, cpo_alpha=1.0))
    assert loss.item() == pytest.approx(mean([smoothed(x - GAMMA / BETA, 0.0) for x in z]), rel=1e-6)
    assert m["nll_loss"].item() == 0.0
    assert m["rewards/chosen"].item() == pytest.approx(BETA * mean([reward(c) for c in chosen]), rel=1e-6)
    assert m["logps/chosen"].item() == pytest.approx(mean(chosen))  # logps are not shaped
    # alpha also shapes the other loss types, on summed log-probs there
    z_sum = [reward(c) - reward(r) for c, r in zip(CHOSEN, REJECTED)]
    loss, _ = cpo_loss(*tensors(), cfg=CPOLossConfig(loss_type="sigmoid", beta=BETA, alpha=alpha, cpo_alpha=0.0))
    assert loss.item() == pytest.approx(mean([smoothed(x, 0.0) for x in z_sum]), rel=1e-6)


def test_cpo_explicit_nll_and_errors():
    loss, m = cpo_loss(*tensors(), torch.tensor(0.7), cfg=CPOLossConfig(beta=BETA))
    z = [c - r for c, r in zip(CHOSEN, REJECTED)]
    assert loss.item() == pytest.approx(mean([smoothed(x, 0.0) for x in z]) + 0.7, rel=1e-6)
    assert m["nll_loss"].item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r"unknown CPO loss_type 'kto_pair'.*'alphapo'"):
        cpo_loss(*tensors(), cfg=CPOLossConfig(loss_type="kto_pair"))


def test_orpo_by_hand():
    chosen, rejected = averages()

    def log_odds(logp):  # log(p / (1 - p))
        p = math.exp(logp)
        return math.log(p / (1 - p))

    lo = [log_odds(c) - log_odds(r) for c, r in zip(chosen, rejected)]
    nll = torch.tensor(2.5)  # over prompt + completion tokens: an input, not derivable here
    loss, m = orpo_loss(*tensors(), nll, beta=BETA)
    assert loss.item() == pytest.approx(2.5 - BETA * mean([logsig(x) for x in lo]), rel=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(mean([logsig(x) for x in lo]), rel=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(mean(lo), rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(BETA * mean(chosen))
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["logps/rejected"].item() == pytest.approx(mean(rejected))
    assert m["nll_loss"].item() == pytest.approx(2.5)
    assert not any(v.requires_grad for v in m.values())
    # bf16 inputs: the odds ratio runs in fp32
    bf16 = [x.bfloat16() for x in tensors()]
    loss16, _ = orpo_loss(*bf16, nll, beta=BETA)
    assert loss16.dtype == torch.float32


def test_log1mexp():
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected)


# --- parity with TRL 1.16: get_batch_loss_metrics on a fake self whose model returns fixed logits ---

VOCAB, PAD = 11, 0


def _batch(num_pairs=3, seed=0):
    """Right-padded chosen (width 7) and rejected (width 9) rows, labels masking the prompt, and logits."""
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for side, width in (("chosen", 7), ("rejected", 9)):
        ids = torch.randint(1, VOCAB, (num_pairs, width), generator=gen)
        attention = torch.zeros(num_pairs, width, dtype=torch.long)
        labels = torch.full((num_pairs, width), -100)
        for i in range(num_pairs):
            prompt = int(torch.randint(1, 4, (), generator=gen))
            total = prompt + int(torch.randint(1, width - prompt + 1, (), generator=gen))
            attention[i, :total] = 1
            labels[i, prompt:total] = ids[i, prompt:total]
        batch |= {
            f"{side}_input_ids": ids.masked_fill(attention == 0, PAD),
            f"{side}_attention_mask": attention,
        }
        batch[f"{side}_labels"] = labels
    logits = torch.randn(2 * num_pairs, 9, VOCAB, generator=gen).requires_grad_()
    return batch, logits


def _fake(trainer_cls, logits, **attrs):
    methods = ("concatenated_forward", "get_batch_loss_metrics", "cpo_loss", "odds_ratio_loss")
    namespace = {name: getattr(trainer_cls, name) for name in methods if hasattr(trainer_cls, name)}
    namespace |= {
        name: staticmethod(getattr(trainer_cls, name)) for name in ("concatenated_inputs", "get_batch_logps")
    }
    fake = type("Fake" + trainer_cls.__name__, (), namespace)()
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    defaults = dict(accelerator=accelerator, is_encoder_decoder=False, aux_loss_enabled=False)
    for key, value in {**defaults, **attrs}.items():
        setattr(fake, key, value)
    model = lambda input_ids, **kwargs: types.SimpleNamespace(logits=logits)  # noqa: E731
    return fake, model


def _token_logps(batch, logits, key):
    """Per-sequence sum and count of log p over the tokens ``key`` selects, from the shared logits."""
    width = logits.size(1)
    rows = []
    for side in ("chosen", "rejected"):
        x = batch[f"{side}_{key}"] if key == "labels" else batch[f"{side}_input_ids"]
        if key != "labels":
            x = x.masked_fill(batch[f"{side}_attention_mask"] == 0, -100)
        rows.append(torch.nn.functional.pad(x, (0, width - x.size(1)), value=-100))
    labels = torch.cat(rows)[:, 1:]  # (2E, T-1)
    mask = labels != -100
    logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(1), mask.sum(1).float()


def _compare(loss, metrics, their_loss, their_metrics, logits, what):
    torch.testing.assert_close(loss, their_loss, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
    for key, value in metrics.items():
        assert value.item() == pytest.approx(float(their_metrics[key]), rel=1e-6, abs=1e-6), (what, key)
    ours = torch.autograd.grad(loss, logits, retain_graph=True)[0]  # the sums are shared by all cases
    theirs = torch.autograd.grad(their_loss, logits)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _import_experimental():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    return CPOTrainer, ORPOTrainer


CPO_CASES = [
    dict(loss_type="sigmoid", label_smoothing=0.0, cpo_alpha=1.0, alpha=0.0),
    dict(loss_type="sigmoid", label_smoothing=0.2, cpo_alpha=0.5, alpha=0.0),
    dict(loss_type="sigmoid", label_smoothing=0.0, cpo_alpha=0.0, alpha=0.0),
    dict(loss_type="hinge", label_smoothing=0.0, cpo_alpha=1.0, alpha=0.0),
    dict(loss_type="ipo", label_smoothing=0.0, cpo_alpha=1.0, alpha=0.0),
    dict(loss_type="simpo", label_smoothing=0.1, cpo_alpha=1.0, alpha=0.0),
    dict(loss_type="simpo", label_smoothing=0.0, cpo_alpha=0.0, alpha=0.3),
    dict(loss_type="sigmoid", label_smoothing=0.0, cpo_alpha=1.0, alpha=0.05),
    dict(loss_type="alphapo", label_smoothing=0.0, cpo_alpha=1.0, alpha=0.5),
]


def test_parity_with_trl_cpo():
    cpo_trainer, _ = _import_experimental()
    batch, logits = _batch()
    sums, lengths = _token_logps(batch, logits, "labels")
    e = sums.size(0) // 2
    for case in CPO_CASES:
        trl_case = dict(case)
        if case["loss_type"] == "alphapo":  # CPOConfig.__post_init__
            trl_case |= dict(loss_type="simpo", cpo_alpha=0.0)
        fake, model = _fake(cpo_trainer, logits, beta=BETA, simpo_gamma=GAMMA, pad_token_id=PAD, **trl_case)
        their_loss, their_metrics = fake.get_batch_loss_metrics(model, batch)
        loss, metrics = cpo_loss(sums[:e], sums[e:], lengths[:e], lengths[e:], cfg=CPOLossConfig(beta=BETA, simpo_gamma=GAMMA, **case))
        _compare(loss, metrics, their_loss, their_metrics, logits, case)


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_parity_with_trl_orpo(beta):
    _, orpo_trainer = _import_experimental()
    batch, logits = _batch(seed=1)
    sums, lengths = _token_logps(batch, logits, "labels")
    full_sums, full_lengths = _token_logps(batch, logits, "attention_mask")  # prompt + completion
    e = sums.size(0) // 2
    fake, model = _fake(orpo_trainer, logits, beta=beta, padding_value=PAD)
    their_loss, their_metrics = fake.get_batch_loss_metrics(model, batch)
    nll = -full_sums[:e].sum() / full_lengths[:e].sum()
    loss, metrics = orpo_loss(sums[:e], sums[e:], lengths[:e], lengths[e:], nll, beta=beta)
    _compare(loss, metrics, their_loss, their_metrics, logits, f"orpo beta={beta}")
    # the completion-only NLL would not match: TRL's ORPO NLL covers the prompt
    completion_nll = -sums[:e].sum() / lengths[:e].sum()
    assert abs(completion_nll.item() - their_metrics["nll_loss"]) > 1e-3


def test_cpo_loss_names_come_from_one_source():
    """The type's names are the registry's plus TRL's ``alphapo`` shorthand, stored as SimPO
    without the NLL term."""
    from typing import get_args

    from lit_align.losses.odds import CPO_LOSSES, CPOLossType

    assert set(get_args(CPOLossType)) == {*CPO_LOSSES, "alphapo"}
    cfg = CPOLossConfig(loss_type="alphapo", cpo_alpha=1.0)
    assert (cfg.loss_type, cfg.cpo_alpha) == ("simpo", 0.0)
