"""Online-method losses, advantages and reward plumbing, checked by hand and against TRL 1.16.

- ``lit_align.losses.advantages``: hand-derived values, NaN handling, loop references, and a
  re-statement of TRL's advantage code (TRL computes them inline, not in a callable function);
- ``lit_align.losses.policy``: the real ``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss``
  called as unbound functions on a fake trainer, loss + gradient + logged clip/KL metrics;
  PPO (no longer in TRL 1.16) by hand and against trl 0.29.1's formulas re-stated;
- ``lit_align.rewards``: ``compute_rewards`` errors, ``load_reward_func`` spec forms, and the
  length rewards against ``trl.rewards.get_soft_overlong_punishment``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from trl.rewards import get_soft_overlong_punishment
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer
from trl.trainer.utils import nanstd as trl_nanstd

import lit_align.rewards as rewards_pkg
from lit_align.losses.advantages import (
    gae,
    group_advantages,
    masked_var,
    masked_whiten,
    nanstd,
    rloo_advantages,
    weighted_rewards,
)
from lit_align.losses.policy import (
    GRPO_LOSS_TYPES,
    NORMALISATIONS,
    SURROGATES,
    GRPOLossConfig,
    GRPOLossType,
    entropy_mask,
    grpo_loss,
    k3_kl,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_loss,
)
from lit_align.rewards import LengthPenalty, SoftOverlongPunishment, compute_rewards, load_reward_func
from lit_align.rewards.registry import reward_name

NAN = float("nan")


def grpo(logps, old_logps, advantages, mask, ref_logps=None, token_mask=None, num_items=None, **settings):
    """``grpo_loss`` with its settings given as TRL-named keywords."""
    return grpo_loss(logps, old_logps, advantages, mask, GRPOLossConfig(**settings), ref_logps=ref_logps,
                     token_mask=token_mask, num_items=num_items)
EPS = 1e-4  # TRL's std epsilon


# ----------------------------------------------------------------------------------------------
# 1. Advantages
# ----------------------------------------------------------------------------------------------


def test_nanstd_hand_and_vs_trl():
    # [1, 3, nan]: mean 2, unbiased var ((1-2)^2 + (3-2)^2) / (2-1) = 2 -> sqrt(2)
    assert_close(nanstd(torch.tensor([1.0, 3.0, NAN])), torch.tensor(math.sqrt(2.0)))
    # one value left -> NaN (Bessel's correction undefined)
    assert torch.isnan(nanstd(torch.tensor([5.0, NAN, NAN])))
    # per-row, with keepdim
    x = torch.tensor([[1.0, 3.0, NAN], [2.0, 2.0, 2.0]])
    assert_close(nanstd(x, dim=1), torch.tensor([math.sqrt(2.0), 0.0]))
    assert nanstd(x, dim=1, keepdim=True).shape == (2, 1)
    # no NaN -> torch.std (unbiased)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 7, generator=g)
    assert_close(nanstd(y, dim=1), y.std(dim=1))
    assert_close(nanstd(y), y.std())
    # with NaNs -> TRL's nanstd
    y[torch.rand(5, 7, generator=g) < 0.3] = NAN
    for dim in (None, 0, 1):
        assert_close(nanstd(y, dim=dim), trl_nanstd(y, dim=dim), equal_nan=True)


def test_weighted_rewards_hand():
    r = torch.tensor([[1.0, NAN], [NAN, NAN], [2.0, 3.0]])
    w = torch.tensor([1.0, 0.5])
    # row 0: 1*1 (NaN ignored); row 1: every function None -> NaN; row 2: 2 + 0.5*3 = 3.5
    assert_close(weighted_rewards(r, w), torch.tensor([1.0, NAN, 3.5]), equal_nan=True)


def test_group_advantages_hand_sum_then_normalize():
    # G = 2, rewards [1, 3 | 2, 2]. Group 1: mean 2, unbiased std sqrt(2). Group 2: mean 2, std 0.
    r = torch.tensor([[1.0], [3.0], [2.0], [2.0]])
    w = torch.ones(1)
    s = math.sqrt(2.0) + EPS
    out = group_advantages(r, w, 2, "group")
    assert_close(out.advantages, torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))
    assert_close(out.rewards, torch.tensor([1.0, 3.0, 2.0, 2.0]))
    assert out.zero_std.tolist() == [False, False, True, True]
    # none: just minus the group mean
    out = group_advantages(r, w, 2, "none")
    assert_close(out.advantages, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert out.zero_std.tolist() == [False, False, True, True]  # group std, for logging
    # batch: batch std of [1, 3, 2, 2] = sqrt((1 + 1 + 0 + 0) / 3) = sqrt(2/3)
    sb = math.sqrt(2.0 / 3.0) + EPS
    out = group_advantages(r, w, 2, "batch")
    assert_close(out.advantages, torch.tensor([-1 / sb, 1 / sb, 0.0, 0.0]))
    assert out.zero_std.tolist() == [False] * 4


def test_group_advantages_hand_nan_handling():
    # G = 3, K = 2, weights [1, 1]:
    #   row 0 [1, None] -> 1;  row 1 [None, None] -> unscorable (NaN);  row 2 [3, 1] -> 4
    #   group mean over scorable rows: 2.5; std of [1, 4] = sqrt(4.5)
    #   second group entirely unscorable -> advantages 0
    r = torch.tensor([[1.0, NAN], [NAN, NAN], [3.0, 1.0], [NAN, NAN], [NAN, NAN], [NAN, NAN]])
    out = group_advantages(r, torch.ones(2), 3, "group")
    s = math.sqrt(4.5) + EPS
    assert_close(out.advantages, torch.tensor([-1.5 / s, 0.0, 1.5 / s, 0.0, 0.0, 0.0]))
    assert_close(out.rewards, torch.tensor([1.0, NAN, 4.0, NAN, NAN, NAN]), equal_nan=True)
    assert not torch.isnan(out.advantages).any()


def test_group_advantages_hand_normalize_then_sum():
    # G = 2, K = 2, weights [1, 2].
    # column 0 = [0, 2 | 5, 5]: group 1 mean 1, std sqrt(2) -> [-1, 1] / (sqrt(2) + eps); group 2 std 0 -> [0, 0]
    # column 1 = [1, 1 | 0, 4]: group 1 std 0 -> [0, 0]; group 2 mean 2, std 2 sqrt(2) -> [-2, 2] / (2 sqrt(2) + eps)
    r = torch.tensor([[0.0, 1.0], [2.0, 1.0], [5.0, 0.0], [5.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    a = 1 / (math.sqrt(2) + EPS)
    b = 2 * 2 / (2 * math.sqrt(2) + EPS)  # weight 2
    total = torch.tensor([-a, a, -b, b], dtype=torch.float64)
    # then normalised over the batch: mean 0, unbiased std sqrt((2 a^2 + 2 b^2) / 3)
    expected = (total - total.mean()) / (math.sqrt((2 * a * a + 2 * b * b) / 3) + EPS)
    out = group_advantages(r, w, 2, "group", "normalize_then_sum")
    assert_close(out.advantages, expected.float())
    # scale_rewards does not matter for normalize_then_sum (TRL ignores it there too)
    assert_close(group_advantages(r, w, 2, "none", "normalize_then_sum").advantages, expected.float())
    # the logged reward is still the plain weighted sum
    assert_close(out.rewards, torch.tensor([2.0, 4.0, 5.0, 13.0]))


def _trl_group_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards, aggregation):
    """TRL 1.16 ``GRPOTrainer._generate_and_score_completions``, grpo_trainer.py lines 2759-2810
    (from ``unscorable_mask = ...`` to ``advantages = torch.nan_to_num(...)``), re-stated verbatim
    with ``self.`` attributes as arguments, plus the logged reward of lines 2826-2827."""
    device = rewards_per_func.device
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            if num_generations > 1:
                std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:
                std_rewards = torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            if rewards.numel() > 1:
                std_rewards = trl_nanstd(rewards).expand_as(rewards)
            else:
                std_rewards = torch.zeros_like(rewards)
        else:
            raise ValueError(scale_rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    elif aggregation == "normalize_then_sum":
        k = rewards_per_func.shape[1]
        grouped = rewards_per_func.view(-1, num_generations, k)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = trl_nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, k)
        rewards = (reward_k * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    else:
        raise ValueError(aggregation)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    logged = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    logged[unscorable_mask] = torch.nan
    return advantages, logged, is_std_zero


def _random_rewards(seed, n_groups=4, G=4, K=3):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups * G, K, generator=g)
    r[torch.rand(n_groups * G, K, generator=g) < 0.25] = NAN  # some functions returned None
    r[1] = NAN  # an unscorable completion
    r[G : 2 * G] = 0.5  # a group with zero std in every function
    r[2 * G : 3 * G - 1] = NAN  # a group with a single scorable completion
    w = torch.rand(K, generator=g) + 0.5
    return r, w


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_advantages_match_trl(scale_rewards, aggregation, seed):
    r, w = _random_rewards(seed)
    adv, logged, zero_std = _trl_group_advantages(r, w, 4, scale_rewards, aggregation)
    out = group_advantages(r, w, 4, scale_rewards, aggregation)
    assert_close(out.advantages, adv, atol=1e-6, rtol=1e-6)
    assert_close(out.rewards, logged, equal_nan=True, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.zero_std, zero_std)
    assert not torch.isnan(out.advantages).any()
    assert (out.advantages[torch.isnan(r).all(1)] == 0).all()


def _trl_rloo_advantages(rewards_per_func, reward_weights, num_generations, normalize_advantages):
    """TRL 1.16 ``RLOOTrainer._generate_and_score_completions``, rloo_trainer.py lines 1653-1699
    re-stated (without reward clipping and the KL shaping, which lit-align applies before
    ``rloo_advantages``)."""
    device = rewards_per_func.device
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    if num_generations > 1:
        baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
        baselines = baselines.view(-1)
        advantages = rewards - baselines
    else:
        advantages = torch.zeros_like(rewards)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (trl_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _rloo_loop(rewards, G):
    """Leave-one-out baseline with a plain loop: mean of the *other scorable* rewards of the group."""
    out = []
    for start in range(0, len(rewards), G):
        group = rewards[start : start + G].tolist()
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i and not math.isnan(x)]
            if math.isnan(r) or not others:
                out.append(0.0)
            else:
                out.append(r - sum(others) / len(others))
    return torch.tensor(out)


def test_rloo_advantages_hand():
    # group [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> [-3, -1.5, 4.5]
    # group [1, None, 3]: None is not a sibling: baselines 3, -, 1 -> [-2, 0, 2]
    # group [None, 5, None]: a single scorable completion -> 0
    r = torch.tensor([1.0, 2.0, 6.0, 1.0, NAN, 3.0, NAN, 5.0, NAN])
    assert_close(rloo_advantages(r, 3), torch.tensor([-3.0, -1.5, 4.5, -2.0, 0.0, 2.0, 0.0, 0.0, 0.0]))
    assert_close(rloo_advantages(r, 1), torch.zeros(9))


@pytest.mark.parametrize("G", [2, 3, 5])
def test_rloo_advantages_vs_loop(G):
    g = torch.Generator().manual_seed(G)
    r = torch.randn(6 * G, generator=g)
    r[torch.rand(6 * G, generator=g) < 0.3] = NAN
    assert_close(rloo_advantages(r, G), _rloo_loop(r, G))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_advantages_match_trl(normalize, seed):
    r, w = _random_rewards(seed)
    expected = _trl_rloo_advantages(r, w, 4, normalize)
    assert_close(rloo_advantages(weighted_rewards(r, w), 4, normalize), expected, atol=1e-6, rtol=1e-6)


def _trl029_masked_whiten(values, mask, shift_mean=True):
    """trl 0.29.1 experimental/ppo/ppo_trainer.py lines 246-279 (masked_mean/var/whiten)."""

    def mm(v, m):
        return (v * m).sum() / m.sum()

    mean = mm(values, mask)
    var = mm((values - mean) ** 2, mask)
    var = var * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened + mean if not shift_mean else whitened


def test_masked_var_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # valid [1, 2, 3, 6]: mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14/3
    assert_close(masked_var(x, mask), torch.tensor(14.0 / 3.0))
    w = masked_whiten(x, mask)
    assert_close(w[mask.bool()], (torch.tensor([1.0, 2.0, 3.0, 6.0]) - 3) / math.sqrt(14 / 3 + 1e-8))
    assert_close(w, _trl029_masked_whiten(x, mask.bool()))
    assert_close(masked_whiten(x, mask, shift_mean=False), _trl029_masked_whiten(x, mask.bool(), False))
    assert_close(masked_whiten(x, mask, shift_mean=False)[mask.bool()], w[mask.bool()] + 3)
    with pytest.raises(ValueError, match="at least two"):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Per row, backwards over its valid tokens; the last valid token bootstraps from 0."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    ret = torch.zeros_like(rewards, dtype=torch.float64)
    for i, L in enumerate(lengths):
        last = 0.0
        for t in reversed(range(L)):
            next_v = values[i, t + 1].item() if t + 1 < L else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t] = last
            ret[i, t] = last + values[i, t].item()
    return adv.float(), ret.float()


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_gae_vs_loop(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    lengths = [6, 3, 1, 0, 5]
    T = 6
    mask = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).long()
    rewards = torch.randn(5, T, generator=g)
    values = torch.randn(5, T, generator=g)  # garbage after the mask end: must be ignored
    adv, ret = gae(rewards, values, mask, gamma, lam)
    e_adv, e_ret = _gae_loop(rewards, values, lengths, gamma, lam)
    assert_close(adv, e_adv)
    assert_close(ret, e_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand():
    # one row, 3 tokens, rewards [0, 0, 1], values [0.5, 0.2, 0.4]
    r = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    # gamma = lam = 1: advantage = sum of future rewards - v[t] = [0.5, 0.8, 0.6]; returns = [1, 1, 1]
    adv, ret = gae(r, v, m, 1.0, 1.0)
    assert_close(adv, torch.tensor([[0.5, 0.8, 0.6, 0.0]]))
    assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # lam = 0, gamma = 0.5: one-step TD errors r + 0.5 v[t+1] - v[t] (v after the end = 0):
    #   t0: 0 + 0.1 - 0.5 = -0.4; t1: 0 + 0.2 - 0.2 = 0; t2: 1 + 0 - 0.4 = 0.6
    adv, ret = gae(r, v, m, 0.5, 0.0)
    assert_close(adv, torch.tensor([[-0.4, 0.0, 0.6, 0.0]]))
    assert_close(ret, torch.tensor([[0.1, 0.2, 1.0, 0.0]]))


def test_advantage_bad_input():
    r = torch.zeros(4, 1)
    with pytest.raises(ValueError, match=r"scale_rewards.*'group'.*'batch'.*'none'.*'foo'"):
        group_advantages(r, torch.ones(1), 2, "foo")
    with pytest.raises(ValueError, match=r"sum_then_normalize.*normalize_then_sum.*'bar'"):
        group_advantages(r, torch.ones(1), 2, "group", "bar")


# ----------------------------------------------------------------------------------------------
# 2. Policy losses
# ----------------------------------------------------------------------------------------------


def test_k3_kl_hand():
    logps = torch.zeros(3)
    ref = torch.tensor([0.0, math.log(2.0), -math.log(2.0)])
    # d = ref - logp: e^d - d - 1 -> 0, 2 - ln 2 - 1, 1/2 + ln 2 - 1
    assert_close(k3_kl(logps, ref), torch.tensor([0.0, 1 - math.log(2.0), math.log(2.0) - 0.5]))
    g = torch.Generator().manual_seed(0)
    assert (k3_kl(torch.randn(50, generator=g), torch.randn(50, generator=g)) >= 0).all()


def test_entropy_mask_hand():
    ent = torch.tensor([[0.1, 0.5, 0.9], [0.7, 0.3, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # >= 0.5 among valid tokens; the padded 5.0 stays out
    assert entropy_mask(ent, mask, 0.5).tolist() == [[False, True, True], [True, False, False]]


# Tiny example for the normalisations: N = 2, T = 3, mask [[1, 1, 0], [1, 0, 0]], advantages [1, 2],
# old_logps == logps (ratio 1, nothing clipped), so the clipped per-token loss is -A:
#   row 0 [-1, -1, .], row 1 [-2, ., .]; masked sum -4 over 3 tokens.
_LOGPS = torch.full((2, 3), -0.5)
_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
_ADV = torch.tensor([1.0, 2.0])


@pytest.mark.parametrize(
    "loss_type,kwargs,expected",
    [
        ("grpo", {}, (-1.0 + -2.0) / 2),  # mean over sequences of per-sequence token means
        ("bnpo", {}, -4.0 / 3),  # token mean over the batch
        ("dr_grpo", {"max_completion_length": 4}, -4.0 / (2 * 4)),  # sum / (N * max_completion_length)
        ("dapo", {"num_items": 8}, -4.0 / 8),  # sum / num_items
        ("dapo", {}, -4.0 / 3),  # num_items defaults to the local loss tokens
        # sapo: -(sigmoid(tau (1 - 1)) * 4 / tau) A = -(2 / tau) A, tau = 1 for A > 0; grpo normalisation
        ("sapo", {}, (-2.0 + -4.0) / 2),
        # cispo: -min(ratio, eps_high).detach() * A * logp = 0.5 A -> [0.5, 0.5 | 1.0], sum 2 over 3 items
        ("cispo", {"num_items": 3, "epsilon_high": 5.0}, 2.0 / 3),
    ],
)
def test_grpo_loss_normalisation_hand(loss_type, kwargs, expected):
    logps = _LOGPS.clone().requires_grad_()
    out = grpo(logps, _LOGPS, _ADV, _MASK, loss_type=loss_type, **kwargs)
    assert_close(out.loss, torch.tensor(expected))
    assert_close(out.ratio, torch.ones(2, 3))
    if loss_type == "grpo":
        # d/dlogp of -A exp(logp - old) at ratio 1 is -A, times the grpo weight 1 / (N * len_i):
        # row 0 tokens -1 / (2 * 2), row 1 token -2 / (2 * 1); padding 0
        out.loss.backward()
        assert_close(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [-1.0, 0.0, 0.0]]))


def test_grpo_loss_kl_and_clipping_hand():
    # one token, ratio 1.5 (old logp = logp - ln 1.5), A = 1, eps 0.2: min(1.5, 1.2) * 1 -> loss -1.2, high-clipped
    logps = torch.tensor([[0.0]])
    old = torch.tensor([[-math.log(1.5)]])
    out = grpo(logps, old, torch.tensor([1.0]), torch.ones(1, 1), loss_type="bnpo")
    assert_close(out.loss, torch.tensor(-1.2))
    assert out.high_clipped.tolist() == [[True]] and out.low_clipped.tolist() == [[False]]
    # A = -1: -min(-1.5, -1.2) = 1.5 (pessimistic side unclipped); not low-clipped (ratio > 1 - eps)
    out = grpo(logps, old, torch.tensor([-1.0]), torch.ones(1, 1), loss_type="bnpo")
    assert_close(out.loss, torch.tensor(1.5))
    # ... and with delta = 1.3 the unclipped ratio is capped: 1.3
    out = grpo(logps, old, torch.tensor([-1.0]), torch.ones(1, 1), loss_type="bnpo", delta=1.3)
    assert_close(out.loss, torch.tensor(1.3))
    # KL: ref = logp + ln 2 -> k3 = 1 - ln 2, times the ratio 1.5 (bias correction), times beta 0.1
    ref = torch.tensor([[math.log(2.0)]])
    kl = (1 - math.log(2.0)) * 1.5
    out = grpo(logps, old, torch.tensor([1.0]), torch.ones(1, 1), loss_type="bnpo", ref_logps=ref, beta=0.1)
    assert_close(out.loss, torch.tensor(-1.2 + 0.1 * kl))
    assert_close(out.kl, torch.tensor([[kl]]))
    out = grpo(
        logps, old, torch.tensor([1.0]), torch.ones(1, 1), loss_type="bnpo", ref_logps=ref, beta=0.1,
        use_bias_correction_kl=False,
    )
    assert_close(out.loss, torch.tensor(-1.2 + 0.1 * (1 - math.log(2.0))))


def test_grpo_loss_sequence_level_hand():
    # sequence ratio = exp(masked mean of log ratios): log ratios [0.2, 0.4, (9 masked)] -> exp(0.3)
    logps = torch.tensor([[0.2, 0.4, 9.0]])
    out = grpo(logps, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]),
                    loss_type="grpo", importance_sampling_level="sequence", epsilon_high=1.0)
    assert out.ratio.shape == (1, 1)
    assert_close(out.ratio, torch.tensor([[math.exp(0.3)]]))
    assert_close(out.loss, torch.tensor(-math.exp(0.3)))


def test_grpo_variant_names_have_one_source():
    """The loss_type Literal, the surrogates and the normalisations name the same variants."""
    from typing import get_args

    from lit_align.losses.advantages import AGGREGATIONS, SCALE_REWARDS, Aggregation, ScaleRewards

    assert set(get_args(GRPOLossType)) == set(GRPO_LOSS_TYPES) == set(SURROGATES) == set(NORMALISATIONS)
    assert (set(get_args(ScaleRewards)), set(get_args(Aggregation))) == (set(SCALE_REWARDS), set(AGGREGATIONS))
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: built and checked once
        GRPOLossConfig().beta = 1.0


def test_policy_bad_input():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    a = torch.zeros(2)
    with pytest.raises(ValueError, match=r"loss_type.*'grpo'.*'bnpo'.*'dr_grpo'.*'dapo'.*'cispo'.*'sapo'.*'ppo'"):
        grpo(x, x, a, m, loss_type="ppo")
    with pytest.raises(ValueError, match=r"'token' or 'sequence'.*'seq'"):
        grpo(x, x, a, m, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo(x, x, a, m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="reference"):
        grpo(x, x, a, m, beta=0.1)


# ---- parity with the real TRL 1.16 _compute_loss ---------------------------------------------


class _IdentityAccelerator:
    """Single process: gather / reduce / pad are the identity."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


class _FakeTrainer:
    """The attributes ``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss`` read."""

    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask  # TRL's real method

    def __init__(self, per_token_logps, entropies, **attrs):
        self._per_token_logps = per_token_logps
        self._entropies = entropies
        self.accelerator = _IdentityAccelerator()
        self.model = SimpleNamespace(training=True)
        self.state = SimpleNamespace(global_step=0)  # profiling_decorator
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.current_gradient_accumulation_steps = 1
        self.top_entropy_quantile = 1.0
        self.__dict__.update(attrs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == self._per_token_logps.shape[1]
        return self._per_token_logps, self._entropies, None


def _policy_batch(seed, N=6, T=5, row_shift=0.5, token_noise=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5][:N])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    logps = -torch.rand(N, T, generator=g) * 2 - 0.1
    # old log-probs differ per token and per row, so both token and sequence ratios leave [0.8, 1.2]
    # per-row log-ratio shifts: rows 0 (A > 0) and 1 (A < 0) leave the clip range at sequence level too
    shift = torch.tensor([1.0, -1.0, 0.2, 0.1, -0.8, 0.8][:N]).unsqueeze(1) * row_shift
    old = logps - shift - token_noise * torch.randn(N, T, generator=g)
    ref = logps + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.7, -0.4, 1.5, -2.0][:N])
    ent = torch.rand(N, T, generator=g) * 3
    return logps, old, ref, adv, mask, ent


def _masked_metric(x, mask):
    """TRL's ``global_masked_mean``: one value per sequence at sequence level, else a masked token mean."""
    x = x.float()
    if x.shape[1] == 1:
        return x.mean().item()
    return ((x * mask).sum() / mask.sum()).item()


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("delta", [None, 1.5])
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])
def test_grpo_loss_matches_trl(loss_type, level, beta, delta, top_entropy_quantile):
    logps0, old, ref, adv, mask, ent = _policy_batch(0)
    N, T = logps0.shape
    eps_low, eps_high = 0.2, (1.2 if loss_type == "cispo" else 0.28)
    max_len = T + 3
    args = SimpleNamespace(
        use_bias_correction_kl=True, delta=delta, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        steps_per_generation=1, report_to=[],
    )
    trl_logps = logps0.clone().requires_grad_()
    fake = _FakeTrainer(
        trl_logps, ent, args=args, loss_type=loss_type, importance_sampling_level=level, beta=beta,
        epsilon_low=eps_low, epsilon_high=eps_high, max_completion_length=max_len,
        top_entropy_quantile=top_entropy_quantile,
    )
    inputs = {
        "prompt_ids": torch.ones(N, 2, dtype=torch.long),
        "prompt_mask": torch.ones(N, 2, dtype=torch.long),
        "completion_ids": torch.ones(N, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    trl_loss = GRPOTrainer._compute_loss(fake, None, inputs)
    trl_loss.backward()

    ours_logps = logps0.clone().requires_grad_()
    token_mask = None
    if top_entropy_quantile < 1.0:
        token_mask = entropy_mask(ent, mask, torch.quantile(ent[mask.bool()], 1 - top_entropy_quantile))
        assert 0 < token_mask.sum() < mask.sum()
    out = grpo(
        ours_logps, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, delta=delta,
        importance_sampling_level=level, ref_logps=ref if beta else None, beta=beta, use_bias_correction_kl=True,
        sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, token_mask=token_mask, max_completion_length=max_len,
        num_items=mask.sum() if loss_type in ("dapo", "cispo") else None,
    )
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-6)
    assert ours_logps.grad.abs().sum() > 0

    m = fake._metrics["train"]
    if beta:
        assert_close(_masked_metric(out.kl, mask), m["kl"][0], atol=1e-6, rtol=1e-6)
    else:
        assert out.kl is None and "kl" not in m
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        low, high = out.low_clipped, out.high_clipped
        assert_close(_masked_metric(low, mask), m["clip_ratio/low_mean"][0], atol=1e-6, rtol=1e-6)
        assert_close(_masked_metric(high, mask), m["clip_ratio/high_mean"][0], atol=1e-6, rtol=1e-6)
        assert_close(_masked_metric(low | high, mask), m["clip_ratio/region_mean"][0], atol=1e-6, rtol=1e-6)
        # the batch is built so that clipping actually happens on both sides
        assert m["clip_ratio/low_mean"][0] > 0 and m["clip_ratio/high_mean"][0] > 0
    elif loss_type == "cispo":
        assert_close(_masked_metric(out.high_clipped, mask), m["cispo_clip_ratio"][0], atol=1e-6, rtol=1e-6)
        assert m["cispo_clip_ratio"][0] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_loss_matches_trl_without_old_logps(loss_type):
    """num_iterations == 1: TRL uses ``per_token_logps.detach()`` as the old log-probs."""
    logps0, _, _, adv, mask, ent = _policy_batch(1)
    N, T = logps0.shape
    args = SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1, report_to=[])
    trl_logps = logps0.clone().requires_grad_()
    fake = _FakeTrainer(
        trl_logps, ent, args=args, loss_type=loss_type, importance_sampling_level="token", beta=0.0,
        epsilon_low=0.2, epsilon_high=0.2, max_completion_length=T,
    )
    inputs = {
        "prompt_ids": torch.ones(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "num_items_in_batch": mask.sum(),
    }
    trl_loss = GRPOTrainer._compute_loss(fake, None, inputs)
    trl_loss.backward()
    ours_logps = logps0.clone().requires_grad_()
    out = grpo(ours_logps, ours_logps.detach(), adv, mask, loss_type=loss_type, num_items=mask.sum())
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-6)


def test_grpo_clip_metric_with_small_delta_like_trl():
    logps0, old, _, adv, mask, ent = _policy_batch(0)
    N, T = logps0.shape
    args = SimpleNamespace(use_bias_correction_kl=True, delta=1.1, steps_per_generation=1, report_to=[])
    fake = _FakeTrainer(
        logps0.clone().requires_grad_(), ent, args=args, loss_type="bnpo", importance_sampling_level="token",
        beta=0.0, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=T,
    )
    inputs = {
        "prompt_ids": torch.ones(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old,
    }
    trl_loss = GRPOTrainer._compute_loss(fake, None, inputs)
    out = grpo(logps0, old, adv, mask, loss_type="bnpo", delta=1.1)
    assert_close(out.loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    assert_close(_masked_metric(out.high_clipped, mask), fake._metrics["train"]["clip_ratio/high_mean"][0])


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.1, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_loss_matches_trl(eps_low, eps_high, seed):
    logps0, old, _, adv, mask, ent = _policy_batch(seed, row_shift=0.6, token_noise=0.05)
    N, T = logps0.shape
    trl_logps = logps0.clone().requires_grad_()
    fake = _FakeTrainer(trl_logps, ent, args=SimpleNamespace(report_to=[]), epsilon_low=eps_low, epsilon_high=eps_high)
    inputs = {
        "prompt_ids": torch.ones(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
        "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_logps": (old * mask).sum(1),  # TRL stores sequence sums
    }
    trl_loss = RLOOTrainer._compute_loss(fake, None, inputs)
    trl_loss.backward()
    ours_logps = logps0.clone().requires_grad_()
    out = rloo_loss(ours_logps, old, adv, mask, eps_low, eps_high)
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-6)
    m = fake._metrics["train"]
    low, high = out.low_clipped.float(), out.high_clipped.float()
    assert_close(low.mean().item(), m["clip_ratio/low_mean"][0], atol=1e-6, rtol=1e-6)
    assert_close(high.mean().item(), m["clip_ratio/high_mean"][0], atol=1e-6, rtol=1e-6)
    assert_close((low + high).clamp(max=1).mean().item(), m["clip_ratio/region_mean"][0], atol=1e-6, rtol=1e-6)
    assert m["clip_ratio/region_mean"][0] > 0


def test_rloo_loss_hand():
    # two sequences; sequence log ratios ln 1.5 (A = 1 -> clipped at 1.2) and ln 0.5 (A = -1 -> clipped at 0.8)
    logps = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    old = torch.tensor([[-math.log(1.5), 0.0], [math.log(2.0), 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = rloo_loss(logps, old, torch.tensor([1.0, -1.0]), mask)
    # -min(1.5, 1.2) = -1.2;  -min(-0.5, -0.8) = 0.8;  mean -0.2
    assert_close(out.loss, torch.tensor(-0.2))
    assert out.high_clipped.tolist() == [True, False] and out.low_clipped.tolist() == [False, True]


# ---- PPO (trl 0.29.1 experimental/ppo/ppo_trainer.py lines 823-845) -----------------------


def test_ppo_policy_loss_hand():
    # ratios [1.5, 0.5, 1.1, (1.0 masked)], A [1, -1, -2, 3], cliprange 0.2:
    #   t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(0.5, 0.8) = 0.8 (clipped); t2: max(2.2, 2.2) = 2.2
    #   loss (-1.2 + 0.8 + 2.2) / 3 = 0.6; clipfrac 2/3
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.0]])
    old = torch.zeros(1, 4)
    logps = ratio.log().requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logps, old, adv, mask, 0.2)
    assert_close(loss, torch.tensor(0.6))
    assert_close(stats["clipfrac"], torch.tensor(2 / 3))
    assert_close(stats["ratio"], torch.tensor(3.1 / 3))
    assert_close(stats["approxkl"], 0.5 * (ratio[0, :3].log() ** 2).mean())
    loss.backward()
    # clipped tokens get no gradient; t2: d(-A r)/dlogp = -A r = 2.2, / 3 tokens
    assert_close(logps.grad, torch.tensor([[0.0, 0.0, 2.2 / 3, 0.0]]))


def test_ppo_value_loss_hand():
    # v [1, 2, 0.5, (5)], v_old [0.9, 1, 0, (0)], R [1, 0, 1, (9)], c = 0.2:
    #   t0: clip(1, 0.7, 1.1) = 1 -> both 0
    #   t1: clip(2, 0.8, 1.2) = 1.2 -> max(4, 1.44) = 4 (clip does not bind)
    #   t2: clip(0.5, -0.2, 0.2) = 0.2 -> max(0.25, 0.64) = 0.64 (clip binds)
    #   loss 0.5 * (0 + 4 + 0.64) / 3; clipfrac 1/3
    v = torch.tensor([[1.0, 2.0, 0.5, 5.0]], requires_grad=True)
    v_old = torch.tensor([[0.9, 1.0, 0.0, 0.0]])
    R = torch.tensor([[1.0, 0.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(v, v_old, R, mask, 0.2)
    assert_close(loss, torch.tensor(0.5 * 4.64 / 3))
    assert_close(clipfrac, torch.tensor(1 / 3))
    loss.backward()
    # t1: d 0.5 (v - R)^2 / 3 = (2 - 0) / 3; t2: the clipped branch is constant in v -> 0
    assert_close(v.grad, torch.tensor([[0.0, 2.0 / 3, 0.0, 0.0]]))


def test_ppo_losses_vs_trl029_formulas():
    """trl 0.29.1 experimental/ppo/ppo_trainer.py lines 823-845, re-stated (mask = ~padding_mask)."""
    g = torch.Generator().manual_seed(0)
    N, T = 4, 6
    mask = torch.arange(T) < torch.tensor([6, 4, 2, 5]).unsqueeze(1)
    new, old = torch.randn(N, T, generator=g) * 0.3, torch.randn(N, T, generator=g) * 0.3
    adv = torch.randn(N, T, generator=g)
    vpred, values, returns = (torch.randn(N, T, generator=g) for _ in range(3))

    def mm(x, m):
        return (x * m).sum() / m.sum()

    ratio = torch.exp(new - old)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2)
    pg_loss = mm(torch.max(pg_losses, pg_losses2), mask)
    vpredclipped = torch.clamp(vpred, values - 0.2, values + 0.2)
    vf1, vf2 = torch.square(vpred - returns), torch.square(vpredclipped - returns)
    vf_loss = 0.5 * mm(torch.max(vf1, vf2), mask)

    loss, stats = ppo_policy_loss(new, old, adv, mask.long(), 0.2)
    assert_close(loss, pg_loss)
    assert_close(stats["clipfrac"], mm((pg_losses2 > pg_losses).float(), mask))
    assert 0 < stats["clipfrac"] < 1
    vloss, vclip = ppo_value_loss(vpred, values, returns, mask.long(), 0.2)
    assert_close(vloss, vf_loss)
    assert_close(vclip, mm((vf2 > vf1).float(), mask))
    assert 0 < vclip < 1


# ----------------------------------------------------------------------------------------------
# 3. Rewards
# ----------------------------------------------------------------------------------------------

_PROMPTS = ["p0", "p1", "p2"]
_COMPLETIONS = ["c0", "c1", "c2"]
_IDS = [[1], [1, 2], [1, 2, 3]]


def reward_with_none(prompts, completions, completion_ids, **kw):
    return [1.0, None, 2]


async def async_reward(prompts, completions, completion_ids, **kw):
    await asyncio.sleep(0)
    return [0.5, 0.5, None]


def column_reward(prompts, completions, completion_ids, answer, **kw):
    return [float(a) for a in answer]


def test_compute_rewards_none_to_nan_async_and_columns():
    out = compute_rewards(
        [reward_with_none, async_reward, column_reward], _PROMPTS, _COMPLETIONS, _IDS, {"answer": [7, 8, 9]}
    )
    assert out.dtype == torch.float32 and out.shape == (3, 3)
    expected = torch.tensor([[1.0, 0.5, 7.0], [NAN, 0.5, 8.0], [2.0, NAN, 9.0]])
    assert_close(out, expected, equal_nan=True)


def _raises(prompts, completions, **kw):
    raise KeyError("boom")


async def _async_raises(prompts, completions, **kw):
    raise ZeroDivisionError("async boom")


def _wrong_count(prompts, completions, **kw):
    return [1.0]


def _returns_none(prompts, completions, **kw):
    return None


def _returns_text(prompts, completions, **kw):
    return [1.0, "high", 0.0]


def _returns_inf(prompts, completions, **kw):
    return [1.0, float("inf"), 0.0]


def _returns_string(prompts, completions, **kw):
    return "1.0"


@pytest.mark.parametrize(
    "func,exc,pattern",
    [
        (_raises, RuntimeError, r"'_raises' raised KeyError.*boom"),
        (_async_raises, RuntimeError, r"'_async_raises' raised ZeroDivisionError.*async boom"),
        (_wrong_count, ValueError, r"'_wrong_count' returned 1 values for 3 completions"),
        (_returns_none, ValueError, r"'_returns_none' returned NoneType"),
        (_returns_string, ValueError, r"'_returns_string' returned str"),
        (_returns_text, ValueError, r"'_returns_text' returned 'high' for completion 1"),
        (_returns_inf, ValueError, r"'_returns_inf' returned inf for completion 1.*finite"),
    ],
)
def test_compute_rewards_errors(func, exc, pattern):
    with pytest.raises(exc, match=pattern):
        compute_rewards([reward_with_none, func], _PROMPTS, _COMPLETIONS, _IDS)


def test_load_reward_func_forms():
    assert load_reward_func("arithmetic_reward") is rewards_pkg.arithmetic_reward
    assert load_reward_func("lit_align.rewards.arithmetic_reward") is rewards_pkg.arithmetic_reward
    assert load_reward_func("lit_align.rewards.arithmetic:arithmetic_format_reward") is rewards_pkg.arithmetic_format_reward
    assert load_reward_func(reward_with_none) is reward_with_none
    f = load_reward_func(
        {"class_path": "lit_align.rewards.SoftOverlongPunishment", "init_args": {"max_completion_len": 8, "soft_punish_cache": 4}}
    )
    assert isinstance(f, SoftOverlongPunishment)
    assert (f.max_completion_len, f.soft_punish_cache) == (8, 4)
    assert f(completion_ids=[[0] * 6]) == [-0.5]
    assert reward_name(f) == "soft_overlong_punishment_reward"  # TRL's name
    # the loaded functions are usable by compute_rewards
    out = compute_rewards([load_reward_func("arithmetic_format_reward"), f], ["q"], ["Answer: 3"], [[1, 2]])
    assert_close(out, torch.tensor([[1.0, 0.0]]))


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("lit_align.rewards.no_such_reward", r"'lit_align.rewards.no_such_reward'.*cannot import 'no_such_reward'"),
        ("no_such_module_xyz:f", r"'no_such_module_xyz:f'.*cannot import 'f' from 'no_such_module_xyz'"),
        ("no_such_bare_reward", r"'no_such_bare_reward'"),
        ({"class_path": "lit_align.rewards.NoSuchClass"}, r"NoSuchClass"),
        ({"init_args": {}}, r"class_path"),
    ],
)
def test_load_reward_func_unknown(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_reward_func(spec)


@pytest.mark.parametrize("max_len,cache", [(10, 4), (10, 10), (5, 1), (1, 1)])
def test_soft_overlong_punishment_matches_trl(max_len, cache):
    ids = [[7] * n for n in range(0, max_len + 5)]
    ours = SoftOverlongPunishment(max_len, cache)(completion_ids=ids)
    theirs = get_soft_overlong_punishment(max_len, cache)(completion_ids=ids)
    assert ours == theirs


def test_soft_overlong_punishment_hand():
    f = SoftOverlongPunishment(max_completion_len=10, soft_punish_cache=4)
    # free up to 6 tokens; 8 tokens: (6 - 8) / 4 = -0.5; 10: -1; beyond: -1
    assert f(completion_ids=[[0] * 6, [0] * 7, [0] * 8, [0] * 10, [0] * 11]) == [0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        SoftOverlongPunishment(4, 5)


def test_soft_overlong_punishment_zero_cache_like_trl():
    ids = [[7] * n for n in range(0, 8)]
    assert SoftOverlongPunishment(5, 0)(completion_ids=ids) == get_soft_overlong_punishment(5, 0)(completion_ids=ids)


def test_length_penalty():
    f = LengthPenalty(max_length=4, coef=0.5)
    # -0.5 * len / 4
    assert f(completion_ids=[[], [1, 2], [1] * 4, [1] * 6]) == [0.0, -0.25, -0.5, -0.75]
    assert reward_name(f) == "length_penalty"
    assert_close(compute_rewards([f], ["p"], ["c"], [[1, 2, 3]]), torch.tensor([[-0.375]]))
    with pytest.raises(ValueError, match="max_length"):
        LengthPenalty(0)


def test_kl_penalised_rewards_hand():
    """PPO's per-token reward: -kl_coef * KL on every completion token, the score on the last one."""
    from lit_align.losses.advantages import kl_penalised_rewards

    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.0, -0.1 - 1.0, 0.0]]))
    r = -0.5  # k3 of the first token: log ref - log p
    _, k3 = kl_penalised_rewards(torch.zeros(2), logps, ref, mask, kl_coef=0.1, estimator="k3")
    assert_close(k3[0, 0], torch.tensor(math.exp(r) - 1 - r))
