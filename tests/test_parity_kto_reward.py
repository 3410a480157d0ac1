"""End-to-end parity of lit-align KTO and the reward model with TRL 1.16 ``KTOTrainer`` and ``RewardTrainer``
(docs/methods.md §4, §5), fp32, ``builtin:tiny``.

Same conventions as ``test_parity_preference.py`` (whose fixtures and helpers are imported): both sides start
from the same weights and read the same raw rows in the same order, each through its own pipeline and forward.

KTO, unpaired rows (``prompt``/``completion``/``label``) or preference pairs unpaired on the fly:

1. tokenization: TRL's ``prompt_ids``/``completion_ids``/``KL_completion_ids`` against our two sequences per
   row (the row, then its mismatched KL sequence), then the collated batch. TRL rotates the KL completions within
   blocks of ``per_device_train_batch_size`` rows, lit-align over the whole dataset (``add_kl_sequences``): on
   one block of rows the two are identical, which is what the parity tests use;
2. the first-step loss and every metric TRL logs (``kl``, ``rewards/*``, ``logps/*``, ``logits/*`` = the mean
   over the vocabulary of the logits at each completion position, averaged over the class's completion tokens,
   ``entropy``, ``num_tokens``) for both loss types, class weights, standard and conversational rows, from a
   briefly trained policy against a perturbed reference (``policy_dir``/``ref_dir``);
3. lit-align alone: the packed layout gives the padded loss;
4. three AdamW steps: per-step losses and final weights to 1e-4.

Reward model: TRL loads ``AutoModelForSequenceClassification`` from a path, so lit-align's initial classifier
(``load_classifier("builtin:tiny", "sequence", 1)``) is saved and both sides load it. Tokenization (TRL
tokenizes prompt+chosen whole), first-step loss and metrics with and without a ``margin`` column and
``center_rewards_coefficient``, the packed layout, three AdamW steps.

Section 5 pins down the differences found, with their cause (``xfail(strict=True)`` where lit-align departs).
"""

from __future__ import annotations

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the Hub
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

from lit_align import KTO, RewardModel, UnpairedPreferenceDataModule
from lit_align.data.arithmetic import arithmetic_rows
from lit_align.models.builtin import builtin_model, builtin_tokenizer
from lit_align.models.heads import load_classifier
from lit_align.ops.forward import target_mask
from tests import test_parity_preference as _preference
from tests.test_parity_preference import (
    BATCH,
    EDGE_CONVERSATIONAL,
    MODEL,
    _adamw,
    _approx,
    _assert_metrics,
    _fit,
    _lit_batch,
    _lit_data,
    _lit_first_step,
    _rows,
    _save,
    _trl,
    _write_jsonl,
)

trl = pytest.importorskip("trl")
from trl import KTOConfig, KTOTrainer, RewardConfig, RewardTrainer  # noqa: E402
from trl.data_utils import extract_prompt, unpair_preference_dataset  # noqa: E402

# Unpaired edge rows: non-ASCII bytes, a completion already ending with EOS (no second one), whitespace at the
# boundary; system and multi-turn prompts.
EDGE_UNPAIRED_STANDARD = [
    {"prompt": "Héllo wörld 🚀 ", "completion": "ça va ✓", "label": True},
    {"prompt": "Q: 2+2?", "completion": " 4<|im_end|>", "label": True},
    {"prompt": "x", "completion": "y\n", "label": False},
    {"prompt": "Q: 3+3?", "completion": " 5 ✗", "label": False},
]
EDGE_UNPAIRED_CONVERSATIONAL = [
    {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
    for row in EDGE_CONVERSATIONAL
    for side in ("chosen", "rejected")
]
KTO_METRICS = (
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
)
REWARD_METRICS = ("accuracy", "margin", "mean_reward", "min_reward", "max_reward", "num_tokens")


# --------------------------------------------------------------------------- fixtures / helpers

# The preference parity module's fixtures: one intra-op thread (autouse), builtin:tiny saved for TRL, a briefly
# trained policy and a perturbed reference (module-scoped, so built once per module).
_one_thread = _preference._one_thread
model_dir, policy_dir, ref_dir = _preference.model_dir, _preference.policy_dir, _preference.ref_dir


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """lit-align's initial reward model (builtin backbone + seeded ``score`` head) saved for both sides."""
    return _save(load_classifier(MODEL, "sequence", 1), tmp_path_factory.mktemp("classifier"))


def _kto_rows(kind: str, n: int = BATCH) -> list[dict]:
    """Unpaired rows (``n``), or ``paired_*``: ``n // 2`` preference pairs (``n`` rows once unpaired)."""
    fixed = {"edge_standard": EDGE_UNPAIRED_STANDARD, "edge_conversational": EDGE_UNPAIRED_CONVERSATIONAL}
    if kind in fixed:
        return fixed[kind]
    if kind.startswith("paired_"):
        return arithmetic_rows("preference", size=n // 2, conversational=kind == "paired_conversational")
    return arithmetic_rows("unpaired_preference", size=n, conversational=kind == "conversational")


def _trl_unpaired(pairs: list[dict]) -> list[dict]:
    """The unpaired rows TRL's KTOTrainer builds from ``pairs`` (prompt extracted first), in its order."""
    import datasets

    ds = datasets.Dataset.from_list(pairs)
    if "prompt" not in ds.column_names:
        ds = ds.map(extract_prompt)
    return unpair_preference_dataset(ds).to_list()


def _trl_kto(model_dir: str, rows: list[dict], out_dir, **kw) -> KTOTrainer:
    return _trl(KTOTrainer, KTOConfig, model_dir, rows, out_dir, **kw)


def _kto_batch(trainer: KTOTrainer, start: int = 0) -> dict[str, torch.Tensor]:
    ds = trainer.train_dataset
    keys = [k for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label") if k in ds.column_names]
    return trainer.data_collator(
        [{k: ds[i][k] for k in keys} for i in range(start, min(start + BATCH, len(ds)))]
    )


def _kto_data(
    rows: list[dict], tmp_path, max_length: int | None = 1024, **kwargs
) -> UnpairedPreferenceDataModule:
    """``kl_pairs`` must be given outside a Trainer (None asks the module being trained)."""
    data = UnpairedPreferenceDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"),
        batch_size=BATCH,
        shuffle=False,
        group_by_length=False,
        max_length=max_length,
        **kwargs,
    ).connect(builtin_tokenizer(MODEL))
    data.setup("fit")
    return data


def _trl_first_step(trainer) -> tuple[float, dict[str, float]]:
    trainer.model.train()
    batch = _kto_batch(trainer) if isinstance(trainer, KTOTrainer) else _reward_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _reward_batch(trainer: RewardTrainer) -> dict[str, torch.Tensor]:
    ds = trainer.train_dataset
    keys = [k for k in ("chosen_ids", "rejected_ids", "margin") if k in ds.column_names]
    return trainer.data_collator([{k: ds[i][k] for k in keys} for i in range(min(BATCH, len(ds)))])


def _assert_same_weights(module, trainer, initial: dict[str, torch.Tensor]) -> None:
    weights = module.model.state_dict()
    ref_weights = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # lr=1e-3 really moves the weights (Adam: about lr per step), well beyond the 1e-4 tolerance.
    assert max((weights[n] - initial[n]).abs().max().item() for n in weights) > 2e-3


# --------------------------------------------------------------------------- 1. KTO tokenization


def _assert_same_kto_tokenization(trainer: KTOTrainer, data: UnpairedPreferenceDataModule) -> None:
    """Per row: label, prompt+completion and prompt+KL completion (when TRL builds them), completions starting at
    TRL's prompt length; then the collated first batch."""
    theirs, ours = trainer.train_dataset, data.datasets["train"]
    kl = "KL_completion_ids" in theirs.column_names
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        assert ours[i]["label"] == theirs[i]["label"], f"row {i}: label"
        assert len(ours[i]["input_ids"]) == 1 + kl
        prompt = theirs[i]["prompt_ids"]
        keys = ("completion_ids", "KL_completion_ids") if kl else ("completion_ids",)
        for j, key in enumerate(keys):
            completion = theirs[i][key]
            assert ours[i]["input_ids"][j] == prompt + completion, f"row {i} {key}: ids differ"
            assert ours[i]["completion_mask"][j] == [0] * len(prompt) + [1] * len(completion), (
                f"row {i} {key}"
            )
    _assert_same_kto_batch(trainer, data, kl)


def _assert_same_kto_batch(trainer: KTOTrainer, data: UnpairedPreferenceDataModule, kl: bool) -> None:
    """The collated first batch (TRL truncates there): our rows ``:E`` are TRL's batch, rows ``E:`` its KL batch
    (ours pads both to one width, TRL each to its own), and the same scored positions."""
    ref, batch = _kto_batch(trainer), _lit_batch(data)
    e = batch.num_examples
    assert e == len(ref["label"]) and batch.num_sequences == (1 + kl) * e
    assert torch.equal(batch.labels, ref["label"])
    for prefix, rows in (("", slice(None, e)), ("KL_", slice(e, None)))[: 1 + kl]:
        width = ref[f"{prefix}input_ids"].shape[1]
        assert not batch.attention_mask[rows, width:].any(), f"{prefix}: longer sequences"
        assert torch.equal(batch.input_ids[rows, :width], ref[f"{prefix}input_ids"]), prefix
        assert torch.equal(batch.attention_mask[rows, :width], ref[f"{prefix}attention_mask"]), prefix
        assert torch.equal(batch.completion_mask[rows, :width], ref[f"{prefix}completion_mask"].bool()), (
            prefix
        )
    # TRL scores the targets whose label is not -100 (labels = input_ids where completion_mask)
    targets = target_mask(batch, batch.completion_mask)[:e, : ref["input_ids"].shape[1] - 1]
    assert torch.equal(targets, ref["completion_mask"][:, 1:].bool())


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])  # apo_zero_unpaired: no KL sequences
@pytest.mark.parametrize("kind", ["standard", "conversational", "edge_standard", "edge_conversational"])
def test_kto_tokenization_matches_trl(kind: str, loss_type: str, model_dir: str, tmp_path) -> None:
    rows = _kto_rows(kind)
    trainer = _trl_kto(model_dir, rows, tmp_path / "trl", loss_type=loss_type)
    data = _kto_data(rows, tmp_path, kl_pairs=loss_type == "kto")
    _assert_same_kto_tokenization(trainer, data)
    if kind == "edge_standard":  # EOS once, also where the completion already ended with it
        assert all(
            ids[-1] == builtin_tokenizer(MODEL).eos_token_id
            for ids in trainer.train_dataset["completion_ids"]
        )
        assert (
            trainer.train_dataset[1]["completion_ids"][-2] != trainer.train_dataset[1]["completion_ids"][-1]
        )


@pytest.mark.parametrize("kind", ["paired_standard", "paired_conversational", "implicit_standard"])
def test_kto_unpaired_pairs_tokenize_as_trl_in_trl_order(kind: str, model_dir: str, tmp_path) -> None:
    """Preference pairs: TRL unpairs them itself; lit-align, given the same rows unpaired in TRL's order, builds
    the same sequences and KL sequences (the order lit-align unpairs in: section 5)."""
    pairs = _rows(kind) if kind == "implicit_standard" else _kto_rows(kind)
    trainer = _trl_kto(model_dir, pairs, tmp_path / "trl")
    data = _kto_data(_trl_unpaired(pairs), tmp_path, kl_pairs=True)
    _assert_same_kto_tokenization(trainer, data)


@pytest.mark.parametrize("kind", ["paired_standard", "paired_conversational", "implicit_standard"])
def test_kto_pairs_unpair_to_the_same_rows_as_trl(kind: str, model_dir: str, tmp_path) -> None:
    """Auto-unpairing on both sides gives the same set of (sequence, label) rows, prompts extracted the same
    way when implicit; only their order differs (section 5)."""
    pairs = _rows(kind) if kind == "implicit_standard" else _kto_rows(kind)
    theirs = _trl_kto(model_dir, pairs, tmp_path / "trl", loss_type="apo_zero_unpaired").train_dataset
    ours = _kto_data(pairs, tmp_path, kl_pairs=False).datasets["train"]
    assert len(ours) == len(theirs) == 2 * len(pairs)
    as_rows = sorted(
        (tuple(r["prompt_ids"] + r["completion_ids"]), len(r["prompt_ids"]), r["label"]) for r in theirs
    )
    ours_rows = sorted((tuple(r["input_ids"][0]), r["completion_mask"][0].index(1), r["label"]) for r in ours)
    assert ours_rows == as_rows


def _long_prompt_rows() -> list[dict]:
    """Arithmetic rows that max_length=40 cuts inside the completion, and one whose prompt alone fills it."""
    return [*_kto_rows("standard", BATCH - 1), {"prompt": "p" * 45, "completion": "too late", "label": False}]


def test_kto_truncation_matches_trl(model_dir: str, tmp_path) -> None:
    """max_length=40 (TRL: keep_start in the collator, lit-align at tokenization): the row whose prompt alone
    fills max_length is dropped by both, the others are cut to the same ids (without KL sequences; with them,
    section 5)."""
    rows = _long_prompt_rows()
    trainer = _trl_kto(model_dir, rows, tmp_path / "trl", max_length=40, loss_type="apo_zero_unpaired")
    data = _kto_data(rows, tmp_path, max_length=40, kl_pairs=False)
    assert len(trainer.train_dataset) == len(data.datasets["train"]) == len(rows) - 1
    assert _lit_batch(data).input_ids.shape == (len(rows) - 1, 40)
    _assert_same_kto_batch(trainer, data, kl=False)


# --------------------------------------------------------------------------- 2. KTO first-step loss

KTO_CASES = {
    "kto": {"loss_type": "kto"},
    "kto-weighted": {"loss_type": "kto", "desirable_weight": 1.5, "undesirable_weight": 1.0},
    "kto-beta": {"loss_type": "kto", "beta": 0.5, "undesirable_weight": 1.33},
    "apo_zero_unpaired": {"loss_type": "apo_zero_unpaired"},
    "apo_zero_unpaired-weighted": {
        "loss_type": "apo_zero_unpaired",
        "desirable_weight": 1.5,
        "undesirable_weight": 1.0,
    },
}


def _kto_first_steps(rows, policy_dir, ref_dir, tmp_path, config, lit_rows=None):
    trainer = _trl_kto(policy_dir, rows, tmp_path / "trl", ref_dir=ref_dir, **config)
    ref_loss, ref_metrics = _trl_first_step(trainer)
    module = KTO(policy_dir, ref_model_name_or_path=ref_dir, **config)
    data = _kto_data(rows if lit_rows is None else lit_rows, tmp_path, kl_pairs=module.needs_kl_pairs)
    loss, metrics = _lit_first_step(module, _lit_batch(data))
    return (loss.item(), metrics), (ref_loss, ref_metrics)


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_first_step_matches_trl(case: str, policy_dir: str, ref_dir: str, tmp_path) -> None:
    config = KTO_CASES[case]
    (loss, metrics), (ref_loss, ref_metrics) = _kto_first_steps(
        _kto_rows("standard"), policy_dir, ref_dir, tmp_path, config
    )
    assert loss == _approx(ref_loss)
    assert metrics["loss"] == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, KTO_METRICS)
    if config["loss_type"] == "kto":
        assert ref_metrics["kl"] > 1e-2  # the reference really differs: z is not clamped to 0
    else:  # no KL sequences: the token counts agree (with them, see section 5)
        assert ref_metrics["kl"] == metrics["kl"] == 0.0
        assert metrics["num_tokens"] == ref_metrics["num_tokens"]
    assert abs(metrics["rewards/chosen"]) > 1e-2 and abs(metrics["rewards/rejected"]) > 1e-2


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kind", ["conversational", "paired_standard"])
def test_kto_first_step_matches_trl_other_rows(
    kind: str, loss_type: str, policy_dir: str, ref_dir: str, tmp_path
) -> None:
    """Conversational rows; preference pairs, which TRL unpairs and lit-align is given unpaired in TRL's order."""
    rows = _kto_rows(kind)
    lit_rows = _trl_unpaired(rows) if kind.startswith("paired") else None
    config = {"loss_type": loss_type, "desirable_weight": 1.5}
    (loss, metrics), (ref_loss, ref_metrics) = _kto_first_steps(
        rows, policy_dir, ref_dir, tmp_path, config, lit_rows
    )
    assert loss == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, KTO_METRICS)


def test_kto_pairs_unpaired_by_lit_align_match_trl_without_kl(
    policy_dir: str, ref_dir: str, tmp_path
) -> None:
    """apo_zero_unpaired on pairs, unpaired by each side: one batch holds every row, and without the KL term
    the loss and metrics do not depend on the order of the rows, so they agree although the orders differ."""
    pairs = _kto_rows("paired_standard")
    config = {"loss_type": "apo_zero_unpaired", "desirable_weight": 1.5}
    (loss, metrics), (ref_loss, ref_metrics) = _kto_first_steps(pairs, policy_dir, ref_dir, tmp_path, config)
    assert loss == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, (*KTO_METRICS, "num_tokens"))


# --------------------------------------------------------------------------- 3. layouts


def test_kto_packed_matches_padded(policy_dir: str, ref_dir: str, tmp_path) -> None:
    """Rows and KL sequences packed into rows of 256 tokens give the padded loss and metrics."""
    rows = _kto_rows("standard")
    module = KTO(policy_dir, ref_model_name_or_path=ref_dir, desirable_weight=1.5)
    ref_loss, ref_metrics = _lit_first_step(
        module, _lit_batch(_kto_data(rows, tmp_path / "padded", kl_pairs=True))
    )
    batch = _lit_batch(_kto_data(rows, tmp_path / "packed", max_length=256, packing=True, kl_pairs=True))
    assert batch.attention_mask is None and batch.num_sequences == 2 * len(rows)
    assert 1 < batch.input_ids.shape[0] < 2 * len(rows)
    loss, metrics = _lit_first_step(module, batch)
    assert loss.item() == _approx(ref_loss.item())
    _assert_metrics(metrics, ref_metrics, [n for n in ref_metrics if n != "num_tokens"])  # cumulative


def test_reward_packed_matches_padded(classifier_dir: str, tmp_path) -> None:
    """The reward read at each sequence's last token from ``sequence_ids``: packed = padded."""
    rows = [{**row, "margin": 0.25 * i} for i, row in enumerate(_rows("standard"))]
    module = RewardModel(classifier_dir, center_rewards_coefficient=0.01)
    ref_loss, ref_metrics = _lit_first_step(module, _lit_batch(_lit_data(rows, tmp_path / "padded")))
    batch = _lit_batch(_lit_data(rows, tmp_path / "packed", max_length=256, packing=True))
    assert batch.attention_mask is None and batch.num_sequences == 2 * len(rows)
    assert 1 < batch.input_ids.shape[0] < 2 * len(rows)
    loss, metrics = _lit_first_step(module, batch)
    assert loss.item() == _approx(ref_loss.item())
    _assert_metrics(metrics, ref_metrics, [n for n in ref_metrics if n != "num_tokens"])


# --------------------------------------------------------------------------- reward model: tokenization


def test_saved_classifier_loads_identically(classifier_dir: str) -> None:
    from transformers import AutoModelForSequenceClassification

    ours = load_classifier(classifier_dir, "sequence", 1).state_dict()
    theirs = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=1).state_dict()
    fresh = load_classifier(MODEL, "sequence", 1).state_dict()
    assert ours.keys() == theirs.keys() == fresh.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]) and torch.equal(ours[name], fresh[name]), name
    backbone = builtin_model(MODEL).model.state_dict()
    assert all(torch.equal(ours[f"model.{k}"], v) for k, v in backbone.items())


@pytest.mark.parametrize(
    "kind",
    [
        "standard",
        "conversational",
        "edge_standard",
        "edge_conversational",
        "implicit_standard",
        "implicit_conversational",
    ],
)
def test_reward_tokenization_matches_trl(kind: str, classifier_dir: str, tmp_path) -> None:
    """TRL tokenizes prompt+chosen (and prompt+rejected) whole, EOS appended to standard completions; lit-align
    tokenizes prompt and completion as for DPO: the same ids with the byte tokenizer, and the same batch."""
    rows = _rows(kind)
    trainer = _trl(RewardTrainer, RewardConfig, classifier_dir, rows, tmp_path / "trl")
    data = _lit_data(rows, tmp_path)
    theirs, ours = trainer.train_dataset, data.datasets["train"]
    assert len(theirs) == len(ours) == len(rows)
    for i in range(len(ours)):
        assert ours[i]["input_ids"] == [theirs[i]["chosen_ids"], theirs[i]["rejected_ids"]], f"row {i}"
    ref, batch = _reward_batch(trainer), _lit_batch(data)
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])


# --------------------------------------------------------------------------- reward model: first step

REWARD_CASES = {
    "plain": ({}, False),
    "margin": ({}, True),
    "center": ({"center_rewards_coefficient": 0.01}, False),
    "margin-center": ({"center_rewards_coefficient": 0.1}, True),
}


@pytest.mark.parametrize("case", list(REWARD_CASES))
def test_reward_first_step_matches_trl(case: str, classifier_dir: str, tmp_path) -> None:
    config, with_margin = REWARD_CASES[case]
    rows = _rows("standard")
    if with_margin:  # margins of either sign, as large as the reward differences
        rows = [{**row, "margin": 0.5 * (i - 3)} for i, row in enumerate(rows)]
    trainer = _trl(RewardTrainer, RewardConfig, classifier_dir, rows, tmp_path / "trl", **config)
    ref_loss, ref_metrics = _trl_first_step(trainer)
    assert ("margin" in _reward_batch(trainer)) == with_margin
    batch = _lit_batch(_lit_data(rows, tmp_path))
    assert (batch.margin is not None) == with_margin
    loss, metrics = _lit_first_step(RewardModel(classifier_dir, **config), batch)
    assert loss.item() == _approx(ref_loss)
    assert metrics["loss"] == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, REWARD_METRICS)
    assert 0 < metrics["accuracy"] < 1 and metrics["min_reward"] < metrics["max_reward"]  # not degenerate


def test_reward_first_step_matches_trl_conversational(classifier_dir: str, tmp_path) -> None:
    rows = [{**row, "margin": 0.1} for row in _rows("conversational")]
    trainer = _trl(RewardTrainer, RewardConfig, classifier_dir, rows, tmp_path / "trl")
    ref_loss, ref_metrics = _trl_first_step(trainer)
    loss, metrics = _lit_first_step(RewardModel(classifier_dir), _lit_batch(_lit_data(rows, tmp_path)))
    assert loss.item() == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, REWARD_METRICS)


# --------------------------------------------------------------------------- 4. three AdamW steps


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_three_adamw_steps_match_trl(loss_type: str, model_dir: str, tmp_path) -> None:
    """Each side's default reference (a copy loaded from the policy's path). ``kto``: one block of rows, the only
    dataset where TRL's per-block KL rotation and ours agree, taken three times (the KL term is 0 at the first
    step only); ``apo_zero_unpaired``: three different batches. The data module asks the module for KL pairs."""
    steps = 3
    rows = _kto_rows("standard", BATCH if loss_type == "kto" else steps * BATCH)
    config = {"loss_type": loss_type, "desirable_weight": 1.2}
    trainer = _trl_kto(model_dir, rows, tmp_path / "trl", max_steps=steps, **config)
    trainer.train()

    module = KTO(MODEL, optimizer=_adamw, **config)
    data = UnpairedPreferenceDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"), batch_size=BATCH, shuffle=False, group_by_length=False
    ).connect(builtin_tokenizer(MODEL))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = _fit(module, data, steps)
    assert len(data.datasets["train"][0]["input_ids"]) == 1 + (loss_type == "kto")

    assert len(trainer.recorded_losses) == len(record.losses) == steps
    assert record.losses == pytest.approx(trainer.recorded_losses, abs=1e-4)
    _assert_same_weights(module, trainer, builtin_model(MODEL).state_dict())
    if loss_type == "kto":  # a real Trainer logs TRL's KL estimate under train/kl
        logs = [h for h in trainer.state.log_history if "kl" in h]
        assert [m["train/kl"] for m in record.metrics] == pytest.approx([h["kl"] for h in logs], abs=1e-4)
        assert record.metrics[-1]["train/kl"] > 0


def test_reward_three_adamw_steps_match_trl(classifier_dir: str, tmp_path) -> None:
    steps = 3
    rows = [{**row, "margin": 0.1 * (i % 5)} for i, row in enumerate(_rows("standard", steps * BATCH))]
    config = {"center_rewards_coefficient": 0.01}
    trainer = _trl(
        RewardTrainer, RewardConfig, classifier_dir, rows, tmp_path / "trl", max_steps=steps, **config
    )
    trainer.train()

    module = RewardModel(classifier_dir, optimizer=_adamw, **config)
    record = _fit(module, _lit_data(rows, tmp_path), steps)

    assert len(trainer.recorded_losses) == len(record.losses) == steps
    assert record.losses == pytest.approx(trainer.recorded_losses, abs=1e-4)
    _assert_same_weights(module, trainer, load_classifier(classifier_dir, "sequence", 1).state_dict())


# --------------------------------------------------------------------------- 5. known departures from TRL


def test_kto_kl_rotation_is_over_the_dataset_not_per_block(model_dir: str, tmp_path) -> None:
    """Documented departure (``add_kl_sequences``): TRL rotates the KL completions within each block of
    ``per_device_train_batch_size`` rows, lit-align over the whole dataset. On two blocks only the first row of
    each block differs: TRL pairs it with its own block's last completion, lit-align with the previous row's."""
    rows = _kto_rows("standard", 2 * BATCH)
    theirs = _trl_kto(model_dir, rows, tmp_path / "trl").train_dataset
    ours = _kto_data(rows, tmp_path, kl_pairs=True).datasets["train"]
    differ = [
        i
        for i in range(len(rows))
        if ours[i]["input_ids"][1] != theirs[i]["prompt_ids"] + theirs[i]["KL_completion_ids"]
    ]
    assert differ == [0, BATCH]
    for i in differ:
        last = i + BATCH - 1  # TRL: the block's last completion; lit-align: the row before (cyclically)
        assert theirs[i]["KL_completion_ids"] == theirs[last]["completion_ids"]
        assert ours[i]["input_ids"][1] == theirs[i]["prompt_ids"] + theirs[i - 1]["completion_ids"]


def test_kto_unpairing_order_matches_trl(model_dir: str, tmp_path) -> None:
    """TRL's ``unpair_preference_dataset`` (``_unpair_row``, ``map(batched=True)``, 1000 pairs a batch) gives
    ``chosen_0..chosen_{n-1}, rejected_0..rejected_{n-1}``; lit-align's ``_unpair`` gives
    ``chosen_0, rejected_0, chosen_1, ...``."""
    pairs = _kto_rows("paired_standard")
    theirs = _trl_kto(model_dir, pairs, tmp_path / "trl", loss_type="apo_zero_unpaired").train_dataset
    ours = _kto_data(pairs, tmp_path, kl_pairs=False).datasets["train"]
    assert theirs["label"] == [True] * len(pairs) + [False] * len(pairs)
    assert ours["label"] == theirs["label"]


def test_kto_kl_sequences_of_pairs_are_mismatched(model_dir: str, tmp_path) -> None:
    """KTO's KL term is estimated from *mismatched* (prompt, completion) pairs. In TRL's order every KL
    completion comes from another prompt; in lit-align's interleaved order the KL sequence of each rejected row
    is its own pair's prompt + chosen completion, i.e. exactly the chosen row, so half of ``z`` is the chosen
    rows' implied reward (``z`` then moves with the rewards it is the reference point for)."""
    pairs = _kto_rows("paired_standard")
    theirs = _trl_kto(model_dir, pairs, tmp_path / "trl").train_dataset
    main = {tuple(r["prompt_ids"] + r["completion_ids"]) for r in theirs}
    assert not any(
        tuple(r["prompt_ids"] + r["KL_completion_ids"]) in main for r in theirs
    )  # TRL: all mismatched
    ours = _kto_data(pairs, tmp_path, kl_pairs=True).datasets["train"]
    ours_main = {tuple(r["input_ids"][0]) for r in ours}
    assert not any(tuple(r["input_ids"][1]) in ours_main for r in ours)


def test_kto_num_tokens_matches_trl(policy_dir: str, ref_dir: str, tmp_path) -> None:
    """TRL counts ``attention_mask.sum()`` of the rows only, not of their KL sequences; so does lit-align."""
    (_, metrics), (_, ref_metrics) = _kto_first_steps(
        _kto_rows("standard"), policy_dir, ref_dir, tmp_path, {"loss_type": "kto"}
    )
    assert metrics["num_tokens"] == ref_metrics["num_tokens"]


def test_kto_pairs_unpaired_by_lit_align_match_trl_with_kl(policy_dir: str, ref_dir: str, tmp_path) -> None:
    pairs = _kto_rows("paired_standard")
    (loss, metrics), (ref_loss, ref_metrics) = _kto_first_steps(pairs, policy_dir, ref_dir, tmp_path, {})
    assert metrics["kl"] == _approx(ref_metrics["kl"])
    assert loss == _approx(ref_loss)


def test_kto_truncated_kl_sequences_match_trl(model_dir: str, tmp_path) -> None:
    """TRL keeps every completion whole in the dataset and cuts ``prompt_i + completion_{i-1}`` to max_length in
    the collator; lit-align truncates each row first (``completion_{i-1}`` to ``max_length - len(prompt_{i-1})``)
    and then builds the KL sequence from that cut completion, so after a longer prompt the KL sequence comes out
    shorter than max_length where TRL's is full. The rows themselves agree (``test_kto_truncation_matches_trl``)."""
    rows = _long_prompt_rows()
    trainer = _trl_kto(model_dir, rows, tmp_path / "trl", max_length=40)
    data = _kto_data(rows, tmp_path, max_length=40, kl_pairs=True)
    assert len(trainer.train_dataset) == len(data.datasets["train"]) == len(rows) - 1
    _assert_same_kto_batch(trainer, data, kl=True)


def test_reward_rows_longer_than_max_length_are_dropped_by_trl_truncated_by_lit_align(
    classifier_dir: str, tmp_path
) -> None:
    """Departure: TRL's RewardTrainer filters out pairs with a side longer than max_length; lit-align's
    PreferenceDataModule truncates them (keep_start: the reward is then read at the last kept token, not EOS).
    The parity tests above use rows that fit."""
    rows = [*_rows("standard"), {"prompt": "Q: ", "chosen": "a" * 100, "rejected": "b"}]
    trainer = _trl(RewardTrainer, RewardConfig, classifier_dir, rows, tmp_path / "trl", max_length=80)
    data = _lit_data(rows, tmp_path, max_length=80)
    assert len(trainer.train_dataset) == len(rows) - 1
    ours = data.datasets["train"]
    assert len(ours) == len(rows)
    assert len(ours[len(rows) - 1]["input_ids"][0]) == 80
