"""DPO-family losses (lit_align.losses.dpo): hand-derived values for every loss type, f-divergence,
label smoothing, loss combinations, WPO/LD-DPO helpers against loops, config rules, and parity with
TRL 1.16's own ``DPOTrainer._compute_loss`` run on crafted per-token log-probs."""

from __future__ import annotations

import math
import types
import warnings
from collections import defaultdict

import pytest
import torch

from lit_align.losses.dpo import (
    DPO_LOSSES,
    F_DIVERGENCE_LOSS_TYPES,
    DPOLossConfig,
    DPOLossType,
    PairLogps,
    check_dpo_config,
    dpo_loss,
    f_divergence_scores,
)
from lit_align.ops.preference import ld_weights, positions_in_sequence, wpo_weights

BETA, EPS, TAU = 0.5, 0.1, 0.05
# Two pairs: log-ratios cl = [0.5, -1.0], rl = [-1.0, 0.5]
CHOSEN, REJECTED = [-3.0, -5.0], [-4.0, -4.5]
REF_CHOSEN, REF_REJECTED = [-3.5, -4.0], [-3.0, -5.0]
LEN_C, LEN_R = [2.0, 4.0], [3.0, 1.0]
SFT_MEAN = -1.2  # mean chosen token log-prob


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pairs(**overrides) -> PairLogps:
    t = torch.tensor
    fields = dict(
        chosen=t(CHOSEN),
        rejected=t(REJECTED),
        ref_chosen=t(REF_CHOSEN),
        ref_rejected=t(REF_REJECTED),
        chosen_len=t(LEN_C),
        rejected_len=t(LEN_R),
        chosen_token_logps_mean=t(SFT_MEAN),
    )
    return PairLogps(**{**fields, **overrides})


# f'(t) at t = pi/pi_ref = e^u, the f-DPO score of a log-ratio u
SCORES = {
    "reverse_kl": lambda u: u,
    "forward_kl": lambda u: 1 - 1 / math.exp(u),
    "js_divergence": lambda u: math.log(2 * math.exp(u) / (math.exp(u) + 1)),
    "alpha_divergence": lambda u: (math.exp(u) ** (0.5 - 1) - 1) / (0.5 - 1),  # alpha = 0.5
}

# Per-pair loss from (cl, rl, cs, rs, len_c, len_r), written from the papers; b = BETA, eps = EPS
PER_PAIR = {
    "sigmoid": lambda cl, rl, cs, rs, lc, lr: -logsig(BETA * (cs - rs)),
    "hinge": lambda cl, rl, cs, rs, lc, lr: max(0.0, 1 - BETA * (cs - rs)),
    "ipo": lambda cl, rl, cs, rs, lc, lr: (cs / lc - rs / lr - 1 / (2 * BETA)) ** 2,
    "exo_pair": lambda cl, rl, cs, rs, lc, lr: (
        sig(BETA * (cs - rs)) * math.log(sig(BETA * (cs - rs)) / (1 - EPS))
        + sig(-BETA * (cs - rs)) * math.log(sig(-BETA * (cs - rs)) / EPS)
    ),
    "nca_pair": lambda cl, rl, cs, rs, lc, lr: (
        -logsig(BETA * cl) - 0.5 * logsig(-BETA * cl) - 0.5 * logsig(-BETA * rl)
    ),
    "robust": lambda cl, rl, cs, rs, lc, lr: (
        ((1 - EPS) * -logsig(BETA * (cs - rs)) - EPS * -logsig(-BETA * (cs - rs))) / (1 - 2 * EPS)
    ),
    "bco_pair": lambda cl, rl, cs, rs, lc, lr: -logsig(BETA * cl) - logsig(-BETA * rl),
    "sppo_hard": lambda cl, rl, cs, rs, lc, lr: (cl - 1 / (2 * BETA)) ** 2 + (rl + 1 / (2 * BETA)) ** 2,
    "apo_zero": lambda cl, rl, cs, rs, lc, lr: (1 - sig(BETA * cl)) + sig(BETA * rl),
    "apo_down": lambda cl, rl, cs, rs, lc, lr: sig(BETA * cl) + (1 - sig(BETA * (cl - rl))),
    "discopop": lambda cl, rl, cs, rs, lc, lr: (
        (1 - sig(BETA * (cs - rs) / TAU)) * math.log1p(math.exp(-BETA * (cs - rs)))
        + sig(BETA * (cs - rs) / TAU) * math.exp(-BETA * (cs - rs))
    ),
    "sft": lambda cl, rl, cs, rs, lc, lr: -SFT_MEAN,
    "sigmoid_norm": lambda cl, rl, cs, rs, lc, lr: -logsig(BETA * (cs / lc - rs / lr)),
}


def expected_loss(loss_type: str, f_div: str = "reverse_kl") -> float:
    losses = []
    for i in range(2):
        cl, rl = CHOSEN[i] - REF_CHOSEN[i], REJECTED[i] - REF_REJECTED[i]
        cs, rs = SCORES[f_div](cl), SCORES[f_div](rl)
        losses.append(PER_PAIR[loss_type](cl, rl, cs, rs, LEN_C[i], LEN_R[i]))
    return sum(losses) / len(losses)


def run(loss_type, **kwargs) -> tuple[torch.Tensor, dict]:
    kwargs = {"beta": BETA, "label_smoothing": EPS, "discopop_tau": TAU, **kwargs}
    return dpo_loss(kwargs.pop("pairs", None) or pairs(), DPOLossConfig(loss_type, **kwargs))


@pytest.mark.parametrize("loss_type", sorted(PER_PAIR))
def test_every_loss_type_by_hand(loss_type):
    loss, _ = run(loss_type)
    assert loss.item() == pytest.approx(expected_loss(loss_type), rel=1e-5)


@pytest.mark.parametrize("f_div", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_f_divergence_losses_by_hand(loss_type, f_div):
    loss, metrics = run(loss_type, f_divergence_type=f_div, f_alpha_divergence_coef=0.5)
    assert loss.item() == pytest.approx(expected_loss(loss_type, f_div), rel=1e-5)
    # rewards are beta * log-ratio whatever the f-divergence
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * (0.5 - 1.0) / 2)


def test_f_divergence_scores():
    u = torch.tensor([-2.0, 0.0, 0.7])
    for name, score in SCORES.items():
        expected = torch.tensor([score(x) for x in u.tolist()])
        torch.testing.assert_close(f_divergence_scores(u, name, 0.5), expected)
    # alpha = 1 is the reverse-KL limit; the exponent is clamped at 80 (fp32) and 11 (fp16)
    torch.testing.assert_close(f_divergence_scores(u, "alpha_divergence", 1.0), u)
    big = f_divergence_scores(torch.tensor([100.0]), "alpha_divergence", 2.0)
    assert big.item() == pytest.approx(math.exp(80) - 1, rel=1e-6)
    half = f_divergence_scores(torch.tensor([100.0], dtype=torch.float16), "alpha_divergence", 2.0)
    assert half.dtype == torch.float16 and half.item() == pytest.approx(math.exp(11) - 1, rel=1e-3)
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        f_divergence_scores(u, "kl", 0.5)


def test_label_smoothing_zero_reduces_robust_to_sigmoid():
    assert run("robust", label_smoothing=0.0)[0].item() == pytest.approx(expected_loss("sigmoid"), rel=1e-6)


def test_aot_sorts_the_batch():
    t = torch.tensor
    # logp_c - logp_r = [1, -2, 0.5], ref_c - ref_r = [0.3, 0.8, -1]; cl = [0.5, -1, 0], rl = [-0.2, 1.8, -1.5]
    p = PairLogps(
        chosen=t([-1.0, -4.0, -2.0]),
        rejected=t([-2.0, -2.0, -2.5]),
        ref_chosen=t([-1.5, -3.0, -2.0]),
        ref_rejected=t([-1.8, -3.8, -1.0]),
        chosen_len=t([1.0, 1.0, 1.0]),
        rejected_len=t([1.0, 1.0, 1.0]),
    )

    def smoothed(deltas):
        return sum(-(1 - EPS) * logsig(BETA * x) - EPS * logsig(-BETA * x) for x in deltas) / len(deltas)

    # aot: sorted([1, -2, .5]) - sorted([.3, .8, -1]) = [-2, .5, 1] - [-1, .3, .8]
    aot, _ = run("aot", pairs=p)
    assert aot.item() == pytest.approx(smoothed([-1.0, 0.2, 0.2]), rel=1e-5)
    # aot_unpaired: sorted(cl) - sorted(rl) = [-1, 0, .5] - [-1.5, -.2, 1.8]
    unpaired, _ = run("aot_unpaired", pairs=p)
    assert unpaired.item() == pytest.approx(smoothed([0.5, 0.2, -1.3]), rel=1e-5)
    # unsorted the value differs; sorted it is invariant to permuting pairs (and, unpaired, to
    # permuting the rejected sequences alone)
    unsorted = smoothed([1 - 0.3, -2 - 0.8, 0.5 + 1])
    assert abs(aot.item() - unsorted) > 1e-3
    perm = t([2, 0, 1])
    fields = ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_len", "rejected_len")
    permuted = PairLogps(**{k: getattr(p, k)[perm] for k in fields})
    assert run("aot", pairs=permuted)[0].item() == pytest.approx(aot.item(), rel=1e-6)
    rejected_only = PairLogps(
        **{k: getattr(p, k)[perm] if "rejected" in k else getattr(p, k) for k in fields}
    )
    assert run("aot_unpaired", pairs=rejected_only)[0].item() == pytest.approx(unpaired.item(), rel=1e-6)


def test_weighted_combinations():
    rpo, _ = run(["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert rpo.item() == pytest.approx(expected_loss("sigmoid") + 0.5 * -SFT_MEAN, rel=1e-6)
    mpo, _ = run(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    expected = 0.8 * expected_loss("sigmoid") + 0.2 * expected_loss("bco_pair") + 1.0 * -SFT_MEAN
    assert mpo.item() == pytest.approx(expected, rel=1e-6)
    unweighted, _ = run(["sigmoid", "hinge"])  # None: all weights 1
    assert unweighted.item() == pytest.approx(expected_loss("sigmoid") + expected_loss("hinge"), rel=1e-6)
    assert run("sigmoid")[0].item() == run(["sigmoid"])[0].item()


def test_metrics_by_hand():
    p = pairs(
        chosen=torch.tensor([-3.0, -5.0, -1.0]),
        rejected=torch.tensor([-4.0, -4.5, -1.0]),
        ref_chosen=torch.tensor([-3.5, -4.0, -1.2]),
        ref_rejected=torch.tensor([-3.0, -5.0, -1.2]),
        chosen_len=torch.ones(3),
        rejected_len=torch.ones(3),
    )
    # cl = [.5, -1, .2], rl = [-1, .5, .2]: the tie in pair 3 is not a win
    _, m = run("sigmoid", pairs=p)
    assert m["rewards/chosen"].item() == pytest.approx(BETA * (0.5 - 1.0 + 0.2) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(BETA * (-1.0 + 0.5 + 0.2) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)
    assert m["rewards/margins"].item() == pytest.approx(BETA * (1.5 - 1.5 + 0.0) / 3)
    assert m["logps/chosen"].item() == pytest.approx(-3.0)
    assert m["logps/rejected"].item() == pytest.approx(-9.5 / 3)
    assert not any(v.requires_grad for v in m.values())


def test_sft_needs_token_mean():
    with pytest.raises(ValueError, match="chosen_token_logps_mean"):
        run("sft", pairs=pairs(chosen_token_logps_mean=None))


def test_wpo_weights_against_loop_and_in_loss():
    gen = torch.Generator().manual_seed(0)
    num_seq = 6
    seq = torch.randint(0, num_seq, (40,), generator=gen)
    seq[:num_seq] = torch.arange(num_seq)  # every sequence has a token
    logps = -torch.rand(40, generator=gen) * 3
    lss = -torch.rand(40, generator=gen)
    w = wpo_weights(logps.requires_grad_(), lss, seq, num_seq)
    assert w.shape == (3,) and not w.requires_grad
    seq_w = []
    for s in range(num_seq):
        sel = [i for i in range(40) if seq[i] == s]
        seq_w.append(math.exp(sum(logps[i].item() - lss[i].item() for i in sel) / len(sel)))
    for i in range(3):
        assert w[i].item() == pytest.approx(seq_w[i] * seq_w[i + 3], rel=1e-5)

    weights = torch.tensor([0.5, 2.0])
    for loss_type in ("sigmoid", "hinge", "sft"):  # TRL's in-place *= breaks hinge's backward and sft
        chosen = torch.tensor(CHOSEN, requires_grad=True)
        sft_mean = torch.tensor(SFT_MEAN, requires_grad=True)
        p = pairs(chosen=chosen, chosen_token_logps_mean=sft_mean, wpo_weight=weights)
        loss, _ = run(loss_type, pairs=p)
        cl, rl = [0.5, -1.0], [-1.0, 0.5]
        per_pair = [PER_PAIR[loss_type](cl[i], rl[i], cl[i], rl[i], LEN_C[i], LEN_R[i]) for i in range(2)]
        assert loss.item() == pytest.approx((0.5 * per_pair[0] + 2.0 * per_pair[1]) / 2, rel=1e-6)
        loss.backward()


def test_positions_and_ld_weights_against_loop():
    gen = torch.Generator().manual_seed(1)
    num_seq, n, alpha = 8, 60, 0.3
    seq = torch.randint(0, num_seq, (n,), generator=gen)  # interleaved, not contiguous
    pos = positions_in_sequence(seq, num_seq)
    w = ld_weights(seq, num_seq, alpha)
    lengths = [int((seq == s).sum()) for s in range(num_seq)]
    seen = [0] * num_seq
    for i, s in enumerate(seq.tolist()):
        seen[s] += 1
        assert pos[i].item() == seen[s]
        pair = s % (num_seq // 2)
        shared = min(lengths[pair], lengths[pair + num_seq // 2])
        assert w[i].item() == pytest.approx(1.0 if seen[s] <= shared else alpha)
    assert torch.equal(ld_weights(seq, num_seq, 1.0), torch.ones(n))


def test_gradcheck_fp64():
    # alpha-divergence in fp64 stays fp64 (TRL casts through fp32 there; fp64 only matters for checks)
    for loss_type, f_div in (
        ("sigmoid", "alpha_divergence"),
        ("ipo", "js_divergence"),
        ("nca_pair", "reverse_kl"),
    ):

        def fn(c, r, lt=loss_type, fd=f_div):
            p = pairs(
                chosen=c,
                rejected=r,
                chosen_len=torch.tensor(LEN_C, dtype=torch.float64),
                rejected_len=torch.tensor(LEN_R, dtype=torch.float64),
                ref_chosen=torch.tensor(REF_CHOSEN, dtype=torch.float64),
                ref_rejected=torch.tensor(REF_REJECTED, dtype=torch.float64),
            )
            return run(lt, pairs=p, f_divergence_type=fd)[0]

        c = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
        r = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(fn, (c, r))


def test_config_rules():
    check_dpo_config(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    with pytest.raises(ValueError, match=r"unknown DPO loss_type \['dpo'\].*'sigmoid'"):
        check_dpo_config(["sigmoid", "dpo"])
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        run("kto_pair")
    with pytest.raises(ValueError, match="got 2 weights for 3 loss types"):
        check_dpo_config(["sigmoid", "bco_pair", "sft"], [0.8, 0.2])
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        check_dpo_config("sigmoid", f_divergence_type="kl")
    with pytest.raises(ValueError, match=r"f_divergence_type='forward_kl' is only supported.*'nca_pair'"):
        check_dpo_config(["sigmoid", "nca_pair"], f_divergence_type="forward_kl")
    check_dpo_config(["nca_pair"], f_divergence_type="reverse_kl")
    with pytest.raises(ValueError, match="use_weighting .* 'aot'"):
        check_dpo_config(["sigmoid", "aot_unpaired"], use_weighting=True)
    with pytest.raises(ValueError, match="greater than 0.0 for the 'exo_pair' loss"):
        check_dpo_config("exo_pair", label_smoothing=0.0)
    with pytest.warns(UserWarning, match=r"\[0.0, 0.5\) for the 'robust' loss"):
        check_dpo_config("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0.0, 1.0\]"):
        check_dpo_config("sigmoid", ld_alpha=1.5)
    check_dpo_config("sigmoid", ld_alpha=0.0)


# --- parity with TRL 1.16: DPOTrainer._compute_loss itself, on a fake self and a fake fused-head model ---


class _FakeDPO:
    """The attributes ``DPOTrainer._compute_loss`` reads, reference log-probs precomputed."""

    def __init__(
        self, loss_type, loss_weights, beta, label_smoothing, f_div, f_alpha, ld_alpha, use_weighting
    ):
        self.model = types.SimpleNamespace(training=True)
        self.accelerator = types.SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        )
        self.args = types.SimpleNamespace(discopop_tau=TAU, gradient_checkpointing_kwargs=None)
        self.loss_types, self.loss_weights = loss_type, loss_weights or [1.0] * len(loss_type)
        self.beta, self.label_smoothing, self.ld_alpha, self.use_weighting = (
            beta,
            label_smoothing,
            ld_alpha,
            use_weighting,
        )
        self.f_divergence_type, self.f_alpha_divergence_coef = f_div, f_alpha
        self.precompute_ref_logps, self.aux_loss_enabled, self.ref_model = True, False, None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens, self._tp_size = 0, 1


def _crafted_batch(num_pairs=4, seed=0):
    """Right-padded rows [prompt | completion | pad] and fused-head outputs (zero off the completion)."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = 2 * num_pairs, 12
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for s in range(rows):
        prompt = int(torch.randint(1, 4, (), generator=gen))
        completion = int(torch.randint(1, 8, (), generator=gen))
        completion_mask[s, prompt : prompt + completion] = 1
    target = completion_mask[:, 1:].bool()  # (2E, T-1)
    logps = (-torch.rand(rows, width - 1, generator=gen) * 2 * target).requires_grad_()
    lss = -torch.rand(rows, width - 1, generator=gen) * target
    ref = -torch.rand(rows, generator=gen) * 8
    return completion_mask, target, logps, lss, ref


def _trl_dpo(config, completion_mask, logps, lss, ref):
    from trl.trainer.dpo_trainer import DPOTrainer

    fake = _FakeDPO(**config)
    rows = completion_mask.size(0)
    outputs = types.SimpleNamespace(
        log_probs=logps,
        log_sum_sq_probs=lss,
        entropy=torch.zeros_like(lss),
        mean_logits=torch.zeros_like(lss),
        is_top1=torch.zeros_like(lss, dtype=torch.bool),
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[: rows // 2],
        "ref_rejected_logps": ref[rows // 2 :],
    }
    loss = DPOTrainer._compute_loss(fake, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def _ours(config, completion_mask, target, logps, lss, ref):
    rows = target.size(0)
    seq = torch.arange(rows).unsqueeze(1).expand_as(target)[target]  # (n,) sequence of each target
    token_logps = logps[target]  # (n,)
    weighted = (
        token_logps if config["ld_alpha"] is None else token_logps * ld_weights(seq, rows, config["ld_alpha"])
    )
    sums = weighted.new_zeros(rows).index_add(0, seq, weighted)  # (2E,)
    lengths = completion_mask.sum(1).float()  # TRL's ipo/sigmoid_norm count (unshifted)
    e = rows // 2
    p = PairLogps(
        sums[:e],
        sums[e:],
        ref[:e],
        ref[e:],
        lengths[:e],
        lengths[e:],
        chosen_token_logps_mean=token_logps[seq < e].mean(),
        wpo_weight=wpo_weights(token_logps, lss[target], seq, rows) if config["use_weighting"] else None,
    )
    return dpo_loss(p, DPOLossConfig(
        config["loss_type"], config["loss_weights"], config["beta"], config["label_smoothing"], config["f_div"],
        config["f_alpha"], TAU, config["use_weighting"],
    ))


def _parity_cases():
    base = dict(
        loss_weights=None,
        beta=0.3,
        label_smoothing=0.0,
        f_div="reverse_kl",
        f_alpha=0.5,
        ld_alpha=None,
        use_weighting=False,
    )
    for name in DPO_LOSSES:
        yield dict(
            base,
            loss_type=[name],
            label_smoothing=0.2 if name in {"exo_pair", "robust", "aot", "aot_unpaired"} else 0.0,
        )
    for f_div, f_alpha in (
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.3),
        ("alpha_divergence", 1.0),
    ):
        for name in sorted(F_DIVERGENCE_LOSS_TYPES):
            yield dict(base, loss_type=[name], f_div=f_div, f_alpha=f_alpha, label_smoothing=0.1)
    for name in ("sigmoid", "ipo", "sft", "aot", "sigmoid_norm"):
        yield dict(base, loss_type=[name], ld_alpha=0.4)
    for name in sorted(set(DPO_LOSSES) - {"aot", "aot_unpaired", "sft"}):  # TRL's WPO raises for sft
        yield dict(base, loss_type=[name], use_weighting=True, label_smoothing=0.1, ld_alpha=0.5)
    yield dict(base, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], ld_alpha=0.7)
    yield dict(base, loss_type=["sigmoid", "sft"], f_div="js_divergence")


def test_parity_with_trl_compute_loss():
    pytest.importorskip("trl")
    batch = _crafted_batch()
    completion_mask, target, logps, lss, ref = batch
    for config in _parity_cases():
        theirs, their_metrics = _trl_dpo(config, completion_mask, logps, lss, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, metrics = _ours(config, *batch)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=lambda m, c=config: f"{c}: {m}")
        for key, value in metrics.items():
            assert value.item() == pytest.approx(their_metrics[key], rel=1e-6, abs=1e-6), (config, key)
        if not (config["use_weighting"] and "hinge" in config["loss_type"]):  # TRL's in-place *= breaks it
            # only targets: TRL's fused head zeros (and cuts the gradient of) every other position
            their_grad = torch.autograd.grad(theirs, logps)[0]
            our_grad = torch.autograd.grad(ours, logps)[0]
            torch.testing.assert_close(
                our_grad[target],
                their_grad[target],
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, c=config: f"{c}: {m}",
            )


def test_dpo_variant_names_have_one_source():
    """The loss_type Literal (what the CLI and docs offer) and DPO_LOSSES (what runs) agree, and the
    settings are checked once, when the frozen config is built."""
    from typing import get_args

    assert set(get_args(DPOLossType)) == set(DPO_LOSSES)
    cfg = DPOLossConfig(["sigmoid", "sft"], [1.0, 0.5])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 0.5)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        DPOLossConfig("dpo")
