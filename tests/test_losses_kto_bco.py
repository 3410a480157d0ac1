"""KTO (lit_align.losses.kto) and BCO (lit_align.losses.bco): hand-derived values for both KTO loss
types, class weights, NaN rows, the KL estimate and metric aggregation; parity with TRL 1.16's own
``KTOTrainer._compute_loss`` on two simulated ranks and with its data preparation (KL rotation,
Eq. 8 weight warning); BCO's loss, UDM weights and classifier against their formulas, and
RunningMoments against a two-pass mean/variance and against TRL 0.29.1's update (transcribed)."""

from __future__ import annotations

import math
import threading
import types
from collections import defaultdict

import pytest
import torch

from lit_align.losses.bco import (
    DensityClassifier,
    RunningMoments,
    batch_moments,
    bco_loss,
    density_ratio_weights,
    fit_density_classifier,
)
from lit_align.losses.kto import (
    UNPAIRED_SUM_KEYS,
    KTOLossConfig,
    check_kto_weights,
    clamp_kl,
    kl_estimate,
    kto_loss,
    rotated_completions,
    unpaired_metric_values,
)

torch.set_num_threads(1)

BETA = 0.5
LOGPS = [-3.0, -5.0, -4.0, -2.5, -6.0]
REF = [-3.5, -4.0, -3.0, -3.0, -5.5]  # log-ratios r = [0.5, -1.0, -1.0, 0.5, -0.5]
LABELS = [True, False, True, False, False]
KL = 0.2


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def kto_inputs():
    return torch.tensor(LOGPS), torch.tensor(REF), torch.tensor(LABELS)


def per_row_kto(loss_type: str, r: float, desirable: bool) -> float:
    if loss_type == "kto":
        return 1 - sig(BETA * (r - KL)) if desirable else 1 - sig(BETA * (KL - r))
    return 1 - sig(BETA * r) if desirable else sig(BETA * r)


# --- KTO by hand ---


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_loss_by_hand(loss_type, weights):
    w_d, w_u = weights
    loss, metrics = kto_loss(*kto_inputs(), torch.tensor(KL), cfg=KTOLossConfig(loss_type=loss_type, beta=BETA, desirable_weight=w_d, undesirable_weight=w_u))
    terms = [
        (w_d if d else w_u) * per_row_kto(loss_type, lp - ref, d) for lp, ref, d in zip(LOGPS, REF, LABELS)
    ]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)  # / rows, not / total weight
    assert metrics["kl"].item() == pytest.approx(KL if loss_type == "kto" else 0.0)

    values = unpaired_metric_values(metrics)
    chosen_r = [BETA * (lp - ref) for lp, ref, d in zip(LOGPS, REF, LABELS) if d]
    rejected_r = [BETA * (lp - ref) for lp, ref, d in zip(LOGPS, REF, LABELS) if not d]
    assert values["rewards/chosen"].item() == pytest.approx(sum(chosen_r) / 2)
    assert values["rewards/rejected"].item() == pytest.approx(sum(rejected_r) / 3)
    assert values["rewards/margins"].item() == pytest.approx(sum(chosen_r) / 2 - sum(rejected_r) / 3)
    assert values["logps/chosen"].item() == pytest.approx((-3.0 - 4.0) / 2)
    assert values["logps/rejected"].item() == pytest.approx((-5.0 - 2.5 - 6.0) / 3)


def test_kto_gradient_is_the_per_row_derivative():
    logps, ref, labels = kto_inputs()
    logps.requires_grad_()
    loss, _ = kto_loss(logps, ref, labels, torch.tensor(KL), cfg=KTOLossConfig(beta=BETA, desirable_weight=2.0))
    (grad,) = torch.autograd.grad(loss, logps)
    for i, (lp, rf, d) in enumerate(zip(LOGPS, REF, LABELS)):
        r = lp - rf
        # d/dr [1 - sigma(b(r - z))] = -b s(1 - s); d/dr [1 - sigma(b(z - r))] = +b s(1 - s)
        s = sig(BETA * (r - KL)) if d else sig(BETA * (KL - r))
        expected = (2.0 if d else 1.0) * (-1 if d else 1) * BETA * s * (1 - s) / 5
        assert grad[i].item() == pytest.approx(expected, rel=1e-5)


def test_kto_nan_rows_are_skipped_in_the_loss_but_counted_in_the_metrics():
    logps, ref, labels = kto_inputs()
    logps[1] = float("nan")  # an undesirable row
    loss, metrics = kto_loss(logps, ref, labels, torch.tensor(KL), cfg=KTOLossConfig(beta=BETA))
    rows = [i for i in range(5) if i != 1]
    expected = sum(per_row_kto("kto", LOGPS[i] - REF[i], LABELS[i]) for i in rows) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["count/rejected"].item() == 3  # TRL divides nansum by the row count
    assert metrics["rewards/rejected_sum"].item() == pytest.approx(BETA * (0.5 - 0.5))


def test_kto_one_class_only_and_config_errors():
    logps, ref, _ = kto_inputs()
    labels = torch.ones(5, dtype=torch.bool)
    _, metrics = kto_loss(logps, ref, labels, torch.tensor(KL), cfg=KTOLossConfig(beta=BETA))
    values = unpaired_metric_values(metrics)
    assert set(values) == {"rewards/chosen", "logps/chosen"}  # TRL logs no rejected or margin values
    with pytest.raises(ValueError, match="needs the KL"):
        kto_loss(logps, ref, labels, None, cfg=KTOLossConfig())
    with pytest.raises(ValueError, match="unknown KTO loss_type"):
        kto_loss(logps, ref, labels, torch.tensor(KL), cfg=KTOLossConfig(loss_type="bco"))
    loss, metrics = kto_loss(logps, ref, labels, None, cfg=KTOLossConfig(loss_type="apo_zero_unpaired"))
    assert metrics["kl"].item() == 0.0 and torch.isfinite(loss)


def test_kl_estimate_and_clamp():
    kl_logps, ref_kl = torch.tensor([-4.0, -2.0, -3.0]), torch.tensor([-3.0, -2.5, -3.3])
    local = kl_estimate(kl_logps, ref_kl)
    assert local.item() == pytest.approx((-1.0 + 0.5 + 0.3) / 3)
    assert clamp_kl(local).item() == 0.0  # negative estimate -> 0
    # per-device means are averaged, whatever the device batch sizes
    assert clamp_kl(torch.tensor([0.6, -0.2])).item() == pytest.approx(0.2)
    assert clamp_kl(torch.tensor(0.3)).item() == pytest.approx(0.3)


def test_rotated_completions():
    assert rotated_completions(list(range(7)), 3) == [2, 0, 1, 5, 3, 4, 6]
    assert rotated_completions(["a", "b"], 4) == ["b", "a"]
    assert rotated_completions(range(3), 1) == [0, 1, 2]
    with pytest.raises(ValueError):
        rotated_completions([1], 0)


def test_check_kto_weights_by_hand():
    assert check_kto_weights(50, 50) is None
    # n_d=100, n_u=300: w_d in [3.0, 3.99] or w_u in [0.25, 0.33]
    message = check_kto_weights(100, 300)
    assert "desirable_weight in [3.0, 3.99]" in message and "undesirable_weight in [0.25, 0.33]" in message
    assert check_kto_weights(100, 300, desirable_weight=3.5) is None
    assert check_kto_weights(100, 300, undesirable_weight=0.3) is None
    assert check_kto_weights(100, 300, desirable_weight=5.0) is not None
    # each range is computed from the *other* weight: w_d = 4 moves w_u's range to [1.0, 1.33]
    assert check_kto_weights(100, 300, desirable_weight=4.0) is None
    # TRL's clamp: no desirable rows counts as one, taken from the undesirable ones
    assert "desirable_weight in [9.0, 11.97]" in check_kto_weights(0, 10)


# --- KTO parity with TRL 1.16 ---


class _Collective:
    """Threads standing in for ranks: all_gather (accelerate's gather: 0-dim -> (world,), else cat)."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def gather(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.detach().reshape(1) if tensor.dim() == 0 else tensor.detach()
        self.barrier.wait()
        out = torch.cat(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read
        return out

    def reduce_sum(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        return self.gather(rank, tensor.unsqueeze(0)).sum(0)

    def run(self, fn):
        """``fn(rank)`` on every rank at once; their results in rank order."""
        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # pragma: no cover - surfaced below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _kto_rank_batch(labels: list[bool], seed: int):
    """A right-padded batch, fused-head outputs for the matched and the KL sequences, ref log-probs."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = len(labels), 9

    def masks():
        mask = torch.zeros(rows, width, dtype=torch.long)
        for s in range(rows):
            prompt = int(torch.randint(1, 3, (), generator=gen))
            mask[s, prompt : prompt + int(torch.randint(1, 6, (), generator=gen))] = 1
        return mask

    completion_mask, kl_mask = masks(), masks()
    logps = (-torch.rand(rows, width - 1, generator=gen) * 2 * completion_mask[:, 1:]).requires_grad_()
    kl_logps = -torch.rand(rows, width - 1, generator=gen) * 2 * kl_mask[:, 1:]
    batch = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.zeros(rows, width, dtype=torch.long),
        "KL_attention_mask": torch.ones(rows, width, dtype=torch.long),
        "KL_completion_mask": kl_mask,
        "label": torch.tensor(labels),
        "ref_logps": -torch.rand(rows, generator=gen) * 8,
        "ref_KL_logps": -torch.rand(rows, generator=gen) * 8,
    }
    return batch, logps, kl_logps


def _trl_kto_rank(rank, collective, batch, logps, kl_logps, loss_type, w_d, w_u):
    from trl.trainer.kto_trainer import KTOTrainer

    zeros = torch.zeros_like(logps)
    outputs = types.SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)
    kl_outputs = types.SimpleNamespace(log_probs=kl_logps)

    def model(**kwargs):
        return kl_outputs if kwargs["input_ids"] is batch["KL_input_ids"] else outputs

    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: collective.gather(rank, x)
        ),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        beta=BETA,
        loss_type=loss_type,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        calculate_KL=loss_type == "kto",
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        ref_model=None,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake)
    loss = KTOTrainer._compute_loss(fake, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def _ours_kto_rank(rank, collective, batch, logps, kl_logps, loss_type, w_d, w_u):
    policy = (logps * batch["completion_mask"][:, 1:]).sum(-1)  # (B,)
    kl = None
    if loss_type == "kto":
        policy_kl = (kl_logps * batch["KL_completion_mask"][:, 1:]).sum(-1)
        local = kl_estimate(policy_kl, batch["ref_KL_logps"])
        kl = clamp_kl(collective.reduce_sum(rank, local) / collective.world)
    loss, metrics = kto_loss(policy, batch["ref_logps"], batch["label"], kl, cfg=KTOLossConfig(loss_type=loss_type, beta=BETA, desirable_weight=w_d, undesirable_weight=w_u))
    sums = collective.reduce_sum(rank, torch.stack([metrics[k] for k in UNPAIRED_SUM_KEYS]))
    return loss, {"kl": metrics["kl"], **unpaired_metric_values(dict(zip(UNPAIRED_SUM_KEYS, sums)))}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.75)])
@pytest.mark.parametrize(
    "rank_labels",
    [
        ([True, False, True, False], [False, False, True, True]),
        ([True, True, True], [False, True, False, False, False]),  # rank 0 has no undesirable row
        ([True, True], [True, True, True]),  # no undesirable row anywhere
    ],
)
def test_parity_with_trl_compute_loss_on_two_ranks(loss_type, weights, rank_labels):
    pytest.importorskip("trl")
    batches = [_kto_rank_batch(labels, seed) for seed, labels in enumerate(rank_labels)]
    args = (loss_type, *weights)
    collective = _Collective(2)
    theirs = collective.run(lambda r: _trl_kto_rank(r, collective, *batches[r], *args))
    ours = collective.run(lambda r: _ours_kto_rank(r, collective, *batches[r], *args))
    for rank in range(2):
        (their_loss, their_metrics), (our_loss, our_metrics) = theirs[rank], ours[rank]
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-6, atol=1e-6)
        batch, logps, _ = batches[rank]
        target = batch["completion_mask"][:, 1:].bool()  # TRL's fused head zeros every other position
        torch.testing.assert_close(
            torch.autograd.grad(our_loss, logps)[0][target], torch.autograd.grad(their_loss, logps)[0][target]
        )
        their_metrics = {
            k: v for k, v in their_metrics.items() if not k.startswith(("logits/", "entropy", "num_"))
        }
        assert set(our_metrics) == set(their_metrics)
        for key, value in our_metrics.items():
            assert value.item() == pytest.approx(their_metrics[key], rel=1e-6, abs=1e-6), key


def test_rotation_and_weight_warning_match_trl_data_prep(tokenizer, monkeypatch):
    pytest.importorskip("trl")
    import accelerate
    from datasets import Dataset
    from trl.trainer import kto_trainer

    accelerate.PartialState()
    warned = []
    monkeypatch.setattr(kto_trainer.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    labels = [True, False, False, True, False, False, False, False]
    dataset = Dataset.from_dict(
        {
            "prompt": [f"q{i}" for i in range(8)],
            "completion": ["a" * (i + 1) for i in range(8)],
            "label": labels,
        }
    )
    for block, w_d, w_u in ((3, 1.0, 1.0), (4, 2.0, 1.0), (8, 1.0, 0.35)):
        fake = types.SimpleNamespace(
            _tokenizer=tokenizer, calculate_KL=True, desirable_weight=w_d, undesirable_weight=w_u
        )
        args = types.SimpleNamespace(
            dataset_num_proc=None, max_length=None, per_device_train_batch_size=block
        )
        warned.clear()
        out = kto_trainer.KTOTrainer._prepare_dataset(fake, dataset, tokenizer, args, "train")
        assert out["KL_completion_ids"] == rotated_completions(out["completion_ids"], block)
        expected = check_kto_weights(sum(labels), len(labels) - sum(labels), w_d, w_u)
        assert warned == ([] if expected is None else [expected])


# --- BCO ---


def trl_029_update(state: dict, xs: torch.Tensor) -> None:
    """TRL 0.29.1 ``RunningMoments.update`` on one process, transcribed (trl/experimental/bco)."""
    xs_count = xs.numel()
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    xs_mean, xs_var = xs_mean.float(), xs_var.float()
    delta = xs_mean - state["mean"]
    tot_count = state["count"] + xs_count
    new_sum = xs_var * xs_count
    old_sum = state["var"] * state["count"] + delta**2 * state["count"] * xs_count / tot_count
    tot_sum = old_sum + new_sum
    state["mean"] += (delta * xs_count / tot_count).item()
    new_var = tot_sum / tot_count
    state["std"] = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
    state["var"] = new_var.item()
    state["count"] = tot_count


def _stream(sizes=(5, 1, 17, 3, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * 2 + 0.7 for n in sizes]


def test_running_moments_match_a_two_pass_over_the_stream_and_trl():
    running, trl_state = RunningMoments(), {"mean": 0, "std": 1, "var": 1, "count": 1e-24}
    seen = []
    for xs in _stream():
        running.update(*batch_moments(xs))
        trl_029_update(trl_state, xs)
        seen.append(xs)
        stream = torch.cat(seen).double()
        assert running.state_dict() == trl_state  # bit for bit
        assert running.mean == pytest.approx(stream.mean().item(), rel=1e-6, abs=1e-7)
        assert running.var == pytest.approx(stream.var(unbiased=False).item(), rel=1e-5)
        if stream.numel() > 1:
            assert running.std == pytest.approx(stream.std(unbiased=True).item(), rel=1e-5)
        assert running.count == pytest.approx(stream.numel())


def test_running_moments_state_dict_round_trip():
    first, *rest = _stream()
    running = RunningMoments()
    running.update(*batch_moments(first))
    restored = RunningMoments()
    restored.load_state_dict(running.state_dict())
    assert restored.state_dict() == running.state_dict()
    for xs in rest:
        running.update(*batch_moments(xs))
        restored.update(*batch_moments(xs))
    assert restored.state_dict() == running.state_dict()


def test_global_moments_of_two_shards_equal_the_whole_batch():
    first, second = _stream(sizes=(6, 11), seed=3)
    whole = RunningMoments()
    whole.update(*batch_moments(torch.cat((first, second))))

    collective = _Collective(2)
    shards = (first, second)
    moments = collective.run(lambda r: batch_moments(shards[r], lambda t: collective.reduce_sum(r, t)))
    for mean, var, count in moments:
        sharded = RunningMoments()
        sharded.update(mean, var, count)
        assert count == 17
        for key, value in whole.state_dict().items():
            assert sharded.state_dict()[key] == pytest.approx(value, rel=1e-6)

    from_sums = RunningMoments()
    from_sums.update_from_sums(first.sum() + second.sum(), (first**2).sum() + (second**2).sum(), 17)
    for key, value in whole.state_dict().items():
        assert from_sums.state_dict()[key] == pytest.approx(value, rel=1e-5)


def test_bco_loss_by_hand_with_and_without_udm():
    logps, ref, labels = kto_inputs()
    delta = 0.1
    weights = torch.tensor([7.0, 2.0, 7.0, 0.5, 10.0])  # desirable rows' values are ignored
    for udm in (None, weights):
        loss, metrics = bco_loss(logps, ref, labels, torch.tensor(delta), beta=BETA, udm_weights=udm)
        terms = []
        for i, (lp, rf, d) in enumerate(zip(LOGPS, REF, LABELS)):
            r = BETA * (lp - rf)
            w = 1.0 if udm is None or d else weights[i].item()
            terms.append(-logsig(r - delta) if d else -w * logsig(-(r - delta)))
        assert loss.item() == pytest.approx(sum(terms) / 5, rel=1e-6)
        assert metrics["delta"].item() == pytest.approx(delta)
        values = unpaired_metric_values(metrics)
        assert values["rewards/chosen"].item() == pytest.approx(BETA * (0.5 - 1.0) / 2)
        assert values["rewards/margins"].item() == pytest.approx(
            BETA * ((0.5 - 1.0) / 2 - (-1.0 + 0.5 - 0.5) / 3)
        )


def test_density_ratio_weights_clamp():
    p = torch.tensor([0.5, 0.9, 0.99, 0.1, 0.3])
    expected = [min(max(q / (1 - q + 1e-8), 0.5), 10.0) for q in p.tolist()]
    torch.testing.assert_close(density_ratio_weights(p), torch.tensor(expected))
    assert density_ratio_weights(p)[2].item() == 10.0 and density_ratio_weights(p)[3].item() == 0.5
    torch.testing.assert_close(
        density_ratio_weights(p, min_density_ratio=0.0, max_density_ratio=1.0)[:2], torch.tensor([1.0, 1.0])
    )


def test_density_classifier_is_balanced_on_uninformative_embeddings():
    # identical embeddings: w = 0 (penalised) and, balanced, sigma(b) = 1/2 whatever the class sizes
    clf = fit_density_classifier(torch.ones(3, 4), torch.ones(12, 4))
    torch.testing.assert_close(clf(torch.ones(2, 4)), torch.full((2,), 0.5), atol=1e-6, rtol=0)
    assert clf.coef.abs().max().item() < 1e-6


def test_density_classifier_closed_form_on_separable_data():
    # n_d points at +1 and n_u at -1, balanced weights: b = 0 and w = C n sigma(-w) (stationarity)
    n_d, n_u, C = 3, 9, 0.05
    clf = fit_density_classifier(torch.ones(n_d, 1), -torch.ones(n_u, 1), C=C)
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < C * (n_d + n_u) * sig(-mid) else (lo, mid)
    assert clf.intercept.item() == pytest.approx(0.0, abs=1e-7)
    assert clf.coef.item() == pytest.approx(lo, rel=1e-7)
    assert clf(torch.tensor([[1.0]])).item() == pytest.approx(sig(lo), rel=1e-6)


def test_density_classifier_is_stationary_on_overlapping_data():
    gen = torch.Generator().manual_seed(0)
    desirable = torch.randn(20, 3, generator=gen) + torch.tensor([0.5, 0.0, -0.3])
    undesirable = torch.randn(50, 3, generator=gen)
    clf = fit_density_classifier(desirable, undesirable)
    x = torch.cat((desirable, undesirable)).double()
    y = torch.cat((torch.ones(20), torch.zeros(50))).double()
    s = torch.cat((torch.full((20,), 70 / 40), torch.full((50,), 70 / 100))).double()  # balanced
    residual = s * (torch.sigmoid(x @ clf.coef + clf.intercept) - y)  # (n,)
    assert (x.T @ residual + clf.coef).abs().max().item() < 1e-6  # d/dw, C = 1 (the sum of 70 terms)
    assert residual.sum().abs().item() < 1e-6  # d/db
    restored = DensityClassifier.from_state_dict(clf.state_dict())
    torch.testing.assert_close(restored(desirable), clf(desirable))
    assert clf(desirable).dtype == torch.float32 and clf(desirable).mean() > clf(undesirable).mean()


def test_kto_loss_names_come_from_one_source():
    from typing import get_args

    from lit_align.losses.kto import KTO_LOSSES, KTOLossType

    assert set(get_args(KTOLossType)) == set(KTO_LOSSES)
    assert KTOLossConfig().needs_kl and not KTOLossConfig("apo_zero_unpaired").needs_kl
