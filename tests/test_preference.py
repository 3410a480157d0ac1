"""DPO, CPO/SimPO and ORPO modules: reference options, layouts, checkpoints, learning, bad input."""

import lightning as L
import pytest
import torch

from lit_align import CPO, DPO, ORPO, PreferenceDataModule
from lit_align.data.base import collate_examples
from lit_align.models.reference import mix_into


def adamw(lr=3e-3):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def trainer(**kwargs):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def pair_batch(tokenizer, layout="padded", size=6):
    dm = PreferenceDataModule(f"builtin:arithmetic?size={size}", shuffle=False, group_by_length=False).connect(tokenizer)
    dm.setup()
    items = [dm.datasets["train"][i] for i in range(size)]
    return collate_examples(items, tokenizer.pad_token_id, layout, capacity=256)


def first_loss(module, batch):
    module.configure_model()
    module.log_metrics = lambda *a, **k: None  # no trainer attached
    return module.training_step(batch, 0)


def test_dpo_loss_same_in_every_layout(tokenizer):
    losses = [first_loss(DPO(beta=0.5), pair_batch(tokenizer, layout)) for layout in ("padded", "packed", "padding_free")]
    assert pair_batch(tokenizer, "packed").input_ids.shape[0] < 12
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses[2], losses[0], atol=1e-6, rtol=1e-6)


def test_precomputed_reference_equals_live_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path))
    results = {}
    for precompute in (False, True):
        L.seed_everything(0)
        module = DPO(precompute_ref_log_probs=precompute, optimizer=adamw())
        data = PreferenceDataModule("builtin:arithmetic?size=16", batch_size=8, shuffle=False, group_by_length=False)
        t = trainer(max_steps=2, log_every_n_steps=1)
        t.fit(module, data)
        results[precompute] = (float(t.callback_metrics["train/loss"]), module.ref_model is None)
        if precompute:
            assert "ref_logps" in data.datasets["train"].column_names
            assert list((tmp_path / "ref_logps").glob("*.pt"))  # cached on disk
    assert results[True][1] and not results[False][1]  # no reference model held when precomputed
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)


def test_lora_reference_is_the_base_model(tokenizer):
    batch = pair_batch(tokenizer)
    base = DPO()
    base.configure_model()
    lora = DPO(peft={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False})
    lora.configure_model()
    assert lora.ref_model is None
    with torch.no_grad():
        expected = base.sequence_logps(base.model, batch).logps
        adapted = lora.sequence_logps(lora.model, batch).logps
    torch.testing.assert_close(lora.reference_logps(batch), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, expected)  # the adapters do change the policy


def test_reference_stays_out_of_checkpoints(tmp_path):
    module = DPO(optimizer=adamw())
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(max_steps=1, enable_checkpointing=True, callbacks=[ckpt])
    t.fit(module, PreferenceDataModule("builtin:arithmetic?size=8", batch_size=4))
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("model.") for k in state) and not any(k.startswith("ref_model.") for k in state)
    resumed = DPO(optimizer=adamw())
    trainer(max_steps=2).fit(resumed, PreferenceDataModule("builtin:arithmetic?size=8", batch_size=4), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.ref_model is not None


def test_tr_dpo_mixing():
    ref, pol = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.6 * pol.weight.detach() + 0.4 * ref.weight.detach()
    mix_into(ref, pol, 0.6)
    torch.testing.assert_close(ref.weight, expected)


def test_tr_dpo_syncs_every_n_steps():
    module = DPO(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=1.0, optimizer=adamw())
    t = trainer(max_steps=2)
    t.fit(module, PreferenceDataModule("builtin:arithmetic?size=8", batch_size=4))
    for a, b in zip(module.model.parameters(), module.ref_model.parameters()):
        torch.testing.assert_close(a, b)  # alpha 1 after step 2: the reference is the policy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "sigmod"}, "sigmod"),
        ({"loss_type": "nca_pair", "f_divergence_type": "js_divergence"}, "nca_pair"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
        ({"use_weighting": True, "loss_type": "aot"}, "aot"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"sync_ref_model": True, "peft": {"r": 4}}, "peft"),
    ],
)
def test_bad_dpo_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPO(**kwargs)


def test_bad_cpo_config():
    with pytest.raises(ValueError, match="expected one of"):
        CPO(loss_type="dpo")


def learn(module, steps=60, **data_kwargs):
    """Train on 64 synthetic pairs; return the first and last logged train metrics."""
    L.seed_everything(0)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, t, *args):
            seen.append({k[6:]: float(v) for k, v in t.callback_metrics.items() if k.startswith("train/")})

    data = PreferenceDataModule("builtin:arithmetic?size=64", batch_size=16, **data_kwargs)
    trainer(max_steps=steps, log_every_n_steps=1, callbacks=[Record()]).fit(module, data)
    return seen[0], seen[-1]


@pytest.mark.slow
def test_dpo_learns_the_pairs():
    first, last = learn(DPO(optimizer=adamw()))
    assert first["rewards/accuracies"] <= 0.6 and last["rewards/accuracies"] >= 0.9
    assert last["rewards/margins"] > first["rewards/margins"] + 1.0
    assert last["loss"] < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{}, {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0}], ids=["cpo", "simpo"])
def test_cpo_and_simpo_learn_the_pairs(kwargs):
    first, last = learn(CPO(optimizer=adamw(), **kwargs), packing=True, max_length=256)
    assert last["rewards/accuracies"] >= 0.9 and last["rewards/margins"] > first["rewards/margins"]


@pytest.mark.slow
def test_orpo_learns_the_pairs():
    first, last = learn(ORPO(optimizer=adamw()))
    # The NLL term dominates at beta (lambda) 0.1; the odds of the chosen solutions rise with it.
    assert last["nll_loss"] < 2.0 < 5.0 < first["nll_loss"]
    assert last["log_odds_chosen"] > first["log_odds_chosen"] + 0.05
    assert last["rewards/accuracies"] >= 0.7
