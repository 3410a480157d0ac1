"""GKD: the chunked generalized JSD against full logits and TRL 1.16, targets and prompts, the three
sources of completions (student, teacher, data), learning, and bad input."""

import math
import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import lightning as L
import pytest
import torch

from lit_align import LanguageModelingDataModule, PromptCompletionDataModule
from lit_align.losses.gkd import generalized_jsd, gkd_loss
from lit_align.methods.gkd import GKD
from lit_align.models.builtin import builtin_model, builtin_tokenizer
from lit_align.ops.completions import last_completion_run, left_padded_prompts
from lit_align.ops.distill import LMHead, chunked_generalized_jsd
from lit_align.ops.forward import target_mask
from lit_align.ops.packing import collate_examples

BETAS = (0.0, 0.5, 1.0)


def adamw(lr=1e-3):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher that differs from ``builtin:tiny``: its weights plus seeded noise, saved with the byte
    tokenizer (the shared vocabulary GKD needs)."""
    path = tmp_path_factory.mktemp("gkd_teacher")
    model = builtin_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    model.save_pretrained(path)
    builtin_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory):
    """``builtin:tiny`` with its LM head scaled by 10: a confident teacher that a student can approach
    in a few steps (the random builtin model is nearly uniform)."""
    path = tmp_path_factory.mktemp("gkd_sharp_teacher")
    model = builtin_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(path)
    builtin_tokenizer().save_pretrained(path)
    return str(path)


def data_batch(tokenizer, size=6, conversational=False, layout="padded"):
    dm = PromptCompletionDataModule(
        f"builtin:arithmetic?size={size}&conversational={str(conversational).lower()}", batch_size=size,
        shuffle=False, group_by_length=False,
    ).connect(tokenizer)
    dm.setup()
    return collate_examples([dm.datasets["train"][i] for i in range(size)], tokenizer.pad_token_id, layout, 160)


# --------------------------------------------------------------------------- the divergence


def test_divergence_by_hand():
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(teacher || student)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(student || teacher)
    m = [0.5 * 0.25 + 0.5 * 0.5, 0.5 * 0.75 + 0.5 * 0.5]
    jsd = 0.5 * sum(q * math.log(q / mq) for q, mq in zip([0.5, 0.5], m)) + 0.5 * sum(
        q * math.log(q / mq) for q, mq in zip([0.25, 0.75], m)
    )
    for beta, expected in ((0.0, forward), (1.0, reverse), (0.5, jsd)):
        assert generalized_jsd(s, t, beta).item() == pytest.approx(expected, rel=1e-5)
    # JSD_0.5 is symmetric; the same distributions diverge by 0.
    assert generalized_jsd(t, s, 0.5).item() == pytest.approx(jsd, rel=1e-5)
    assert generalized_jsd(s, s, 0.3).abs().item() < 1e-7


def random_case(n=13, h=8, h_t=12, v=30, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(n, h_t, generator=g, dtype=dtype)
    wt = torch.randn(v, h_t, generator=g, dtype=dtype)
    return hs, w, b, ht, wt, torch.randn(n, generator=g, dtype=dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_equals_full_logits_values_and_gradients(beta, temperature):
    hs, w, b, ht, wt, upstream = random_case()
    expected = generalized_jsd(hs @ w.T + b, ht @ wt.T, beta, temperature)  # (n,)
    grads = torch.autograd.grad((expected * upstream).sum(), [hs, w, b])
    for chunk_size in (1, 4, 5, 13, 64):  # 4 and 5 do not divide n = 13
        out = chunked_generalized_jsd(hs, ht, LMHead(w, b), LMHead(wt), beta=beta, temperature=temperature,
                                      chunk_size=chunk_size)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        for got, want in zip(torch.autograd.grad((out * upstream).sum(), [hs, w, b]), grads):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_chunked_follows_logit_scale_and_softcap_in_fp32():
    hs, w, _, ht, wt, upstream = random_case(dtype=torch.float32)
    s_head, t_head = LMHead(w, logit_scale=0.5, softcap=3.0), LMHead(wt, logit_scale=2.0, softcap=None)
    s_logits = 3.0 * torch.tanh(0.5 * (hs @ w.T) / 3.0)
    expected = generalized_jsd(s_logits, 2.0 * (ht @ wt.T), 0.3, 0.7)
    out = chunked_generalized_jsd(hs, ht, s_head, t_head, beta=0.3, temperature=0.7, chunk_size=4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad((out * upstream).sum(), [hs, w])
    want = torch.autograd.grad((expected * upstream).sum(), [hs, w])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_chunked_backward_keeps_no_vocabulary_block():
    hs, w, _, ht, wt, _ = random_case(n=64, h=16, h_t=16, v=50, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_generalized_jsd(hs, ht, LMHead(w), LMHead(wt), chunk_size=8)
    assert saved and max(saved) <= 64 * 16  # hidden states and weights, nothing of size n x V = 3200
    out.sum().backward()
    assert hs.grad is not None and w.grad is not None


def test_parity_with_trl_generalized_jsd_loss():
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(0)
    b, t, v, h = 3, 7, 40, 8
    hs, w = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g)
    ht, wt = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = labels[2, 5:] = -100
    valid = labels != -100
    for beta in BETAS:
        for temperature in (1.0, 0.7):
            expected = trl_gkd.GKDTrainer.generalized_jsd_loss(hs @ w.T, ht @ wt.T, labels=labels, beta=beta,
                                                               temperature=temperature)
            loss, _ = gkd_loss(hs @ w.T, ht @ wt.T, labels, beta, temperature)
            torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
            chunked = chunked_generalized_jsd(hs[valid], ht[valid], LMHead(w), LMHead(wt), beta=beta,
                                              temperature=temperature, chunk_size=4)
            torch.testing.assert_close(chunked.sum() / valid.sum(), expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- targets and prompts


def test_targets_are_the_last_assistant_turn_and_prompts_what_precedes(tmp_path, tokenizer):
    import json

    rows = [{"messages": [{"role": "user", "content": "Compute 1+2."}, {"role": "assistant", "content": "3"},
                          {"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "7"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = LanguageModelingDataModule(str(path), batch_size=2, shuffle=False, group_by_length=False).connect(tokenizer)
    dm.setup()
    items = [dm.datasets["train"][i] for i in range(2)]
    for layout in ("padded", "packed"):
        batch = collate_examples(items, tokenizer.pad_token_id, layout, 256)
        targets = last_completion_run(batch)
        texts = [tokenizer.decode(batch.input_ids[targets & (batch.sequence_ids == s)]) for s in range(2)]
        assert texts == ["7<|im_end|>", "Hello there<|im_end|>"]
        ids, mask = left_padded_prompts(batch, targets, tokenizer.pad_token_id)
        assert ids.shape[0] == 2 and mask[:, -1].all()  # left-padded
        prompts = [tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)]
        expected = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False)
                    for r in rows]
        assert prompts == expected  # TRL's prompt: every message but the last, and the assistant header


def test_plain_text_has_no_prompt_to_sample_from(tokenizer):
    dm = LanguageModelingDataModule("builtin:arithmetic?size=2", batch_size=2).connect(tokenizer)
    dm.setup()
    batch = collate_examples([dm.datasets["train"][i] for i in range(2)], tokenizer.pad_token_id, "padded", None)
    with pytest.raises(ValueError, match="prompt-completion or conversational data"):
        left_padded_prompts(batch, last_completion_run(batch), tokenizer.pad_token_id)


def test_lmbda_coin_is_reproducible_and_has_the_right_rate(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    draws = [GKD(teacher_model_name_or_path="x", lmbda=0.3).batch_source(i) for i in range(2000)]
    again = [GKD(teacher_model_name_or_path="y", lmbda=0.3).batch_source(i) for i in range(2000)]
    assert draws == again and set(draws) == {"student", "data"}
    assert draws.count("student") / 2000 == pytest.approx(0.3, abs=0.04)
    assert {GKD(teacher_model_name_or_path="x", lmbda=0.0, seq_kd=True).batch_source(i) for i in range(50)} == {"teacher"}
    assert {GKD(teacher_model_name_or_path="x", lmbda=1.0, seq_kd=True).batch_source(i) for i in range(50)} == {"student"}


# --------------------------------------------------------------------------- the module


def test_module_loss_equals_trl_full_logit_loss_on_a_batch(teacher_dir, tokenizer):
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    module = GKD(teacher_model_name_or_path=teacher_dir, beta=0.5)
    module.configure_model()
    module.log_metrics = lambda *args, **kwargs: None
    batch = data_batch(tokenizer, conversational=True)
    loss = module.shared_step(batch, "train")
    # TRL's compute_loss: full logits of both models, shifted, labels -100 outside the completion.
    with torch.no_grad():
        s_logits = module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        t_logits = module.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = target_mask(batch, last_completion_run(batch))
    labels = batch.input_ids[:, 1:].masked_fill(~mask, -100)
    expected = trl_gkd.GKDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], labels=labels, beta=0.5)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert expected > 0.01  # the teacher differs from the student


def test_generated_batch_keeps_the_prompts(teacher_dir, tokenizer):
    module = GKD(teacher_model_name_or_path=teacher_dir, max_new_tokens=6)
    module.configure_model()
    batch = data_batch(tokenizer, size=4)
    out = module.generate_completions(batch, module.teacher)
    for s in range(4):
        old = batch.input_ids[(batch.sequence_ids == s) & ~batch.completion_mask]
        new = out.input_ids[(out.sequence_ids == s) & ~out.completion_mask]
        assert torch.equal(old, new)
    n_completion = (out.completion_mask & (out.sequence_ids >= 0)).sum(1)
    assert ((n_completion >= 1) & (n_completion <= 6)).all()


@pytest.mark.parametrize(
    "settings, expected_source",
    [({"lmbda": 1.0}, "student"), ({"lmbda": 0.0, "seq_kd": True}, "teacher"), ({"lmbda": 0.0}, None)],
    ids=["on_policy", "seq_kd", "data"],
)
def test_each_source_trains_and_the_teacher_stays_out_of_checkpoints(teacher_dir, tmp_path, settings, expected_source):
    module = GKD(teacher_model_name_or_path=teacher_dir, max_new_tokens=8, optimizer=adamw(), **settings)
    sources = []
    generate = module.generate_completions

    def spy(batch, model):
        sources.append("student" if model is module.model else "teacher")
        return generate(batch, model)

    module.generate_completions = spy
    data = PromptCompletionDataModule("builtin:arithmetic?size=8", batch_size=4)
    trainer(tmp_path, max_steps=2).fit(module, data)
    assert sources == ([expected_source] * 2 if expected_source else [])
    metrics = module.trainer.callback_metrics
    assert {"train/loss", "train/num_tokens"} <= set(metrics) and metrics["train/loss"] > 0
    assert not any(k.startswith("teacher.") for k in module.state_dict())
    assert all(not p.requires_grad for p in module.teacher.parameters())


@pytest.mark.slow
@pytest.mark.learning
def test_gkd_lowers_the_divergence_to_the_teacher(learning, sharp_teacher_dir, tmp_path):
    """The generalized JSD to the teacher on held-out completions (val/loss) falls by a clear margin."""
    module = GKD(teacher_model_name_or_path=sharp_teacher_dir, lmbda=0.25, max_new_tokens=8, optimizer=adamw(3e-3))
    data = PromptCompletionDataModule("builtin:arithmetic?size=200", batch_size=8, eval_split="test", seed=learning.seed)
    t = trainer(tmp_path, max_steps=16, limit_val_batches=2)
    before = t.validate(module, data, verbose=False)[0]["val/loss"]
    t.fit(module, data)
    after = t.validate(module, data, verbose=False)[0]["val/loss"]
    learning.record(loss_before=before, loss_after=after, ratio=after / before)
    assert after < 0.6 * before, (before, after)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_clearly(teacher_dir):
    with pytest.raises(ValueError, match="GKD needs a teacher: set teacher_model_name_or_path"):
        GKD()
    with pytest.raises(ValueError, match="beta must be in"):
        GKD(teacher_model_name_or_path=teacher_dir, beta=1.5)
    with pytest.raises(ValueError, match="lmbda must be in"):
        GKD(teacher_model_name_or_path=teacher_dir, lmbda=-0.1)
    with pytest.raises(ValueError, match=r"teacher 'builtin:tiny-32k' has a vocabulary of 32000 tokens, student "
                                         r"'builtin:tiny' 264; GKD needs a shared tokenizer"):
        GKD(teacher_model_name_or_path="builtin:tiny-32k").configure_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GKD(teacher_model_name_or_path="./no/such/teacher").configure_model()
    hs, w, _, ht, _, _ = random_case(dtype=torch.float32)
    with pytest.raises(ValueError, match="vocabulary of 30 tokens and the teacher's 31"):
        chunked_generalized_jsd(hs, ht, LMHead(w), LMHead(torch.randn(31, ht.shape[1])))
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(torch.zeros(2, 3), torch.zeros(2, 3), beta=-0.5)
