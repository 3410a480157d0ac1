"""Multi-turn rollouts (``tools``, ``environment_factory``) for PPO, OnlineDPO, NashMD and XPO: every sample
goes through the tool turns, continued by the model that began it; a tool result's tokens never count (no
gradient, value loss, KL, reward or log-prob mass; PPO's GAE runs over the model's tokens, checked by hand);
TRL's tool metrics are logged; and Llama 3's one-call-per-message rule answers with an error, not a crash.
A scripted engine plays every model: it calls ``add`` first and answers once a tool result is in its context."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_align import PPO, XPO, NashMD, OnlineDPO, PromptOnlyDataModule, RolloutCallback
from lit_align.ops.model_tokens import compact, expand, model_token_order
from lit_align.rewards.judges import RewardJudge
from lit_align.rollout.engines import Generations
from lit_align.rollout.mixture import GeometricMixture
from lit_align.rollout.tools import LLAMA3_SINGLE_CALL, Toolbox, parse_tool_calls
from lit_align.rollout.types import Rollout
from tests.scripted_engine import ToolCaller, add
from tests.test_online import adamw
from tests.test_tool_use import DATA, Counter, template_file


class Spy(ToolCaller):
    """The scripted tool caller, also noting which model each call sampled and whether a tool result was in
    its context (a continuation)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, model, prompt_ids, prompt_mask, sampling):
        before = len(self.contexts)
        gens = super().generate(model, prompt_ids, prompt_mask, sampling)
        self.calls.append((model, len(gens), any("<|im_start|>tool" in c for c in self.contexts[before:])))
        return gens


def fit(tmp_path, module, engine, steps=1):
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch.rollout, {k: float(v) for k, v in trainer.callback_metrics.items()}))

    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
              callbacks=[RolloutCallback(engine=engine), Record()]).fit(module, PromptOnlyDataModule(DATA, batch_size=4))
    return seen


def tool_tokens(gens: Generations) -> torch.Tensor:
    return (gens.completion_mask * (1 - gens.tool_mask)).bool()


def bump(x: torch.Tensor, where: torch.Tensor, by: float) -> torch.Tensor:
    return x + by * where.to(x.dtype)


# ----------------------------------------------------------------------------- PPO


def test_model_token_order_compacts_and_expands():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])
    order = model_token_order(mask)
    assert order.tolist() == [[0, 1, 4, 2, 3, 5], [0, 1, 2, 3, 4, 5]]  # a prefix mask keeps its order
    x = torch.arange(12.0).view(2, 6)
    assert compact(mask, order).tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert torch.equal(expand(compact(x, order), order), x)


def hand_rollout(module, tool_mask, completion_mask, old, ref, values) -> Rollout:
    n, width = completion_mask.shape
    gens = Generations(torch.full((n, 2), 65), torch.ones(n, 2, dtype=torch.long), torch.full((n, width), 66), completion_mask,
                       torch.zeros(n, dtype=torch.bool), tool_mask=tool_mask)
    r = Rollout(generations=gens, sequences=module.sequences(gens), loss_mask=module.loss_mask(gens), old_logps=old, ref_logps=ref)
    r.extras["values"] = values
    out = module.advantages(r, torch.tensor([[1.0], [0.0]]))  # row 0 scores 1, row 1 scores 0
    r.advantages, r.rewards, r.metrics = out.advantages, out.rewards, out.metrics
    r.extras.update(out.extras)
    return r


def test_ppo_gae_and_loss_skip_tool_tokens_by_hand():
    """Row 0 is ``m m T T m`` (T: a tool result's tokens), row 1 ``m m m``. kl_coef 0.5, gamma 0.9, lam 0.5.

    Row 0's model tokens (positions 0, 1, 4): KL (k1) 0, 0.2, 0 (the tool tokens' 18 do not count), rewards
    0, -0.1, 1 (the score on the last model token), values 0.5, 0.2, 0.4; GAE over them alone:
      A4 = 1 - 0.4 = 0.6
      A1 = (-0.1 + 0.9 * 0.4 - 0.2) + 0.45 * 0.6 = 0.06 + 0.27 = 0.33      (position 1 bootstraps from 4)
      A0 = (0.9 * 0.2 - 0.5) + 0.45 * 0.33 = -0.32 + 0.1485 = -0.1715
    Row 1 (values 0.1, 0.3, 0.2, rewards 0): A2 = -0.2, A1 = (0.18 - 0.3) + 0.45 * -0.2 = -0.21,
      A0 = (0.27 - 0.1) + 0.45 * -0.21 = 0.0755.
    Returns = A + V; the advantages are whitened over the six model tokens; tool tokens get 0.
    """
    module = PPO(reward_funcs=["arithmetic_reward"], kl_coef=0.5, gamma=0.9, lam=0.5, vf_coef=0.1)
    tool = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    cmask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    old = torch.tensor([[-1.0, -0.8, 9.0, 9.0, -0.5, 0.0], [-0.3, -0.2, -0.1, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -9.0, -9.0, -0.5, 0.0], [-0.3, -0.2, -0.1, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 7.0, 7.0, 0.4, 0.0], [0.1, 0.3, 0.2, 0.0, 0.0, 0.0]])
    r = hand_rollout(module, tool, cmask, old, ref, values)
    raw = torch.tensor([-0.1715, 0.33, 0.6, 0.0755, -0.21, -0.2])
    model_positions = ([0, 0, 0, 1, 1, 1], [0, 1, 4, 0, 1, 2])
    expected_returns = torch.zeros(2, 6)
    expected_returns[model_positions] = raw + values[model_positions]  # 0.3285, 0.53, 1.0, 0.1755, 0.09, 0.0
    assert_close(r.extras["returns"], expected_returns)
    expected_adv = torch.zeros(2, 6)
    expected_adv[model_positions] = (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8)
    assert_close(r.advantages, expected_adv)
    assert r.metrics["objective/kl"] == pytest.approx(0.1)  # (0.2 + 0) / 2 rows
    assert r.metrics["objective/entropy"] == pytest.approx((2.3 + 0.6) / 2)

    # The same rollout with the tool tokens cut out has the same returns at the model's tokens.
    keep = [0, 1, 4, 5, 5, 5]
    cut = hand_rollout(module, None, torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]),
                       *(torch.stack([t[0, keep], t[1]]) for t in (old, ref, values)))
    assert_close(cut.extras["returns"][0, :3], r.extras["returns"][0, [0, 1, 4]])
    # Anything at the tool tokens (log-probs, reference, values) changes nothing.
    t = tool_tokens(r.generations)
    moved = hand_rollout(module, tool, cmask, bump(old, t, 3.0), bump(ref, t, -2.0), bump(values, t, 5.0))
    assert torch.equal(moved.advantages, r.advantages) and torch.equal(moved.extras["returns"], r.extras["returns"])

    # The loss on the first update (ratio 1): policy -mean(A) = 0, value 0.5 * mean(A_raw^2) over 6 tokens.
    def loss_and_grads(shift: float):
        logps, vals = bump(old, t, shift).requires_grad_(), bump(values, t, -shift).requires_grad_()
        module.policy_and_values = lambda gens, seqs, with_entropy=False: (logps, torch.zeros_like(logps), vals)
        loss, stats = module.minibatch_loss(r, torch.arange(2))
        loss.backward()
        return loss, stats, logps.grad, vals.grad

    loss, stats, g_logps, g_values = loss_and_grads(0.0)
    assert stats["loss/policy_avg"].abs() < 1e-6
    assert stats["loss/value_avg"].item() == pytest.approx(0.5 * (raw**2).sum().item() / 6)
    assert loss.item() == pytest.approx(0.1 * 0.5 * (raw**2).sum().item() / 6, abs=1e-6)
    assert_close(g_logps, -expected_adv / 6)  # d(-A * ratio)/d logp, over 6 tokens; 0 on tool tokens
    expected_gv = torch.zeros(2, 6)
    expected_gv[model_positions] = -0.1 * raw / 6  # vf_coef * (V - R) / 6
    assert_close(g_values, expected_gv)
    assert (g_logps[t] == 0).all() and (g_values[t] == 0).all()
    loss2, _, g_logps2, g_values2 = loss_and_grads(4.0)  # tool tokens' log-probs and values moved
    assert torch.equal(loss2, loss) and torch.equal(g_logps2, g_logps) and torch.equal(g_values2, g_values)


def test_ppo_trains_on_multi_turn_rollouts(tmp_path):
    module = PPO(reward_funcs=["arithmetic_reward"], tools=[add], max_completion_length=200, num_ppo_epochs=1,
                 chat_template_path=template_file(tmp_path), optimizer=adamw(1e-3))
    seen = fit(tmp_path, module, Spy(), steps=2)
    assert len(seen) == 2
    r, metrics = seen[0]
    gens, t = r.generations, tool_tokens(r.generations)
    assert t.any(1).all()  # every completion called add and got its result
    assert torch.equal(r.loss_mask, gens.model_mask.float())
    assert (r.advantages[t] == 0).all() and (r.extras["returns"][t] == 0).all()
    assert (r.advantages[r.loss_mask.bool()] != 0).any()
    assert metrics["train/tools/call_frequency"] == 1.0 and metrics["train/tools/failure_frequency"] == 0.0
    assert "train/loss/value_avg" in metrics and "train/objective/kl" in metrics

    # With the real policy and critic: moving the tool tokens' log-probs and values moves neither the loss
    # nor any gradient.
    real = module.policy_and_values
    shift = torch.zeros((), requires_grad=True)

    def shifted(g, s, with_entropy=False):
        logps, entropy, values = real(g, s, with_entropy)
        return bump(logps, tool_tokens(g), shift), entropy, bump(values, tool_tokens(g), -shift)

    def loss_and_grads():
        module.zero_grad()
        loss, _ = module.minibatch_loss(r, torch.arange(len(r)))
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    module.policy_and_values = shifted
    with torch.no_grad():
        shift.fill_(0.0)
    loss0, grads0 = loss_and_grads()
    with torch.no_grad():
        shift.fill_(3.0)
    loss3, grads3 = loss_and_grads()
    assert shift.grad == 0.0 and grads
    assert_close(loss0, loss) and assert_close(loss3, loss)
    for k in grads:
        assert_close(grads3[k], grads[k])


# ------------------------------------------------------------------- OnlineDPO, NashMD, XPO


class RecordingJudge(RewardJudge):
    def __init__(self):
        super().__init__(["arithmetic_reward"], hard=True)
        self.pairs = []

    def judge(self, prompts, completion_pairs, **columns):
        self.pairs += completion_pairs
        return super().judge(prompts, completion_pairs, **columns)


def sampled_by(module, model) -> str:
    if model is module.model:
        return "policy"
    if isinstance(model, GeometricMixture):
        return "mixture"
    return "reference" if model is module.reference_model else "other"


@pytest.mark.parametrize("cls", [OnlineDPO, NashMD, XPO])
def test_preference_methods_run_the_tool_turns_on_both_samples_and_count_model_tokens_only(tmp_path, cls):
    judge = RecordingJudge() if cls is OnlineDPO else None
    ranking = {"judge": judge} if judge is not None else {"reward_funcs": ["arithmetic_reward"]}
    module = cls(tools=[add], max_new_tokens=200, chat_template_path=template_file(tmp_path), optimizer=adamw(1e-3), **ranking)
    engine = Spy()
    seen = fit(tmp_path, module, engine, steps=2)
    assert len(seen) == 2
    r, metrics = seen[0]
    E, gens = len(r) // 2, r.generations
    t = tool_tokens(gens)
    assert t.any(1).all()  # both samples of every pair called add and got its result
    assert torch.equal(r.loss_mask, gens.model_mask.float())
    assert metrics["train/tools/call_frequency"] == 1.0 and metrics["train/tools/failure_frequency"] == 0.0
    # each side continued by the model that began it, the rows of one model in one call per round
    second = {OnlineDPO: "policy", NashMD: "mixture", XPO: "reference"}[cls]
    calls = [(sampled_by(module, m), n, continued) for m, n, continued in engine.calls[:4]]
    if cls is OnlineDPO:
        assert calls[:2] == [("policy", 2 * E, False), ("policy", 2 * E, True)]
    else:
        assert calls == [("policy", E, False), (second, E, False), ("policy", E, True), (second, E, True)]
    # reward functions / the judge see whole conversations, tool turns included
    for c in (r.completions[0], r.completions[E]):
        assert [m["role"] for m in c] == ["assistant", "tool", "assistant"] and c[1]["content"] == "5"
    if judge is not None:
        assert judge.pairs[0] == (r.completions[0], r.completions[E])

    # The loss sums the model's tokens only: log-probs (and reference log-probs) moved on tool tokens change
    # neither the loss nor the gradient, which is 0 there.
    logged = {}
    module.log_pair_metrics = lambda m, rollout, stage: logged.update(m)

    def loss_and_grad(shift: float):
        logps = bump(torch.full(t.shape, -1.0), t, shift).requires_grad_()
        module.policy_token_logps = lambda rollout: logps
        moved = Rollout(**{**r.__dict__, "ref_logps": bump(r.ref_logps, t, -shift)})
        loss = module.shared_step(SimpleNamespace(rollout=moved), "train")
        loss.backward()
        return loss.detach(), logps.grad

    loss, grad = loss_and_grad(0.0)
    assert (grad[t] == 0).all() and (grad[r.loss_mask.bool()] != 0).any()
    # every log-prob is -1: the entropy metric is the mean count of model tokens in the rows the loss sums
    rows = slice(0, E) if cls is NashMD else slice(None)
    assert logged["objective/entropy"].item() == pytest.approx(r.loss_mask[rows].sum(1).mean().item())
    loss5, grad5 = loss_and_grad(5.0)
    assert torch.equal(loss5, loss) and torch.equal(grad5, grad)


def test_environments_for_both_samples_of_a_pair(tmp_path):
    """One environment per sample (2E), each reset with its row, each side's tools its environment's; the
    environments' get_reward ranks the pairs; a judge with such environments is refused."""
    module = XPO(environment_factory=Counter, max_new_tokens=200, chat_template_path=template_file(tmp_path))
    engine = Spy(answer="The sum is 5")
    (r, metrics), = fit(tmp_path, module, engine)
    assert module.reward_names == ["Counter"] and r.reward_columns["Counter"].tolist() == [1.0] * len(r)
    assert len(module.environments.pools[None]) == len(r) == 8  # 4 prompts x 2 samples, none shared
    assert engine.contexts[0].startswith("<tools>add;</tools>") and " Reach 5." in engine.contexts[0]
    assert [sampled_by(module, m) for m, _, _ in engine.calls[:4]] == ["policy", "reference", "policy", "reference"]
    assert metrics["train/tools/call_frequency"] == 1.0
    with pytest.raises(ValueError, match=r"a judge ranks the pairs, so the environments' get_reward \['Counter'\]"):
        NashMD(judge=RewardJudge(["arithmetic_reward"]), environment_factory=Counter)


# ----------------------------------------------------------------------------- Llama 3: one call per message

TWO_CALLS = '{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "add", "parameters": {"a": 1, "b": 1}}'


def test_llama3_refuses_several_calls_in_one_message():
    from transformers.utils.chat_template_utils import render_jinja_template

    one = parse_tool_calls('Sure. <|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}', "llama3")
    assert one.refusal is None and one.requests() == one.calls and len(one.message()["tool_calls"]) == 1
    parsed = parse_tool_calls("Sure. " + TWO_CALLS, "llama3")
    assert [c.name for c in parsed.calls] == ["add", "add"]  # parsed as written ...
    assert parsed.refusal.startswith(LLAMA3_SINGLE_CALL) and "2 calls (add, add)" in parsed.refusal  # ... and refused
    assert parsed.message() == {"role": "assistant", "content": "Sure. " + TWO_CALLS}  # not made: kept as text
    malformed = parse_tool_calls('{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "add", "parameters": {', "llama3")
    assert len(malformed.calls) == 1 and malformed.refusal is not None  # two attempts, one of them malformed

    box = Toolbox([add])
    messages, stats = box.run([parsed.requests()])
    box.close()
    assert len(messages[0]) == 1 and LLAMA3_SINGLE_CALL in messages[0][0]["content"] and "none was run" in messages[0][0]["content"]
    assert (stats.calls, stats.failures) == (1, 1)
    # the conversation renders with Llama 3.1's own template; the calls as tool_calls would not
    template = (Path(pytest.importorskip("trl").__file__).parent / "chat_templates" / "llama3_1.jinja").read_text()
    user = {"role": "user", "content": "2+3?"}
    rendered = render_jinja_template([[user, parsed.message(), *messages[0]]], chat_template=template)[0][0]
    assert "single tool-calls at once" in rendered
    both = {"role": "assistant", "content": "", "tool_calls": [c.as_dict() for c in parsed.calls]}
    with pytest.raises(Exception, match="only supports single tool-calls at once"):
        render_jinja_template([[user, both]], chat_template=template)


def test_a_llama3_rollout_answers_several_calls_with_an_error(tmp_path):
    module = PPO(reward_funcs=["arithmetic_reward"], tools=[add], tool_call_format="llama3", max_completion_length=400,
                 num_ppo_epochs=1, chat_template_path=template_file(tmp_path))
    engine = Spy(TWO_CALLS, answer="The sum is 5")  # the error needs room: 400 tokens
    (r, metrics), = fit(tmp_path, module, engine)
    assert LLAMA3_SINGLE_CALL in engine.contexts[-1]  # the policy read the error and answered
    assert metrics["train/tools/call_frequency"] == 1.0 and metrics["train/tools/failure_frequency"] == 1.0
    conversation = r.completions[0]
    assert [m["role"] for m in conversation] == ["assistant", "tool", "assistant"] and "tool_calls" not in conversation[0]
    assert LLAMA3_SINGLE_CALL in conversation[1]["content"] and conversation[2]["content"] == "The sum is 5"
