"""OnlineDPO, NashMD, XPO and the pairwise judges: losses by hand and against TRL's code, the
mixture sampler's distribution, the LLM judge against a fake OpenAI-compatible server, the methods
end to end, bad input, and learning."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lit_align import XPO, NashMD, OnlineDPO, PromptOnlyDataModule, RolloutCallback
from lit_align.losses.online_preference import nash_md_loss, pair_dpo_loss, xpo_loss
from lit_align.models.builtin import builtin_tokenizer
from lit_align.rewards.judges import OpenAIPairwiseJudge, RewardJudge, check_judgement
from lit_align.rollout.engines import HFEngine, SamplingParams
from lit_align.rollout.mixture import GeometricMixture
from tests.scripted_engine import ScriptedEngine
from tests.test_online import DATA, adamw, fit

# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_loss_matches_trl_code(loss_type):
    """TRL 1.16 ``trl/experimental/online_dpo/online_dpo_trainer.py`` lines 1221-1254, restated:
    rewards split in halves, ``mask = first >= second`` picks chosen, sums of log-probs, DPO logits."""
    g = torch.Generator().manual_seed(0)
    E, beta = 6, 0.1
    logps, ref = torch.randn(2 * E, generator=g) * 5, torch.randn(2 * E, generator=g) * 5
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0, 0.5, 0.2, 0.0, 1.0])
    first, second = rewards.split(E)
    mask = first >= second
    rng = torch.arange(E)
    chosen, rejected = rng + (~mask * E), rng + (mask * E)
    logits = (logps[chosen] - logps[rejected]) - (ref[chosen] - ref[rejected])
    trl = (-F.logsigmoid(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2).mean()
    w = mask  # ours: the first sample wins where it scores at least as high
    pick = lambda a, b: torch.where(w, a, b)  # noqa: E731
    loss, metrics = pair_dpo_loss(pick(logps[:E], logps[E:]), pick(logps[E:], logps[:E]), pick(ref[:E], ref[E:]),
                                  pick(ref[E:], ref[:E]), beta, loss_type)
    assert_close(loss, trl)
    assert_close(metrics["rewards/chosen"], (beta * (logps[chosen] - ref[chosen])).mean())
    assert_close(metrics["logps/rejected"], logps[rejected].mean())


def test_nash_md_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    P = torch.tensor([0.9, 0.2])
    loss, score, kl = nash_md_loss(logps, ref, mask, P, beta=0.1)
    # row 0: sum lp = -3; score = 0.4 * -3 = -1.2; kl terms (0.5 * -1) + (-1 * -2) = 1.5
    # row 1: sum lp = -1.5; score = -0.3 * -1.5 = 0.45; kl terms 0 + (0.5 * -0.5) + (1.5 * -0.5) = -1.0
    assert_close(score, torch.tensor([-1.2, 0.45]))
    assert_close(kl, torch.tensor([-0.5, 2.0]))
    assert_close(loss, torch.tensor(((0.1 * 1.5 + 1.2) + (0.1 * -1.0 - 0.45)) / 2))
    loss.backward()  # d/dlp: (beta * log_ratio - (P - 0.5)) / 2 on valid tokens
    assert_close(logps.grad, torch.tensor([[0.1 * 0.5 - 0.4, 0.1 * -1.0 - 0.4, 0.0], [0.3, 0.1 * 0.5 + 0.3, 0.1 * 1.5 + 0.3]]) / 2)


def test_xpo_loss_by_hand():
    model, model_ref = torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -2.0])
    theirs, theirs_ref = torch.tensor([-4.0, -1.0]), torch.tensor([-3.0, -1.5])
    wins = torch.tensor([True, False])
    loss, dpo, xpo, _ = xpo_loss(model, model_ref, theirs, theirs_ref, wins, beta=0.5, alpha=0.1)
    # pair 0: chosen = model (0.5), rejected = theirs (-1) -> logits 1.5; pair 1: chosen theirs (0.5), rejected model (-1) -> 1.5
    expected_dpo = -F.logsigmoid(torch.tensor(0.75))
    assert_close(dpo, expected_dpo)
    assert_close(xpo, torch.tensor(0.1 * -2.5))
    assert_close(loss, expected_dpo + 0.1 * -2.5)


# --------------------------------------------------------------------------- the mixture sampler


class FixedLM(torch.nn.Module):
    """A 'language model' whose next-token logits are always ``logits`` (a tiny vocabulary)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, logits_to_keep=0, **kw):
        return SimpleNamespace(logits=self.logits.expand(input_ids.size(0), input_ids.size(1), -1))


def test_geometric_mixture_samples_from_the_formula():
    policy, ref, alpha = FixedLM([2.0, 0.0, -1.0, 1.0, 0.5]), FixedLM([-1.0, 1.5, 0.0, 0.0, 2.0]), 0.3
    mixture = GeometricMixture(policy, ref, alpha)
    prompts = torch.zeros(500, 2, dtype=torch.long)
    engine = HFEngine(builtin_tokenizer(), seed=0)
    gens = engine.generate(mixture, prompts, torch.ones_like(prompts), SamplingParams(max_completion_length=1, num_generations=40))
    counts = torch.bincount(gens.completion_ids[:, 0], minlength=5).float() / gens.completion_ids.size(0)
    expected = torch.softmax(alpha * ref.logits + (1 - alpha) * policy.logits, -1)
    assert_close(counts, expected, atol=0.01, rtol=0)  # 20,000 draws: std < 0.004
    with pytest.raises(ValueError, match="mixture_coef must be in"):
        GeometricMixture(policy, ref, 1.5)


# --------------------------------------------------------------------------- judges


class FakeOpenAI(BaseHTTPRequestHandler):
    """``/v1/chat/completions``: answers "0" when answer 0 contains "Answer: 3", else "1";
    the model name "broken" gets HTTP 500, "chatty" gets a sentence."""

    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            return
        text = body["messages"][0]["content"]
        first = text.split("## Answer 0")[1].split("## Answer 1")[0]
        answer = "I think the first" if body["model"] == "chatty" else ("0" if "Answer: 3" in first else "1")
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai():
    server = HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeOpenAI.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_judge_against_a_local_server(fake_openai, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge = OpenAIPairwiseJudge(model="judge-1", base_url=fake_openai, api_key_env="JUDGE_KEY", max_workers=2)
    probs = judge.judge(["Compute 1+2.\n", "Compute 2+2.\n"], [("Answer: 3", "Answer: 4"), ("Answer: 5", "Answer: 4")])
    assert probs == [1.0, 0.0]
    path, auth, body = FakeOpenAI.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret" and body["model"] == "judge-1"
    assert "Compute" in body["messages"][0]["content"]
    with pytest.raises(RuntimeError, match="judge endpoint http://127.0.0.1:.*/v1/chat/completions failed"):
        OpenAIPairwiseJudge(model="broken", base_url=fake_openai).judge(["p"], [("a", "b")])
    with pytest.raises(ValueError, match="answered 'I think the first'; expected '0' or '1'"):
        OpenAIPairwiseJudge(model="chatty", base_url=fake_openai).judge(["p"], [("a", "b")])


def test_reward_judge_soft_and_hard():
    prompts = ["Compute 1+2.\n", "Compute 2+2.\n"]
    pairs = [("Answer: 3", "Answer: 4"), ("Answer: 5", "Answer: 4")]
    assert RewardJudge(["arithmetic_reward"], hard=True).judge(prompts, pairs) == [1.0, 0.0]
    soft = RewardJudge(["arithmetic_reward"]).judge(prompts, pairs)
    assert soft == pytest.approx([torch.sigmoid(torch.tensor(1.0)).item(), torch.sigmoid(torch.tensor(-1.0)).item()])


def test_judge_outputs_are_checked():
    assert check_judgement([0.0, 1, 0.5], 3, "j") == [0.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="judge j returned 2 values for 3 pairs"):
        check_judgement([0.1, 0.2], 3, "j")
    with pytest.raises(ValueError, match=r"judge j returned 1.5 for pair 1; expected a probability in \[0, 1\]"):
        check_judgement([0.1, 1.5, 0.2], 3, "j")
    with pytest.raises(ValueError, match="judge j returned None"):
        check_judgement(None, 3, "j")


# --------------------------------------------------------------------------- the methods


def scripted():
    return RolloutCallback(engine=ScriptedEngine(builtin_tokenizer()))


@pytest.mark.parametrize("cls", [OnlineDPO, NashMD, XPO])
def test_online_preference_methods_train_with_rewards_and_with_a_judge(cls):
    for ranking in ({"reward_funcs": ["arithmetic_reward"], "missing_eos_penalty": 1.0},
                    {"judge": RewardJudge(["arithmetic_reward"], hard=True)}):
        module = cls(max_new_tokens=16, optimizer=adamw(1e-2), beta=[0.1, 0.05], **ranking)
        module.configure_model()
        before = {k: v.clone() for k, v in module.model.state_dict().items()}
        _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=4), steps=2, callbacks=[scripted()])
        m = record.metrics[-1]
        assert m["train/beta"] == pytest.approx(0.1)
        assert any(not torch.equal(v, module.model.state_dict()[k]) for k, v in before.items())
        assert not any(k.startswith("ref_model.") for k in module.state_dict())
        expected = {
            OnlineDPO: {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "objective/kl",
                        "objective/entropy", "objective/non_score_reward", "val/contain_eos_token"},
            NashMD: {"loss/score", "loss/kl", "rewards/probabilities", "logps/chosen", "mixture_coef", "objective/entropy"},
            XPO: {"loss/dpo", "loss/xpo", "rewards/chosen", "rewards/margins", "objective/kl", "alpha"},
        }[cls]
        assert {f"train/{k}" for k in expected} <= set(m)
        if "reward_funcs" in ranking and cls is OnlineDPO:
            assert {"train/objective/scores", "train/objective/scores_margin", "train/objective/rlhf_reward"} <= set(m)


def test_nash_md_and_xpo_sample_the_second_source_with_the_real_engine():
    for cls in (NashMD, XPO):
        module = cls(reward_funcs=["arithmetic_reward"], max_new_tokens=6)
        _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=4), steps=1)
        assert "train/loss" in record.metrics[-1]


def test_online_preference_bad_input():
    with pytest.raises(ValueError, match="needs exactly one of judge and reward_funcs"):
        OnlineDPO()
    with pytest.raises(ValueError, match="needs exactly one of judge and reward_funcs"):
        OnlineDPO(reward_funcs=["arithmetic_reward"], judge=RewardJudge(["arithmetic_reward"]))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        OnlineDPO(reward_funcs=["arithmetic_reward"], loss_type="hinge")
    with pytest.raises(ValueError, match="mixture_coef must be in"):
        NashMD(reward_funcs=["arithmetic_reward"], mixture_coef=[0.5, 2.0])

    class Bad:
        def __init__(self, values):
            self.values = values

        def judge(self, prompts, pairs):
            if self.values == "raise":
                raise ConnectionError("judge offline")
            return self.values

    for values, message in (([0.5], r"judge Bad returned 1 values for 4 pairs"), ([2.0] * 4, r"returned 2.0 for pair 0"),
                            ("raise", "judge offline")):
        module = OnlineDPO(judge=Bad(values), max_new_tokens=8)
        with pytest.raises((ValueError, ConnectionError), match=message):
            fit(module, PromptOnlyDataModule(DATA, batch_size=4), steps=1, callbacks=[scripted()])


@pytest.mark.slow
@pytest.mark.learning
def test_online_dpo_raises_the_correctness_reward(learning):
    """From builtin:tiny-sft, DPO on pairs of its own samples ranked by the correctness reward raises
    that reward (the config's settings, fewer steps)."""
    module = OnlineDPO("builtin:tiny-sft", reward_funcs=["arithmetic_reward"], max_new_tokens=24, beta=0.5,
                       missing_eos_penalty=1.0, optimizer=adamw(5e-4))
    data = PromptOnlyDataModule("builtin:arithmetic?size=2000&steps=1&max_operand=9", batch_size=64, seed=learning.seed)
    _, record = fit(module, data, steps=120, gradient_clip_val=1.0)
    n = len(record.metrics) // 4
    scores = [m["train/objective/scores"] for m in record.metrics]
    first, last = sum(scores[:n]) / n, sum(scores[-n:]) / n
    learning.record(first=first, last=last, rise=last - first)
    assert last > first + 0.08, (first, last)


# ------------------------------------------------------------------- defects of the online seams


def test_the_vllm_engine_refuses_to_sample_anything_but_its_policy():
    """XPO with use_vllm sampled its "reference" completion from the policy: the vLLM engine
    ignored the model it was given. It now serves its policy only, and NashMD/XPO reject use_vllm."""
    from lit_align.models.builtin import builtin_model
    from lit_align.rollout.engines import VLLMEngine

    tok = builtin_tokenizer()
    policy, reference = builtin_model("builtin:tiny"), builtin_model("builtin:tiny")
    engine = VLLMEngine("unused", tok, llm=object(), policy=policy)
    ids = torch.tensor([[tok.pad_token_id, 67]])
    with pytest.raises(ValueError, match="the vLLM engine samples the policy only .* asked to sample LlamaForCausalLM, another model"):
        engine.generate(reference, ids, (ids != tok.pad_token_id).long(), SamplingParams())
    for cls in (NashMD, XPO):
        with pytest.raises(ValueError, match=f"{cls.__name__} cannot use use_vllm=True: it samples the reference model too"):
            cls(reward_funcs=["arithmetic_reward"], use_vllm=True)


def test_online_dpo_reuses_each_rollout_with_num_iterations():
    """A preference rollout holds two samples per prompt: the reuse check counted one."""
    module = OnlineDPO(reward_funcs=["arithmetic_reward"], max_new_tokens=8, num_iterations=2)
    _, record = fit(module, PromptOnlyDataModule(DATA, batch_size=4), steps=4, callbacks=[scripted()])
    assert len(record.metrics) == 4


@pytest.mark.parametrize("cls", [OnlineDPO, NashMD, XPO])
def test_the_completions_table_of_a_preference_rollout(cls, tmp_path):
    """log_completions on fewer than 16 prompts raised IndexError: the per-pair probability sat in
    the per-sample advantages. Each sample now has its own (P, then 1 - P), the pair its own field."""
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rollout = batch.rollout

    capture = Capture()
    module = cls(reward_funcs=["arithmetic_reward"], max_new_tokens=8)
    fit(module, PromptOnlyDataModule(DATA, batch_size=4), steps=1, callbacks=[scripted(), capture])
    tables = []
    logger = object.__new__(WandbLogger)  # a W&B logger that only collects tables
    logger.log_table = lambda key, columns, data: tables.append((columns, data))
    RolloutCallback()._log_table(SimpleNamespace(global_rank=0, global_step=0, loggers=[logger], default_root_dir=str(tmp_path)),
                                 capture.rollout)
    columns, rows = tables[0]
    assert columns[-1] == "advantage" and len(rows) == 8  # 4 prompts x 2 samples
    first, second = [r[-1] for r in rows[:4]], [r[-1] for r in rows[4:]]
    assert all(a + b == pytest.approx(1.0) for a, b in zip(first, second))
    assert torch.equal(capture.rollout.extras["preferences"], torch.tensor(first))


@pytest.mark.parametrize("cls", [OnlineDPO, NashMD, XPO])
def test_arguments_a_preference_method_would_ignore_are_rejected(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} does not use mask_truncated_completions"):
        cls(reward_funcs=["arithmetic_reward"], mask_truncated_completions=True)
