"""The shared-prompt layout of rollouts (``shared_prompt_forward``): each prompt once per group of completions.

It must change nothing but the cost: the same log-probs, entropies, gradients, losses and weights as
one row per completion, for every online method that reads the rollout's sequences.
"""

import pytest
import torch
from torch.testing import assert_close

from lit_align import GRPO, PPO, RLOO, PromptOnlyDataModule
from lit_align.models.builtin import builtin_model
from lit_align.ops.completions import (
    completion_batch,
    completion_logprobs,
    shared_prompt_batch,
    target_positions,
)
from lit_align.ops.packing import shared_prompt_attention
from tests.test_online import DATA, fit, random_rollout, scripted

PAD = 256


def grouped_rollout(seed: int, prompts: int = 3, group: int = 4):
    """``prompts`` groups of ``group`` rows with one prompt each (left-padded, lengths differing) and
    completions of varied lengths; the last group one row short, as a rollout sliced across steps."""
    p_ids, p_mask, c_ids, c_mask = random_rollout(seed, n=prompts * group)
    p_ids = p_ids[::group].repeat_interleave(group, 0)[:-1]
    p_mask = p_mask[::group].repeat_interleave(group, 0)[:-1]
    return p_ids, p_mask, c_ids[:-1], c_mask[:-1]


def test_the_layout_by_hand():
    prompt_ids = torch.tensor([[PAD, 5, 6], [PAD, 5, 6], [7, 8, 9]])
    prompt_mask = (prompt_ids != PAD).long()
    completion_ids = torch.tensor([[10, 11, PAD], [12, PAD, PAD], [13, 14, 15]])
    completion_mask = (completion_ids != PAD).long()
    batch = shared_prompt_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, PAD)
    assert batch.input_ids.tolist() == [[5, 6, 10, 11, 12, PAD], [7, 8, 9, 13, 14, 15]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 0, 1, -1], [2, 2, 2, 2, 2, 2]]
    assert batch.shared_prompt.int().tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert batch.completion_mask.int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert (batch.num_sequences, batch.num_tokens) == (3, 11)
    sees = shared_prompt_attention(batch)[0, 0].int().tolist()
    assert sees == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # the second completion sees the prompt and itself, not the first completion
        [0, 0, 0, 0, 0, 1],  # padding sees itself only
    ]
    shuffled_rows = shared_prompt_batch(prompt_ids[[0, 2, 1]], prompt_mask[[0, 2, 1]], completion_ids[[0, 2, 1]],
                                        completion_mask[[0, 2, 1]], PAD)
    assert shuffled_rows.input_ids.tolist() == [[5, 6, 10, 11, 12, PAD], [7, 8, 9, 13, 14, 15]]
    assert shuffled_rows.sequence_ids.tolist() == [[0, 0, 0, 0, 2, -1], [1, 1, 1, 1, 1, 1]]
    source, target = target_positions(batch)
    # 10 from 6 (the prompt's last token), 11 from 10, 12 from 6 again; row 2: 13 from 9, 14, 15
    assert target.tolist() == [2, 3, 4, 9, 10, 11] and source.tolist() == [1, 2, 1, 8, 9, 10]


def reference_positions(batch):
    """A loop: each completion token of a sequence and the token before it in that sequence (the row's
    prompt before its first token)."""
    source, target = [], []
    width = batch.input_ids.size(1)
    for r in range(batch.input_ids.size(0)):
        last = {}
        prompt_end = int(batch.shared_prompt[r].sum()) - 1 if batch.shared_prompt is not None else None
        for t in range(width):
            s = int(batch.sequence_ids[r, t])
            if s >= 0 and batch.completion_mask[r, t]:
                before = last.get(s, prompt_end if prompt_end is not None and t > prompt_end else None)
                if before is not None:
                    source.append(r * width + before)
                    target.append(r * width + t)
            if s >= 0:
                last[s] = t
    return source, target


def shuffled(rollout, seed: int = 0):
    """The rows in a random order, as a rollout sliced across training steps serves them."""
    order = torch.randperm(len(rollout[0]), generator=torch.Generator().manual_seed(seed))
    return tuple(t[order] for t in rollout)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("order", ["grouped", "shuffled"])
def test_target_positions_match_a_loop(shared, order):
    rollout = grouped_rollout(3) if order == "grouped" else shuffled(grouped_rollout(3))
    batch = (shared_prompt_batch if shared else completion_batch)(*rollout, PAD)
    source, target = target_positions(batch)
    assert (source.tolist(), target.tolist()) == reference_positions(batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("order", ["grouped", "shuffled"])
def test_log_probs_entropies_and_gradients_equal_one_row_per_completion(attn, temperature, order):
    model = builtin_model("builtin:tiny")
    model.config._attn_implementation = attn
    rollout = grouped_rollout(5) if order == "grouped" else shuffled(grouped_rollout(5))
    cmask = rollout[3]
    outs = []
    for batch in (completion_batch(*rollout, PAD), shared_prompt_batch(*rollout, PAD)):
        model.zero_grad()
        logps, entropy = completion_logprobs(model, batch, cmask, temperature=temperature, chunk_size=5, with_entropy=True)
        (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum().backward()
        outs.append((logps.detach(), entropy, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (a, ea, ga), (b, eb, gb) = outs
    assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert_close(eb, ea, atol=1e-5, rtol=1e-5)
    for k in ga:
        assert_close(gb[k], ga[k], atol=1e-5, rtol=1e-4, msg=k)
    shared = shared_prompt_batch(*rollout, PAD)
    assert shared.input_ids.size(0) == 3 and shared.input_ids.numel() < completion_batch(*rollout, PAD).input_ids.numel()


def sgd(lr: float):
    """Plain SGD for comparing weights: Adam divides by the gradient's own size, so where a gradient is
    rounding noise around zero it turns 1e-9 of difference into a step of ``lr``."""
    return lambda params: torch.optim.SGD(params, lr=lr)


def train_both(cls, steps, batch_size, **kwargs):
    results = []
    for shared in (False, True):
        torch.manual_seed(0)
        module = cls(shared_prompt_forward=shared, **kwargs)
        before = module.configure_model() or {k: v.clone() for k, v in module.model.state_dict().items()}
        callbacks = [] if cls is PPO else [scripted(module)[0]]
        _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=batch_size), steps=steps, callbacks=callbacks)
        after = {k: v.clone() for k, v in module.model.state_dict().items()}
        assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-3  # the steps moved the weights
        results.append((record.metrics, after))
    return results


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (GRPO, {"num_generations": 4, "beta": 0.04, "num_iterations": 2, "loss_type": "dapo"}),
        (RLOO, {"num_generations": 4, "beta": 0.05}),
    ],
)
def test_training_is_the_same_with_the_prompt_shared(cls, kwargs):
    """Old log-probs (num_iterations), the reference's and the policy's forward, over three optimizer steps."""
    (m0, w0), (m1, w1) = train_both(cls, 3, 8, reward_funcs=["arithmetic_reward"], max_completion_length=16,
                                    optimizer=sgd(1.0), **kwargs)
    for a, b in zip(m0, m1):
        assert a.keys() == b.keys()
        for k in a:  # num_tokens counts each completion's prompt, as TRL, in both layouts
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    for k in w0:
        assert_close(w1[k], w0[k], atol=1e-5, rtol=1e-4, msg=k)


def test_ppo_policy_and_value_are_the_same_with_the_prompt_shared():
    (m0, w0), (m1, w1) = train_both(PPO, 2, 8, reward_model_name_or_path="builtin:tiny", value_model_name_or_path="builtin:tiny",
                                    num_ppo_epochs=1, num_mini_batches=2, max_completion_length=8, optimizer=sgd(1.0))
    for k in ("train/loss/policy_avg", "train/loss/value_avg", "train/objective/kl"):
        assert m1[-1][k] == pytest.approx(m0[-1][k], rel=1e-4, abs=1e-5), k
    for k in w0:
        assert_close(w1[k], w0[k], atol=1e-5, rtol=1e-4, msg=k)


def test_what_the_layout_refuses():
    rollout = list(grouped_rollout(1))
    rollout[1] = rollout[1].clone()
    rollout[1][0] = 0  # a row without a prompt
    with pytest.raises(ValueError, match="needs a prompt in every row"):
        shared_prompt_batch(*rollout, PAD)
    model = builtin_model("builtin:tiny")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="needs attn_implementation sdpa or eager, not 'flash_attention_2'"):
        completion_logprobs(model, shared_prompt_batch(*grouped_rollout(1), PAD), grouped_rollout(1)[3])
