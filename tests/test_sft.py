"""SFT: loss math, masks, layouts, LoRA, export, resume, learning."""

import math

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align import SFT, LanguageModelingDataModule, PromptCompletionDataModule, SaveHFModel
from lit_align.losses.sft import sft_loss_sum
from lit_align.ops.forward import target_logprobs, target_mask
from lit_align.ops.packing import collate_examples


def adamw(lr=1e-3):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def trainer(tmp_path=None, **kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_losses_by_hand():
    logps = torch.log(torch.tensor([0.5, 0.25]))
    assert sft_loss_sum(logps, "nll").item() == pytest.approx(-(math.log(0.5) + math.log(0.25)))
    assert sft_loss_sum(logps, "dft").item() == pytest.approx(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25)))
    with pytest.raises(ValueError, match="unknown SFT loss_type 'xent'"):
        sft_loss_sum(logps, "xent")
    with pytest.raises(ValueError, match="expected one of"):
        SFT(loss_type="xent")


def test_dft_gradient_is_probability_weighted():
    logps = torch.log(torch.tensor([0.5, 0.25])).requires_grad_()
    sft_loss_sum(logps, "dft").backward()
    assert torch.allclose(logps.grad, -torch.tensor([0.5, 0.25]))


def batch_of(tokenizer, layout="padded", size=12, conversational=False):
    dm = PromptCompletionDataModule(
        f"builtin:arithmetic?size={size}&conversational={str(conversational).lower()}",
        batch_size=size, shuffle=False, group_by_length=False,
    ).connect(tokenizer)
    dm.setup()
    items = [dm.datasets["train"][i] for i in range(size)]
    return collate_examples(items, tokenizer.pad_token_id, layout, capacity=160)


def sequence_logps(model, batch):
    mask = target_mask(batch, batch.completion_mask)
    stats, seq = target_logprobs(model, batch, mask)
    return torch.zeros(batch.num_sequences).index_add(0, seq, stats.logps)


def test_packed_padded_and_padding_free_agree(tokenizer):
    """The same sequences give the same log-probs whatever the layout (block-diagonal attention)."""
    module = SFT()
    module.configure_model()
    padded = sequence_logps(module.model, batch_of(tokenizer, "padded"))
    packed_batch = batch_of(tokenizer, "packed")
    assert packed_batch.input_ids.shape[0] < 12 and packed_batch.attention_mask is None
    torch.testing.assert_close(sequence_logps(module.model, packed_batch), padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sequence_logps(module.model, batch_of(tokenizer, "padding_free")), padded, atol=1e-5, rtol=1e-5)


def test_sft_loss_is_the_same_in_every_layout(tokenizer):
    module = SFT()
    module.configure_model()
    losses = [module.training_step(batch_of(tokenizer, layout), 0) for layout in ("padded", "packed", "padding_free")]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses[2], losses[0], atol=1e-6, rtol=1e-6)


def test_chunked_forward_matches_full_logits(tokenizer):
    module = SFT()
    module.configure_model()
    batch = batch_of(tokenizer, "padded", size=4)
    logits = module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = target_mask(batch, batch.completion_mask)
    expected = torch.zeros(4).index_add(0, batch.sequence_ids[:, 1:][mask], full[mask])
    torch.testing.assert_close(sequence_logps(module.model, batch), expected, atol=1e-5, rtol=1e-5)


def test_masks(tokenizer):
    batch = batch_of(tokenizer, "padded", size=4, conversational=True)
    real = batch.sequence_ids >= 0
    assert torch.equal(SFT().token_mask(batch), batch.completion_mask & real)
    assert torch.equal(SFT(completion_only_loss=False).token_mask(batch), real)
    assert torch.equal(SFT(assistant_only_loss=True).token_mask(batch), batch.completion_mask & batch.assistant_mask)
    batch.assistant_mask = None
    with pytest.raises(ValueError, match=r"assistant_only_loss=True needs conversational data"):
        SFT(assistant_only_loss=True).token_mask(batch)


def test_lora_trains_adapters_exports_merged_and_generates(tmp_path):
    module = SFT(peft={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, optimizer=adamw(1e-2))
    data = PromptCompletionDataModule("builtin:arithmetic?size=16", batch_size=8)
    export = SaveHFModel(dirpath=str(tmp_path / "hf"))
    trainer(tmp_path, max_steps=2, callbacks=[export]).fit(module, data)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in n for n, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = tok("Compute 1+2.\n", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # The merged export computes what the adapter model computes.
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=prompt["input_ids"]).logits
        torch.testing.assert_close(model(input_ids=prompt["input_ids"]).logits, expected, atol=1e-4, rtol=1e-4)


def test_lora_on_lm_head_is_refused():
    with pytest.raises(ValueError, match="lm_head"):
        SFT(peft={"target_modules": ["q_proj", "lm_head"]}).configure_model()


def test_missing_model_path_is_clear():
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        SFT("./no/such/model").configure_model()


def fit_steps(tmp_path, max_steps, ckpt_path=None, callbacks=()):
    L.seed_everything(0)
    module = SFT(optimizer=adamw(3e-3))
    data = PromptCompletionDataModule("builtin:arithmetic?size=16", batch_size=4, seed=3)
    t = trainer(tmp_path, max_steps=max_steps, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
    t.fit(module, data, ckpt_path=ckpt_path)
    return module, t


def test_resume_continues_where_it_stopped(tmp_path):
    straight, _ = fit_steps(tmp_path / "a", 8)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first, _ = fit_steps(tmp_path / "b", 4, callbacks=[ckpt])
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    resumed, t = fit_steps(tmp_path / "c", 8, ckpt_path=str(path))
    assert t.global_step == 8 and resumed.num_tokens_seen == straight.num_tokens_seen
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.learning
def test_sft_learns_the_task(learning, tmp_path):
    """Completion loss on held-out prompts falls by a clear margin within a small budget."""
    module = SFT(optimizer=adamw(3e-3))
    data = PromptCompletionDataModule("builtin:arithmetic?size=1000", batch_size=16, eval_split="test", seed=learning.seed)
    t = trainer(tmp_path, max_steps=200, limit_val_batches=4)
    before = t.validate(module, data, verbose=False)[0]["val/loss"]
    t.fit(module, data)
    after = t.validate(module, data, verbose=False)[0]
    learning.record(loss_before=before, loss_after=after["val/loss"], accuracy_after=after["val/mean_token_accuracy"])
    assert before > 4.5 and after["val/loss"] < 1.5, (before, after)
    assert after["val/mean_token_accuracy"] > 0.5


def test_language_modeling_metrics_and_num_tokens(tmp_path):
    module = SFT(optimizer=adamw())
    data = LanguageModelingDataModule("builtin:arithmetic?size=16", batch_size=8)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, data)
    metrics = t.callback_metrics
    assert {"train/loss", "train/entropy", "train/mean_token_accuracy", "train/num_tokens"} <= set(metrics)
    assert metrics["train/num_tokens"] == module.num_tokens_seen > 0
    assert 0 < metrics["train/entropy"] <= math.log(264) + 1e-3
