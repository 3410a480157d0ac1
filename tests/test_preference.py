"""DPO, CPO/SimPO and ORPO modules: reference options, layouts, checkpoints, learning, bad input."""

import warnings

import lightning as L
import pytest
import torch

from lit_align import CPO, DPO, ORPO, PreferenceDataModule
from lit_align.models.reference import mix_into
from lit_align.ops.packing import collate_examples
from tests.test_online import fit


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
    torch.testing.assert_close(lora.reference_sequence_logps(batch), expected, atol=1e-5, rtol=1e-5)
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


def learn(module, learning, steps=60, extra=(), **data_kwargs):
    """Train on 64 synthetic pairs (batches of 16); the validation metrics over all 64 pairs before
    and after (one batch of 16 is too few to state an accuracy on), recorded with ``extra`` ones."""
    data = PreferenceDataModule("builtin:arithmetic?size=64", batch_size=16, eval_split="train", seed=learning.seed, **data_kwargs)
    t = trainer(max_steps=steps, log_every_n_steps=1, check_val_every_n_epoch=None, val_check_interval=steps)
    before = {k[4:]: float(v) for k, v in t.validate(module, data, verbose=False)[0].items()}
    t.fit(module, data)
    after = {k[4:]: float(v) for k, v in t.validate(module, data, verbose=False)[0].items()}
    learning.record(**{f"{k}_before": before[k] for k in ("rewards/accuracies", "rewards/margins", *extra)},
                    **{f"{k}_after": after[k] for k in ("rewards/accuracies", "rewards/margins", "loss", *extra)})
    return before, after


@pytest.mark.slow
@pytest.mark.learning
def test_dpo_learns_the_pairs(learning):
    before, after = learn(DPO(optimizer=adamw()), learning)
    assert before["rewards/accuracies"] <= 0.6 and after["rewards/accuracies"] >= 0.9
    assert after["rewards/margins"] > before["rewards/margins"] + 1.0
    assert after["loss"] < 0.3


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize(
    "kwargs,lr,steps",
    [({}, 3e-3, 120), ({"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0}, 1e-3, 200)],  # SimPO: smaller steps, longer
    ids=["cpo", "simpo"],
)
def test_cpo_and_simpo_learn_the_pairs(learning, kwargs, lr, steps):
    before, after = learn(CPO(optimizer=adamw(lr), **kwargs), learning, steps=steps, packing=True, max_length=256)
    assert after["rewards/accuracies"] >= 0.9 and after["rewards/margins"] > before["rewards/margins"] + 1.0


@pytest.mark.slow
@pytest.mark.learning
def test_orpo_learns_the_pairs(learning):
    # lambda (beta) 1 so that in 120 steps the odds-ratio term shows, not only the NLL term.
    before, after = learn(ORPO(beta=1.0, optimizer=adamw()), learning, steps=120, extra=("nll_loss", "log_odds_chosen"))
    assert after["nll_loss"] < 2.0 < 5.0 < before["nll_loss"]
    assert after["log_odds_chosen"] > before["log_odds_chosen"] + 0.5
    assert after["rewards/accuracies"] >= 0.9 and after["rewards/margins"] > before["rewards/margins"] + 0.3


def test_generate_during_eval_logs_the_policys_completions(tmp_path):
    """TRL's generate_during_eval on CPO and ORPO: at validation, the policy completes the first
    batch's prompts, logged as the W&B table game_log (Prompt, Policy)."""
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from lit_align import CPO, ORPO, PreferenceDataModule

    for cls in (CPO, ORPO):
        logger = WandbLogger(project="lit-align", save_dir=str(tmp_path), offline=True)
        tables: list = []
        logger.log_table = lambda key, columns, data, into=tables: into.append((key, columns, data))
        data = PreferenceDataModule("builtin:arithmetic?size=16&steps=1&max_operand=4", batch_size=4, eval_split=0.25, max_length=64)
        L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=logger,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  ).fit(cls(generate_during_eval=True), data)
        import wandb

        wandb.finish()
        assert [(k, c) for k, c, _ in tables] == [("game_log", ["Prompt", "Policy"])]
        rows = tables[0][2]
        assert len(rows) == 4 and all(p.startswith("Compute") and isinstance(c, str) for p, c in rows)
    with pytest.warns(UserWarning, match="generate_during_eval logs its completions to W&B, and the Trainer has no WandbLogger"):
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(CPO(generate_during_eval=True), data)


@pytest.mark.parametrize("extra_eval", [False, True])
def test_the_frozen_reference_in_eval_mode_is_not_warned_about(extra_eval):
    """Lightning warns about modules in eval mode as training starts; the reference is frozen on purpose,
    so only a module of the policy left in eval mode (here by a callback) is worth the warning."""

    class EvalNorm(L.Callback):
        def on_fit_start(self, trainer, module):
            module.model.get_decoder().norm.eval()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(DPO(), PreferenceDataModule("builtin:arithmetic?size=8", batch_size=4), steps=1,
            callbacks=[EvalNorm()] if extra_eval else [])
    warned = [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]
    assert len(warned) == int(extra_eval), warned
