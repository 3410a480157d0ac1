"""Online-method losses, advantages and reward plumbing, checked by hand and against TRL 1.16.

- ``lit_align.losses.advantages``: hand-derived values, NaN handling, loop references, and a
  re-statement of TRL's advantage code (TRL computes them inline, not in a callable function);
- ``lit_align.losses.policy``: the real ``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss``
  called as unbound functions on a fake trainer, loss + gradient + logged clip/KL metrics; LUSPO,
  VESPO, the entropy bonus (fixed and adaptive) and, from ``lit_align.losses.importance``, the
  sampler's importance-sampling correction (every mode) and the off-policy mask, by hand and
  against TRL;
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
from lit_align.losses.importance import (
    IMPORTANCE_SAMPLING_MODES,
    SamplerCorrection,
    importance_sampling_ratio,
    off_policy_mask,
    sampling_metrics,
    sampling_stats,
)
from lit_align.losses.policy import (
    GRPO_LOSS_TYPES,
    NORMALISATIONS,
    SURROGATES,
    AdaptiveEntropy,
    GRPOLossConfig,
    GRPOLossType,
    entropy_bonus,
    entropy_mask,
    grpo_loss,
    k3_kl,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_loss,
    vespo_weights,
)
from lit_align.rewards import LengthPenalty, SoftOverlongPunishment, compute_rewards, load_reward_func
from lit_align.rewards.registry import reward_name

NAN = float("nan")


def grpo(logps, old_logps, advantages, mask, ref_logps=None, token_mask=None, num_items=None,
         importance_sampling_ratio=None, off_policy_mask=None, **settings):
    """``grpo_loss`` with its settings given as TRL-named keywords."""
    return grpo_loss(logps, old_logps, advantages, mask, GRPOLossConfig(**settings), ref_logps=ref_logps,
                     token_mask=token_mask, num_items=num_items, importance_sampling_ratio=importance_sampling_ratio,
                     off_policy_mask=off_policy_mask)
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
        # luspo: per-sequence sums [-2 | -2], then their mean
        ("luspo", {}, (-2.0 + -2.0) / 2),
        # vespo: w = 1 -> phi = e^(lam + k * 0 - lam * 1) = 1, so -phi A logp = 0.5 A; dapo's normaliser
        ("vespo", {"num_items": 3}, 2.0 / 3),
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


VESPO_DEFAULTS = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}  # TRL's


class _FakeTrainer:
    """The attributes ``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss`` read."""

    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask  # TRL's real methods
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

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
        steps_per_generation=1, report_to=[], **VESPO_DEFAULTS,
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
        num_items=mask.sum() if loss_type in ("dapo", "cispo", "vespo") else None,
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
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        low, high = out.low_clipped, out.high_clipped
        assert_close(_masked_metric(low, mask), m["clip_ratio/low_mean"][0], atol=1e-6, rtol=1e-6)
        assert_close(_masked_metric(high, mask), m["clip_ratio/high_mean"][0], atol=1e-6, rtol=1e-6)
        assert_close(_masked_metric(low | high, mask), m["clip_ratio/region_mean"][0], atol=1e-6, rtol=1e-6)
        # the batch is built so that clipping actually happens on both sides
        assert m["clip_ratio/low_mean"][0] > 0 and m["clip_ratio/high_mean"][0] > 0
    elif loss_type == "cispo":
        assert_close(_masked_metric(out.high_clipped, mask), m["cispo_clip_ratio"][0], atol=1e-6, rtol=1e-6)
        assert m["cispo_clip_ratio"][0] > 0
    elif loss_type == "vespo":
        assert_close(_masked_metric(out.phi, mask), m["vespo/phi_seq_mean"][0], atol=1e-6, rtol=1e-6)
        assert 0 < m["vespo/phi_seq_mean"][0] < 1


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


# ---- LUSPO, VESPO, the entropy bonus, the sampler correction (TRL 1.16) -------------------------


def test_vespo_weights_hand():
    cfg = GRPOLossConfig(loss_type="vespo")  # k_pos 2, lambda_pos 3, k_neg 3, lambda_neg 2
    log_ratio = torch.tensor([[0.2, 0.3, 9.0]])  # the 9 is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = math.exp(0.5)  # the sequence ratio is the product of the token ratios: log w = 0.2 + 0.3
    # phi(w) = exp(lambda + k log w - lambda w)
    assert_close(vespo_weights(log_ratio, torch.tensor([[1.0]]), mask, None, cfg), torch.tensor([[math.exp(3 + 2 * 0.5 - 3 * w)]]))
    assert_close(vespo_weights(log_ratio, torch.tensor([[-1.0]]), mask, None, cfg), torch.tensor([[math.exp(2 + 3 * 0.5 - 2 * w)]]))
    # phi(1) = 1; the sampler's ratios multiply w (padding included, as TRL: its ratio is 1 there)
    assert_close(vespo_weights(torch.zeros(1, 3), torch.tensor([[0.5]]), mask, None, cfg), torch.ones(1, 1))
    ratio = torch.tensor([[2.0, 1.0, 1.0]])
    lw = 0.5 + math.log(2.0)
    assert_close(vespo_weights(log_ratio, torch.tensor([[1.0]]), mask, ratio, cfg),
                 torch.tensor([[math.exp(3 + 2 * lw - 3 * math.exp(lw))]]))
    # a masked-out sampler ratio (0) puts log w at its floor, log 1e-8
    floor = math.log(1e-8)
    phi = vespo_weights(log_ratio, torch.tensor([[1.0]]), mask, torch.tensor([[0.0, 1.0, 1.0]]), cfg)
    assert_close(phi, torch.tensor([[math.exp(3 + 2 * floor - 3 * 1e-8)]]))
    # the loss: -phi A logp, phi without gradient -> d/dlogp = -phi A on the mask
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = logps.detach() - log_ratio
    out = grpo(logps, old, torch.tensor([1.0]), mask, loss_type="vespo", num_items=2)
    phi = math.exp(3 + 2 * 0.5 - 3 * w)
    assert_close(out.loss, torch.tensor(-phi * (-1.0 - 2.0) / 2))
    out.loss.backward()
    assert_close(logps.grad, torch.tensor([[-phi / 2, -phi / 2, 0.0]]))


def test_luspo_weighs_sequences_by_length_hand():
    # ratio 1, A = [1, 1]: per-token loss -1; row 0 has 3 tokens, row 1 one -> sums [-3, -1], mean -2
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = grpo(logps, logps.detach(), torch.tensor([1.0, 1.0]), mask, loss_type="luspo", importance_sampling_level="sequence")
    assert_close(out.loss, torch.tensor(-2.0))
    out.loss.backward()
    # sequence ratio exp(mean log ratio): d/dlogp_t = -A / len_i per token, times len_i from the sum, / N = 2
    assert_close(logps.grad, torch.tensor([[-0.5, -0.5, -0.5], [-0.5, 0.0, 0.0]]))


def _is_batch():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    sampling = torch.tensor([[-1.5, -1.0, 9.0], [NAN, -1.2, 5.0]])  # NaN: a token the sampler could not score
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    return old, sampling, mask


@pytest.mark.parametrize(
    "mode,clip,expected",
    [
        # per-token log ratios on the mask: [0.5, -1 | 0 (NaN), 0.2]; padding 0 -> ratio 1
        ("token_truncate", (0.5, 1.5), [[1.5, 0.5, 1.0], [1.0, math.exp(0.2), 1.0]]),
        ("token_mask", (0.5, 1.5), [[0.0, 0.0, 1.0], [1.0, math.exp(0.2), 1.0]]),
        ("token_mask", (None, 1.5), [[0.0, math.exp(-1.0), 1.0], [1.0, math.exp(0.2), 1.0]]),
        # sequence ratios: exp(0.5 - 1) and exp(0.2)
        ("sequence_truncate", (0.7, 1.5), [[0.7], [math.exp(0.2)]]),
        ("sequence_truncate", (None, 1.1), [[math.exp(-0.5)], [1.1]]),
        ("sequence_mask", (0.7, 1.5), [[0.0], [math.exp(0.2)]]),
        ("sequence_mask", (0.1, None), [[math.exp(-0.5)], [math.exp(0.2)]]),
    ],
)
def test_importance_sampling_ratio_hand(mode, clip, expected):
    old, sampling, mask = _is_batch()
    cfg = SamplerCorrection(True, mode, *clip)
    assert_close(importance_sampling_ratio(old, sampling, mask, cfg), torch.tensor(expected))


def test_sampling_stats_and_metrics_hand():
    old, sampling, mask = _is_batch()
    cfg = SamplerCorrection(True, "token_mask", 0.5, 1.5)
    ratio = importance_sampling_ratio(old, sampling, mask, cfg)
    # |old - sampling| on the scored mask tokens: [0.5, 1.0, 0.2] (the NaN left out)
    # ratios on the mask: [0, 0, 1, e^0.2]
    e = math.exp(0.2)
    stats = sampling_stats(old, sampling, mask, ratio, cfg)
    assert_close(stats, torch.tensor([1.7 / 3, 1.0, 0.0, (1 + e) / 4, e]))
    # sequence level: every row's ratio counts, masked or not
    seq = SamplerCorrection(True, "sequence_mask", 0.7, 1.5)
    stats = sampling_stats(old, sampling, mask, importance_sampling_ratio(old, sampling, mask, seq), seq)
    assert_close(stats[2:], torch.tensor([0.0, e / 2, e]))
    # nothing on the mask: zeros, as TRL
    assert_close(sampling_stats(old, sampling, torch.zeros_like(mask), ratio, cfg), torch.zeros(5))
    # two devices: mean of means, max of maxes, min of mins; NaN ignored for the ratio
    m = sampling_metrics(torch.tensor([[1.0, 2.0, 0.5, 1.0, 3.0], [3.0, 5.0, NAN, 2.0, 1.0]]))
    assert {k: float(v) for k, v in m.items()} == {
        "sampling/sampling_logp_difference/mean": 2.0, "sampling/sampling_logp_difference/max": 5.0,
        "sampling/importance_sampling_ratio/min": 0.5, "sampling/importance_sampling_ratio/mean": 1.5,
        "sampling/importance_sampling_ratio/max": 3.0,
    }


def test_sampler_correction_settings_are_checked():
    assert SamplerCorrection() == SamplerCorrection(True, "sequence_mask", None, 3.0)  # TRL's defaults
    with pytest.raises(ValueError, match=r"vllm_importance_sampling_mode must be one of .*'token_truncate'.*'tok'"):
        SamplerCorrection(mode="tok")
    with pytest.raises(ValueError, match=r"clip_min \(2.0\) must be less than vllm_importance_sampling_clip_max \(2.0\)"):
        SamplerCorrection(clip_min=2.0, clip_max=2.0)
    with pytest.raises(ValueError, match=r"At least one of .* must be set when .* is a `\*_truncate` mode"):
        SamplerCorrection(mode="token_truncate", clip_min=None, clip_max=None)
    SamplerCorrection(False, "token_truncate", None, None)  # off: nothing to clip
    SamplerCorrection(True, "token_mask", None, None)  # masks nothing, as TRL allows
    with pytest.raises(ValueError, match="VESPO loss requires .* 'token_truncate' or 'token_mask'. Got: sequence_mask"):
        SamplerCorrection().check_vespo()
    assert set(IMPORTANCE_SAMPLING_MODES) == {"token_truncate", "token_mask", "sequence_truncate", "sequence_mask"}


def test_off_policy_mask_hand():
    logps = torch.zeros(4, 2)
    # mean KL (sampling - logp) per row: 0.6, 0.6, 0.1, 0.5 (the NaN counts as 0, the padding not at all)
    sampling = torch.tensor([[0.6, 0.6], [0.4, 0.8], [0.2, NAN], [0.5, 7.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0])
    # keep: A >= 0 (row 0) or KL <= 0.5 (rows 2, 3); drop row 1
    keep = off_policy_mask(adv, logps, sampling, mask, 0.5)
    assert keep.shape == (4, 1) and keep.squeeze(1).tolist() == [1.0, 0.0, 1.0, 1.0]
    out = grpo(logps, logps, adv, mask, loss_type="bnpo", off_policy_mask=keep)
    # ratio 1: per-token -A, row 1 dropped: (-1 -1 + 1 + 1 + 1) / 7
    assert_close(out.loss, torch.tensor(1.0 / 7))


def test_entropy_bonus_hand():
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bonus = entropy_bonus(entropy, mask)
    assert_close(bonus, torch.tensor(2.0))  # (1 + 2 + 3) / 3
    bonus.backward()
    assert_close(entropy.grad, mask.float() / 3)
    assert_close(entropy_bonus(entropy, torch.zeros_like(mask)), torch.tensor(0.0))


def test_adaptive_entropy_hand():
    c = AdaptiveEntropy(0.01, adaptive=True, coef_min=0.0, coef_max=0.02, delta=0.005, target=1.0)
    assert c.enabled and c.applied == 0.0  # no measurement yet: no bonus
    c.update(0.5)  # at or below the target: up, and applied
    assert (c.coef, c.applied) == (pytest.approx(0.015), pytest.approx(0.015))
    c.update(1.0)
    c.update(0.9)  # capped at coef_max
    assert c.coef == pytest.approx(0.02) and c.last_world_entropy == 0.9
    c.update(2.0)  # above: down, and not applied
    assert (c.coef, c.applied) == (pytest.approx(0.015), 0.0)
    for _ in range(5):
        c.update(3.0)
    assert c.coef == 0.0 and c.enabled  # at coef_min, still on, so it can come back
    # the window: token-weighted over micro-batches, summed over devices by global_sum
    c.observe(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 1.0]]))
    c.observe(torch.tensor([[0.0, 5.0]]), torch.tensor([[1.0, 0.0]]))
    c.end_step(lambda t: 2 * t)  # two devices with the same window: the same mean, (1 + 3 + 0) / 3
    assert c.last_world_entropy == pytest.approx(4 / 3) and c.window is None and c.coef == 0.0
    state = c.state_dict()
    assert state == {"entropy_coef": 0.0, "last_world_entropy": pytest.approx(4 / 3)}
    other = AdaptiveEntropy(0.5, adaptive=True)
    other.load_state_dict(state)
    assert (other.coef, other.last_world_entropy) == (0.0, pytest.approx(4 / 3))
    # fixed: always the coefficient, no window
    fixed = AdaptiveEntropy(0.1)
    fixed.observe(torch.ones(1, 2), torch.ones(1, 2))
    fixed.end_step()
    assert (fixed.applied, fixed.window, fixed.enabled) == (0.1, None, True) and not AdaptiveEntropy().enabled
    with pytest.raises(ValueError, match=r"entropy_coef_min \(0.5\) must be <= entropy_coef_max \(0.1\)"):
        AdaptiveEntropy(adaptive=True, coef_min=0.5, coef_max=0.1)
    with pytest.raises(ValueError, match="entropy_coef_delta must be >= 0"):
        AdaptiveEntropy(adaptive=True, delta=-0.1)
    with pytest.raises(ValueError, match="entropy_coef must be finite"):
        AdaptiveEntropy(float("nan"))


def _trl_inputs(mask, adv, **extra):
    N, T = mask.shape
    return {"prompt_ids": torch.ones(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
            "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
            "num_items_in_batch": mask.sum(), **extra}


def _trl_fake(logps, ent, loss_type, **attrs):
    args = SimpleNamespace(use_bias_correction_kl=True, delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                           steps_per_generation=1, report_to=[], **VESPO_DEFAULTS, **attrs.pop("args", {}))
    return _FakeTrainer(logps, ent, args=args, loss_type=loss_type, importance_sampling_level=attrs.pop("level", "token"),
                        beta=0.0, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=logps.shape[1], **attrs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "vespo"])
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_entropy_bonus_matches_trl(loss_type, top_entropy_quantile, accumulation):
    """loss - coef * H, H the mean entropy over the loss's tokens; TRL divides by the accumulation
    itself, Lightning divides lit-align's returned loss: the same gradients."""
    logps0, old, _, adv, mask, ent0 = _policy_batch(0)
    coef = 0.05
    trl_logps, trl_ent = logps0.clone().requires_grad_(), ent0.clone().requires_grad_()
    fake = _trl_fake(trl_logps, trl_ent, loss_type, top_entropy_quantile=top_entropy_quantile, _entropy_bonus_enabled=True,
                     entropy_coef=coef, use_adaptive_entropy=False, current_gradient_accumulation_steps=accumulation)
    trl_loss = GRPOTrainer._compute_loss(fake, None, _trl_inputs(mask, adv, old_per_token_logps=old))
    trl_loss.backward()

    logps, ent = logps0.clone().requires_grad_(), ent0.clone().requires_grad_()
    token_mask, effective = None, mask
    if top_entropy_quantile < 1.0:
        token_mask = entropy_mask(ent0, mask, torch.quantile(ent0[mask.bool()], 1 - top_entropy_quantile))
        effective = mask * token_mask
    out = grpo(logps, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, token_mask=token_mask,
               num_items=mask.sum())
    control = AdaptiveEntropy(coef)
    loss = (out.loss - control.applied * entropy_bonus(ent, effective)) / accumulation  # Lightning's division
    loss.backward()
    assert_close(loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    assert_close(logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-6)
    assert_close(ent.grad, trl_ent.grad, atol=1e-6, rtol=1e-6)
    assert ent.grad.abs().sum() > 0
    m = fake._metrics["train"]
    assert m["entropy_coef"] == [coef]
    if accumulation == 1 or loss_type not in ("dapo", "vespo"):  # TRL's dapo-family policy_loss is pre-divided
        assert_close(out.loss.item(), m["policy_loss"][0], atol=1e-6, rtol=1e-6)


def test_adaptive_entropy_matches_trl():
    """Three optimizer steps of two micro-batches (different token counts) through TRL's controller
    and :class:`AdaptiveEntropy`: the same losses, gradients and coefficients, step after step."""
    args = {"entropy_target": 1.2, "entropy_coef_min": 0.0, "entropy_coef_max": 0.03, "entropy_coef_delta": 0.01}
    control = AdaptiveEntropy(0.02, adaptive=True, coef_min=0.0, coef_max=0.03, delta=0.01, target=1.2)
    fake = None
    seen = []
    for step, scale in enumerate([0.5, 1.5, 0.6]):
        for micro, N in enumerate([6, 3]):
            logps0, old, _, adv, mask, ent0 = _policy_batch(10 * step + micro, N=N)
            ent0 = ent0 * scale
            trl_logps, trl_ent = logps0.clone().requires_grad_(), ent0.clone().requires_grad_()
            attrs = {"_per_token_logps": trl_logps, "_entropies": trl_ent}
            if fake is None:
                fake = _trl_fake(trl_logps, trl_ent, "grpo", args=args, _entropy_bonus_enabled=True, entropy_coef=0.02,
                                 use_adaptive_entropy=True, _last_world_entropy=float("inf"), _entropy_window_stats=None,
                                 current_gradient_accumulation_steps=2)
            fake.__dict__.update(attrs)
            fake.accelerator.sync_gradients = micro == 1
            trl_loss = GRPOTrainer._compute_loss(fake, None, _trl_inputs(mask, adv, old_per_token_logps=old))
            trl_loss.backward()

            logps, ent = logps0.clone().requires_grad_(), ent0.clone().requires_grad_()
            out = grpo(logps, old, adv, mask, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28)
            control.observe(ent, mask)
            loss = (out.loss - control.applied * entropy_bonus(ent, mask)) / 2
            loss.backward()
            assert_close(loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
            assert_close(ent.grad, trl_ent.grad, atol=1e-7, rtol=1e-6)
            assert_close(logps.grad, trl_logps.grad, atol=1e-7, rtol=1e-6)
        control.end_step()
        assert control.coef == pytest.approx(fake.entropy_coef, abs=1e-12)
        assert control.last_world_entropy == pytest.approx(fake._last_world_entropy, rel=1e-6)
        seen.append((control.coef, control.applied))
    # below the target (coef up, applied), above (down, off), below again (up, applied)
    assert seen == [(pytest.approx(0.03), pytest.approx(0.03)), (pytest.approx(0.02), 0.0),
                    (pytest.approx(0.03), pytest.approx(0.03))]
    assert fake._metrics["train"]["entropy_coef"] == [pytest.approx(c) for c, _ in seen]


def _trl_importance_sampling_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 ``GRPOTrainer._generate_and_score_completions``, grpo_trainer.py lines 2660-2707
    (the vLLM importance-sampling ratio), re-stated verbatim with ``self.`` attributes as arguments,
    and the ``sampling/*`` metrics of lines 2860-2895 on one process."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    delta = torch.abs(old - sampling)
    bool_mask = mask.bool()
    delta = delta[bool_mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[bool_mask]
    metrics = {
        "sampling/sampling_logp_difference/mean": torch.mean(delta).item(),
        "sampling/sampling_logp_difference/max": torch.max(delta).item(),
        "sampling/importance_sampling_ratio/min": torch.min(flat).item(),
        "sampling/importance_sampling_ratio/mean": torch.mean(flat).item(),
        "sampling/importance_sampling_ratio/max": torch.max(flat).item(),
    }
    return ratio, metrics


def _sampler_batch(seed):
    logps0, old, _, adv, mask, ent = _policy_batch(seed, row_shift=0.3, token_noise=0.1)
    g = torch.Generator().manual_seed(100 + seed)
    sampling = old + 0.4 * torch.randn(old.shape, generator=g)  # the sampler's copy disagrees a little
    sampling[0, 1] = NAN  # a token it could not score
    sampling[2, 4] = NAN  # ... and one in the padding
    return logps0, old, sampling, adv, mask, ent


@pytest.mark.parametrize("clip", [(None, 3.0), (0.8, 1.25)])
@pytest.mark.parametrize("mode,loss_type", [  # TRL refuses VESPO with a sequence-level correction
    (mode, loss_type) for mode in IMPORTANCE_SAMPLING_MODES for loss_type in ("grpo", "dapo", "vespo")
    if not (loss_type == "vespo" and mode.startswith("sequence"))])
def test_sampler_correction_matches_trl(mode, loss_type, clip):
    logps0, old, sampling, adv, mask, ent = _sampler_batch(0)
    trl_ratio, trl_metrics = _trl_importance_sampling_ratio(old, sampling, mask, mode, *clip)
    cfg = SamplerCorrection(True, mode, *clip)
    ratio = importance_sampling_ratio(old, sampling, mask, cfg)
    assert_close(ratio, trl_ratio, atol=0, rtol=0)
    if clip == (0.8, 1.25):  # the bounds bind on both sides
        inside = (ratio > 0.8) & (ratio < 1.25) if mode.endswith("truncate") else (ratio > 0)
        assert 0 < inside.float().mean() < 1
    metrics = sampling_metrics(sampling_stats(old, sampling, mask, ratio, cfg)[None])
    assert {k: pytest.approx(v.item(), rel=1e-6) for k, v in metrics.items()} == trl_metrics

    trl_logps = logps0.clone().requires_grad_()
    fake = _trl_fake(trl_logps, ent, loss_type, use_vllm=True, vllm_importance_sampling_correction=True)
    inputs = _trl_inputs(mask, adv, old_per_token_logps=old, sampling_per_token_logps=sampling,
                         importance_sampling_ratio=trl_ratio)
    trl_loss = GRPOTrainer._compute_loss(fake, None, inputs)
    trl_loss.backward()
    logps = logps0.clone().requires_grad_()
    out = grpo(logps, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, num_items=mask.sum(),
               importance_sampling_ratio=ratio)
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    assert_close(logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-6)
    # the correction changes the loss
    plain = grpo(logps0, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, num_items=mask.sum())
    assert not torch.allclose(plain.loss, out.loss)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo"])
@pytest.mark.parametrize("sampler", [True, False])
@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_off_policy_mask_matches_trl(loss_type, sampler, threshold):
    """With a sampler that is not the trained model TRL reads its log-probs, else the old ones."""
    logps0, old, sampling, adv, mask, ent = _sampler_batch(1)
    trl_logps = logps0.clone().requires_grad_()
    fake = _trl_fake(trl_logps, ent, loss_type, off_policy_mask_threshold=threshold)
    extra = {"sampling_per_token_logps": sampling} if sampler else {}
    trl_loss = GRPOTrainer._compute_loss(fake, None, _trl_inputs(mask, adv, old_per_token_logps=old, **extra))
    trl_loss.backward()
    logps = logps0.clone().requires_grad_()
    keep = off_policy_mask(adv, logps, sampling if sampler else old, mask, threshold)
    assert 0 < keep.sum() < len(keep)  # some negative-advantage completions dropped, not all
    out = grpo(logps, old, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, num_items=mask.sum(),
               off_policy_mask=keep)
    out.loss.backward()
    assert_close(out.loss, trl_loss.detach(), atol=1e-6, rtol=1e-6)
    assert_close(logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-6)


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
    from lit_align.rewards.model import RewardModelScorer

    hub = load_reward_func("Skywork/Skywork-Reward-V2-Qwen3-0.6B")  # a Hub reward model, as TRL reads the string
    assert isinstance(hub, RewardModelScorer) and hub.name_or_path == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
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
