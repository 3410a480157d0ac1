"""KTO, BCO, RewardModel and PRM modules: data plumbing, checkpoints, learning, bad input."""

import warnings

import datasets
import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lit_align import (
    BCO,
    KTO,
    PRM,
    PreferenceDataModule,
    RewardModel,
    SaveHFModel,
    StepwiseDataModule,
    UnpairedPreferenceDataModule,
)
from lit_align.data.arithmetic import arithmetic_rows
from lit_align.data.formats import add_kl_sequences
from lit_align.rewards import RewardModelScorer


def adamw(lr=3e-3):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def trainer(**kwargs):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    return L.Trainer(**{**defaults, **kwargs})


def learn(module, data, steps=60):
    """Validation metrics over every training row (the DataModule's ``eval_split="train"``) before
    and after ``steps`` steps (a batch of 16 is too few to state an accuracy on); the last training
    step's metrics are in ``module.last_train_metrics``."""
    t = trainer(max_steps=steps, check_val_every_n_epoch=None, val_check_interval=steps)
    before = {k[4:]: float(v) for k, v in t.validate(module, data, verbose=False)[0].items()}
    t.fit(module, data)
    module.last_train_metrics = {k[6:]: float(v) for k, v in t.callback_metrics.items() if k.startswith("train/")}
    after = {k[4:]: float(v) for k, v in t.validate(module, data, verbose=False)[0].items()}
    return before, after


ONE_STEP = "size=64&steps=1&max_operand=9"  # the sums builtin:tiny-sft was fine-tuned on


def unpaired(learning, size=64):
    return UnpairedPreferenceDataModule(f"builtin:arithmetic?size={size}", batch_size=16, eval_split="train", seed=learning.seed)


def test_kl_sequences_pair_each_prompt_with_the_previous_completion():
    ds = datasets.Dataset.from_dict({
        "input_ids": [[[1, 2, 10, 11]], [[3, 20]], [[4, 5, 6, 30, 31]]],  # the last row already cut at 5
        "completion_mask": [[[0, 0, 1, 1]], [[0, 1]], [[0, 0, 0, 1, 1]]],
        "length": [4, 2, 5],
        "prompt_ids": [[1, 2], [3], [4, 5, 6]],
        "completion_ids": [[10, 11], [20], [30, 31, 32]],
    })
    out = add_kl_sequences(ds, UnpairedPreferenceDataModule("x", max_length=5).truncate)
    assert [ids[1] for ids in out["input_ids"]] == [[1, 2, 30, 31, 32], [3, 10, 11], [4, 5, 6, 20]]
    assert [m[1] for m in out["completion_mask"]] == [[0, 0, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1]]


def test_kto_asks_for_kl_pairs_and_apo_does_not(tokenizer):
    for loss_type, expected in (("kto", 2), ("apo_zero_unpaired", 1)):
        module = KTO(loss_type=loss_type)
        data = UnpairedPreferenceDataModule("builtin:arithmetic?size=8", batch_size=4)
        t = trainer(max_steps=1)
        t.fit(module, data)
        assert len(data.datasets["train"][0]["input_ids"]) == expected


def test_only_desirable_rows_is_an_error(tmp_path):
    rows = [{"prompt": "p", "completion": f"c{i}", "label": True} for i in range(4)]
    path = tmp_path / "good.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(path))
    for cls in (KTO, BCO):
        with pytest.raises(ValueError, match=r"needs both desirable and undesirable rows.*good.jsonl.*all True"):
            trainer(max_steps=1).fit(cls(), UnpairedPreferenceDataModule(str(path), batch_size=2))


def test_kto_warns_on_weights_outside_eq8(tmp_path):
    rows = [{"prompt": "p\n", "completion": f"c{i}", "label": i < 6} for i in range(8)]  # 6 desirable, 2 not
    path = tmp_path / "skewed.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(path))
    with pytest.warns(UserWarning, match=r"desirable_weight in \[0.33, 0.44\]"):
        trainer(max_steps=1).fit(KTO(optimizer=adamw()), UnpairedPreferenceDataModule(str(path), batch_size=4))


@pytest.mark.slow
@pytest.mark.learning
def test_kto_separates_desirable_from_undesirable(learning):
    before, after = learn(KTO(optimizer=adamw()), unpaired(learning))
    learning.record(margin_before=before["rewards/margins"], margin_after=after["rewards/margins"])
    assert after["rewards/margins"] > before["rewards/margins"] + 1.0
    assert after["rewards/chosen"] > after["rewards/rejected"]


@pytest.mark.slow
@pytest.mark.learning
def test_bco_separates_and_its_running_mean_survives_a_checkpoint(learning, tmp_path):
    module = BCO(optimizer=adamw())
    before, after = learn(module, unpaired(learning))
    learning.record(margin_before=before["rewards/margins"], margin_after=after["rewards/margins"])
    assert after["rewards/margins"] > before["rewards/margins"] + 1.0
    assert module.last_train_metrics["delta"] == pytest.approx(module.running.mean)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    restored = BCO()
    restored.on_load_checkpoint(checkpoint)
    assert restored.running.state_dict() == module.running.state_dict() and restored.running.count == 60 * 16


def test_unpaired_data_prepared_before_the_fit_gets_the_kl_pairs_kto_asks_for(tokenizer):
    """Set up outside a Trainer (no module: no KL pairs), then fit by KTO: prepared again with them."""
    data = UnpairedPreferenceDataModule("builtin:arithmetic?size=16", batch_size=8).connect(tokenizer)
    data.setup("fit")
    assert {len(seqs) for seqs in data.datasets["train"]["input_ids"]} == {1}
    trainer(max_steps=1).fit(KTO(optimizer=adamw()), data)
    assert {len(seqs) for seqs in data.datasets["train"]["input_ids"]} == {2}
    assert "train/kl" in data.trainer.callback_metrics


def test_bco_udm_weights_undesirable_rows():
    module = BCO(embedding_model_name_or_path="builtin:tiny", prompt_sample_size=16, optimizer=adamw())
    trainer(max_steps=2).fit(module, UnpairedPreferenceDataModule("builtin:arithmetic?size=32", batch_size=8))
    assert module.classifier is not None
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert "bco_udm" in checkpoint


@pytest.mark.slow
@pytest.mark.learning
def test_reward_model_learns_exports_and_scores(learning, tmp_path):
    """A reward model started from builtin:tiny-sft (as reward models start from the SFT policy)
    ranks the correct solution of every training pair above the slipped one."""
    module = RewardModel("builtin:tiny-sft", optimizer=adamw(1e-3))
    data = PreferenceDataModule(f"builtin:arithmetic?{ONE_STEP}", batch_size=16, eval_split="train", seed=learning.seed)
    export = SaveHFModel(str(tmp_path / "rm"))
    before, after = learn(module, data, steps=160)
    learning.record(accuracy_before=before["accuracy"], accuracy_after=after["accuracy"],
                    margin_before=before["margin"], margin_after=after["margin"])
    export.on_fit_end(trainer(max_steps=1), module)  # write the trained model as fit's end would
    assert after["accuracy"] >= 0.9 and after["margin"] > before["margin"] + 1.0
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").config.num_labels == 1
    rows = arithmetic_rows("preference", size=64, steps=1, max_operand=9)[:8]
    scorer = RewardModelScorer(str(tmp_path / "rm"), device="cpu")
    good = scorer([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    bad = scorer([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(g > b for g, b in zip(good, bad)) >= 7  # the trained pairs are ranked as trained
    # The scorer tokenizes as training did: its scores equal the module's own on the same rows.
    module.eval()
    batch = data.collate([data.datasets["train"][i] for i in range(2)])
    with torch.no_grad():
        own = module.predict_step(batch, 0)  # chosen 0, chosen 1, rejected 0, rejected 1
    torch.testing.assert_close(own, torch.tensor([*good[:2], *bad[:2]]), atol=1e-5, rtol=1e-5)


def test_reward_margin_column_is_used(tmp_path):
    rows = [{"prompt": "Q\n", "chosen": "yes", "rejected": "no", "margin": 2.0}] * 4
    path = tmp_path / "m.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(path))
    data = PreferenceDataModule(str(path), batch_size=4)
    module = RewardModel()
    trainer(max_steps=1).fit(module, data)
    batch = data.collate([data.datasets["train"][i] for i in range(4)])
    assert torch.equal(batch.margin, torch.full((4,), 2.0))


@pytest.mark.slow
@pytest.mark.learning
def test_prm_learns_steps_and_scores_them(learning):
    """A process reward model started from builtin:tiny-sft labels the steps of the training solutions."""
    module = PRM("builtin:tiny-sft", optimizer=adamw(1e-3))
    data = StepwiseDataModule(f"builtin:arithmetic?{ONE_STEP}", batch_size=16, eval_split="train", seed=learning.seed)
    before, after = learn(module, data, steps=160)
    learning.record(accuracy_before=before["accuracy"], accuracy_after=after["accuracy"])
    assert after["accuracy"] >= 0.85 > 0.7 > before["accuracy"]
    rows = [data.datasets["train"][i] for i in range(3)]
    scores = module.score_steps(data.collate(rows))
    labelled = [sum(label != -100 for label in row["step_labels"][0]) for row in rows]
    assert [len(s) for s in scores] == labelled and all(n >= 2 for n in labelled)  # one score per step
    assert all(0.0 <= p <= 1.0 for s in scores for p in s)


def test_prm_last_step_only_and_validation_metrics():
    module = PRM(train_on_last_step_only=True, optimizer=adamw(1e-3))
    data = StepwiseDataModule("builtin:arithmetic?size=32", batch_size=8, eval_split="test")
    t = trainer(max_steps=2, limit_val_batches=2)
    t.fit(module, data)
    out = t.validate(module, data, verbose=False)[0]
    assert {"val/accuracy", "val/precision", "val/recall", "val/loss"} <= set(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert 0.0 <= out["val/accuracy"] <= 1.0


def test_reward_model_drops_pairs_longer_than_max_length():
    """As TRL's RewardTrainer: a pair over max_length is dropped, not truncated (DPO truncates it)."""
    from lit_align import DPO, PreferenceDataModule, RewardModel
    from lit_align.models.builtin import builtin_tokenizer

    source = "builtin:arithmetic?size=24&steps=3&max_operand=20"
    whole = PreferenceDataModule(source, max_length=None).connect(builtin_tokenizer("builtin:tiny"))
    whole.setup()
    longest = [max(len(s) for s in seqs) for seqs in whole.datasets["train"]["input_ids"]]
    cap = sorted(longest)[len(longest) // 2]
    prepared = {}
    for module in (DPO(), RewardModel()):
        dm = PreferenceDataModule(source, max_length=cap).connect(module.tokenizer, module.data_requirements())
        dm.setup()
        prepared[type(module).__name__] = dm
    assert len(prepared["DPO"].datasets["train"]) == len(longest)
    kept = prepared["RewardModel"].datasets["train"]
    assert len(kept) == sum(n <= cap for n in longest) < len(longest)
    assert all(len(s) <= cap for seqs in kept["input_ids"] for s in seqs)
