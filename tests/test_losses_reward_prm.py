"""Reward-model losses (lit_align.losses.reward): the Bradley-Terry loss by hand (margin, centring,
ties) and against TRL 1.16's own ``RewardTrainer.compute_loss`` on a fake model, one rank and two
simulated ranks; the PRM step loss by hand, on padded, packed and flat inputs, last-step-only, and
against transformers' ``ForTokenClassification`` loss that TRL's PRM trainer relied on."""

from __future__ import annotations

import math
import threading
import types
from collections import defaultdict

import pytest
import torch

from lit_align.losses.reward import (
    REWARD_METRIC_REDUCTIONS,
    bradley_terry_loss,
    last_labelled,
    prm_loss,
    prm_metric_values,
)

torch.set_num_threads(1)

CHOSEN = [1.0, -0.5, 2.0, 0.3]
REJECTED = [0.2, 0.5, 2.0, -1.0]  # pair 2 is a tie
MARGIN = [0.5, 0.0, 1.0, 0.2]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- Bradley-Terry by hand ---


@pytest.mark.parametrize("margin", [None, MARGIN])
@pytest.mark.parametrize("center", [None, 0.0, 0.01])
def test_bradley_terry_by_hand(margin, center):
    m = margin or [0.0] * 4
    loss, metrics = bradley_terry_loss(
        torch.tensor(CHOSEN),
        torch.tensor(REJECTED),
        None if margin is None else torch.tensor(margin),
        center_rewards_coefficient=center,
    )
    expected = sum(-logsig(c - r - mi) for c, r, mi in zip(CHOSEN, REJECTED, m)) / 4
    if center:
        expected += center * sum((c + r) ** 2 for c, r in zip(CHOSEN, REJECTED)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    rewards = CHOSEN + REJECTED
    assert metrics["accuracy"].item() == pytest.approx(2 / 4)  # the tie counts as wrong
    assert metrics["margin"].item() == pytest.approx(sum(c - r for c, r in zip(CHOSEN, REJECTED)) / 4)
    assert metrics["mean_reward"].item() == pytest.approx(sum(rewards) / 8)
    assert metrics["min_reward"].item() == min(rewards)
    assert metrics["max_reward"].item() == max(rewards)
    assert set(metrics) == set(REWARD_METRIC_REDUCTIONS)
    assert all(not v.requires_grad for v in metrics.values())


def test_bradley_terry_gradient():
    chosen = torch.tensor(CHOSEN, requires_grad=True)
    rejected = torch.tensor(REJECTED, requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected, torch.tensor(MARGIN), center_rewards_coefficient=0.1)
    grad_c, grad_r = torch.autograd.grad(loss, (chosen, rejected))
    for i, (c, r, m) in enumerate(zip(CHOSEN, REJECTED, MARGIN)):
        # d/dc -log sigma(c - r - m) = -sigma(-(c - r - m)); d/dc 0.1 (c + r)^2 = 0.2 (c + r)
        s = 1 / (1 + math.exp(c - r - m))
        assert grad_c[i].item() == pytest.approx((-s + 0.2 * (c + r)) / 4, rel=1e-5)
        assert grad_r[i].item() == pytest.approx((s + 0.2 * (c + r)) / 4, rel=1e-5)


# --- Bradley-Terry parity with TRL 1.16 ---


class _Collective:
    """Threads standing in for ranks: accelerate's gather (0-dim -> (world,), else cat on dim 0)."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def gather(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.detach().reshape(1) if tensor.dim() == 0 else tensor.detach()
        self.barrier.wait()
        out = torch.cat(self.slots)
        self.barrier.wait()
        return out

    def run(self, fn):
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


def _trl_reward(logits, margin, center, gather=lambda x: x):
    from trl.trainer.reward_trainer import RewardTrainer

    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(gather=gather, gather_for_metrics=gather),
        args=types.SimpleNamespace(center_rewards_coefficient=center),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    rows = logits.size(0)
    inputs = {"input_ids": torch.zeros(rows, 5, dtype=torch.long), "attention_mask": torch.ones(rows, 5)}
    if margin is not None:
        inputs["margin"] = margin

    def model(**kwargs):
        return types.SimpleNamespace(logits=logits)  # (2E, 1): chosen rows, then rejected rows

    loss = RewardTrainer.compute_loss(fake, model, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items() if k != "num_tokens"}


def _pair_logits(num_pairs: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * num_pairs, 1, generator=gen)
    logits[1, 0] = logits[num_pairs + 1, 0]  # a tie
    return logits.requires_grad_()


def _margin(num_pairs: int, seed: int) -> torch.Tensor:
    return torch.rand(num_pairs, generator=torch.Generator().manual_seed(seed + 100))


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_parity_with_trl_reward_compute_loss(with_margin, center):
    pytest.importorskip("trl")
    logits = _pair_logits(5, 0)
    margin = _margin(5, 0) if with_margin else None
    theirs, their_metrics = _trl_reward(logits, margin, center)
    chosen, rejected = logits.squeeze(-1).chunk(2)
    ours, metrics = bradley_terry_loss(chosen, rejected, margin, center)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(theirs, logits)[0])
    assert set(metrics) == set(their_metrics)
    for key, value in metrics.items():
        assert value.item() == pytest.approx(their_metrics[key], rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("with_margin", [False, True])
def test_parity_with_trl_reward_metrics_on_two_ranks(with_margin):
    pytest.importorskip("trl")
    logits = [_pair_logits(4, seed) for seed in (1, 2)]
    margins = [_margin(4, seed) if with_margin else None for seed in (1, 2)]
    collective = _Collective(2)
    theirs = collective.run(
        lambda r: _trl_reward(logits[r], margins[r], 0.05, lambda x: collective.gather(r, x))
    )
    ours = [
        bradley_terry_loss(*logits[r].squeeze(-1).chunk(2), margins[r], center_rewards_coefficient=0.05)
        for r in range(2)
    ]
    # combine the per-device metrics as the module will: all-reduce SUM / world, MIN, MAX
    combined = {}
    for key, op in REWARD_METRIC_REDUCTIONS.items():
        values = torch.stack([metrics[key] for _, metrics in ours])
        combined[key] = {"mean": values.mean, "min": values.min, "max": values.max}[op]()
    for rank in range(2):
        their_loss, their_metrics = theirs[rank]
        torch.testing.assert_close(ours[rank][0], their_loss, rtol=1e-6, atol=1e-6)  # each device's own mean
        for key, value in combined.items():
            assert value.item() == pytest.approx(their_metrics[key], rel=1e-6, abs=1e-6), key


# --- PRM ---


def ce(logit0: float, logit1: float, label: int) -> float:
    return math.log(math.exp(logit0) + math.exp(logit1)) - (logit1 if label else logit0)


# Two padded rows of 5 positions; labels on each step's last token, -100 elsewhere (and on padding)
PRM_LOGITS = [
    [[0.2, 1.0], [0.0, 0.0], [1.5, -0.5], [0.3, 0.3], [0.0, 2.0]],
    [[0.0, 0.0], [2.0, 1.0], [-1.0, 0.5], [0.7, 0.1], [9.0, 9.0]],
]
PRM_LABELS = [[-100, 1, 0, -100, 1], [-100, 1, -100, 0, -100]]


def _prm_expected(keep):
    terms = [
        ce(*PRM_LOGITS[b][t], PRM_LABELS[b][t])
        for b in range(2)
        for t in range(5)
        if PRM_LABELS[b][t] != -100 and (b, t) in keep
    ]
    return sum(terms) / len(terms)


ALL_STEPS = {(0, 1), (0, 2), (0, 4), (1, 1), (1, 3)}
LAST_STEPS = {(0, 4), (1, 3)}


def test_prm_loss_by_hand_and_counts():
    loss, metrics = prm_loss(torch.tensor(PRM_LOGITS), torch.tensor(PRM_LABELS))
    assert loss.item() == pytest.approx(_prm_expected(ALL_STEPS), rel=1e-6)
    # predictions (argmax, ties -> 0): (0,1) tie -> 0 vs 1: fn; (0,2) 0 vs 0: tn; (0,4) 1 vs 1: tp;
    # (1,1) 0 vs 1: fn; (1,3) 0 vs 0: tn
    expected = {"total": 5, "correct": 3, "tp": 1, "fp": 0, "fn": 2}
    assert {k: metrics[k].item() for k in expected} == expected
    assert metrics["accuracy"].item() == pytest.approx(3 / 5)
    assert metrics["loss_sum"].item() == pytest.approx(5 * _prm_expected(ALL_STEPS), rel=1e-6)
    values = prm_metric_values(metrics)
    assert values["accuracy"].item() == pytest.approx(0.6)
    assert values["precision"].item() == pytest.approx(1.0)
    assert values["recall"].item() == pytest.approx(1 / 3)
    assert "precision" not in prm_metric_values({**metrics, "tp": torch.tensor(0.0), "fp": torch.tensor(0.0)})


def test_prm_last_step_only_padded_packed_and_flat_agree():
    logits, labels = torch.tensor(PRM_LOGITS), torch.tensor(PRM_LABELS)
    padded, _ = prm_loss(logits, labels, train_on_last_step_only=True)
    assert padded.item() == pytest.approx(_prm_expected(LAST_STEPS), rel=1e-6)

    # the same two sequences packed into one row (padding dropped), with their sequence index
    packed_logits = torch.cat((logits[0], logits[1, :4]))[None]  # (1, 9, 2)
    packed_labels = torch.cat((labels[0], labels[1, :4]))[None]  # (1, 9)
    seq = torch.tensor([[0] * 5 + [1] * 4])
    packed, _ = prm_loss(packed_logits, packed_labels, seq, train_on_last_step_only=True)
    torch.testing.assert_close(packed, padded)
    with pytest.raises(ValueError, match="sequence_index"):
        prm_loss(packed_logits[0], packed_labels[0], train_on_last_step_only=True)

    # positions already gathered to the labelled ones
    mask = packed_labels[0] != -100
    flat, metrics = prm_loss(
        packed_logits[0][mask], packed_labels[0][mask], seq[0][mask], train_on_last_step_only=True
    )
    torch.testing.assert_close(flat, padded)
    assert metrics["total"].item() == 2
    full, _ = prm_loss(packed_logits, packed_labels)
    assert full.item() == pytest.approx(_prm_expected(ALL_STEPS), rel=1e-6)


def test_last_labelled_mask():
    labels = torch.tensor([-100, 1, 0, -100, 1, -100, -100, 0, 1])
    seq = torch.tensor([0, 0, 0, 0, 2, 2, 3, 3, 3])  # sequence 1 absent, sequence 2's last is unlabelled
    assert last_labelled(labels, seq).tolist() == [False, False, True, False, True, False, False, False, True]
    assert not last_labelled(torch.full((3,), -100), torch.zeros(3, dtype=torch.long)).any()


def test_prm_loss_matches_transformers_token_classification_loss():
    from transformers.loss.loss_utils import ForTokenClassification

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 2, generator=gen, dtype=torch.float64).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 2, (3, 7), generator=gen)
    labels[torch.rand(3, 7, generator=gen) < 0.6] = -100
    config = types.SimpleNamespace(num_labels=2)
    theirs = ForTokenClassification(logits, labels, config)
    ours, metrics = prm_loss(logits, labels)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(theirs, logits)[0])
    # with gradient accumulation transformers divides the sum by the step's labelled count
    total = metrics["total"] + 4
    by_count = ForTokenClassification(logits, labels, config, num_items_in_batch=total)
    torch.testing.assert_close(metrics["loss_sum"] / total, by_count.detach())
