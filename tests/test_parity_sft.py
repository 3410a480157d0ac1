"""Parity of lit-align SFT with TRL 1.16 ``SFTTrainer`` (docs/methods.md §2), in fp32 on ``builtin:tiny``.

Both sides start from the same weights: ``builtin:tiny`` saved with ``save_pretrained`` (and its byte
tokenizer beside it) is what TRL loads as a path, while lit-align builds it in memory from the seed.
They read the same rows in the same order. Checked, from the cheapest to the most end-to-end:

1. tokenization: TRL's prepared ``input_ids``/``labels`` against our ``input_ids``/``completion_mask``,
   then the collated batch and the positions each side trains on, for standard, conversational and
   edge-case rows, and under ``max_length`` truncation;
2. the first-step loss (``nll`` and ``dft``), entropy, token accuracy and token count to 1e-5, the
   gradient of every weight, and the packed loss (TRL ``packing=True`` against ours);
3. three AdamW steps with matched hyper-parameters on three different batches taken in order
   (TRL ``train_sampling_strategy="sequential"``): per-step losses and final weights to 1e-4.

A tokenization difference therefore fails in (1), not as an unexplained loss mismatch in (2).
A prompt that ends on an assistant turn has its own test: TRL opens a new assistant turn after it
(``add_generation_prompt=True``) and trains on the completion only.
"""

from __future__ import annotations

import json
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the Hub
os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L
import pytest
import torch

from lit_align import SFT, PromptCompletionDataModule
from lit_align.data.arithmetic import arithmetic_rows
from lit_align.models.builtin import builtin_model, builtin_tokenizer
from lit_align.ops.forward import target_mask
from lit_align.ops.packing import SequenceBatch

trl = pytest.importorskip("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402

MODEL = "builtin:tiny"
BATCH = 8
LR = 1e-3

# Rows beyond the arithmetic task, for tokenization: non-ASCII bytes, a completion that already ends
# with EOS (TRL must not add a second one), whitespace at the boundary, multi-turn and system prompts.
EDGE_STANDARD = [
    {"prompt": "Héllo wörld 🚀 ", "completion": "ça va ✓"},
    {"prompt": "Q: 2+2?", "completion": " 4<|im_end|>"},
    {"prompt": "x", "completion": "y\n"},
    {"prompt": "Compute 1+1.\n", "completion": "1+1=2\nAnswer: 2"},
]
EDGE_CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Compute 7+5."}],
        "completion": [{"role": "assistant", "content": "7+5=12\nAnswer: 12"}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Compute 7+5."},
            {"role": "assistant", "content": "Answer: 12"},
            {"role": "user", "content": "And 12-3? ünï 🚀"},
        ],
        "completion": [{"role": "assistant", "content": "12-3=9\nAnswer: 9 ✓"}],
    },
    {
        "prompt": [{"role": "user", "content": ""}],
        "completion": [{"role": "assistant", "content": "?"}],
    },
]


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``builtin:tiny`` and its tokenizer saved as a Hugging Face directory, for TRL to load by path."""
    path = tmp_path_factory.mktemp("builtin_tiny")
    builtin_model(MODEL).save_pretrained(path)
    builtin_tokenizer(MODEL).save_pretrained(path)
    return str(path)


def _rows(kind: str, n: int) -> list[dict]:
    if kind == "edge_standard":
        return EDGE_STANDARD
    if kind == "edge_conversational":
        return EDGE_CONVERSATIONAL
    return arithmetic_rows("prompt_completion", size=n, conversational=kind == "conversational")


def _write_jsonl(rows: list[dict], path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


class _RecordingSFTTrainer(SFTTrainer):
    """Records the loss of every ``compute_loss`` call (the Trainer's logged loss is a running mean)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.recorded_losses.append(float(loss.detach()))
        return loss


def _trl_trainer(
    model_dir: str,
    rows: list[dict],
    out_dir,
    loss_type: str = "nll",
    max_steps: int = 1,
    max_length: int = 1024,
    packing: bool = False,
):
    import datasets

    args = SFTConfig(
        output_dir=str(out_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=max_length,
        packing=packing,
        loss_type=loss_type,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        dataloader_drop_last=False,
        train_sampling_strategy="sequential",  # the same batch order as shuffle=False on our side
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _RecordingSFTTrainer(
            model=model_dir, args=args, train_dataset=datasets.Dataset.from_list(rows)
        )
    trainer.recorded_losses = []
    return trainer


def _trl_batch(trainer: SFTTrainer, start: int = 0) -> dict[str, torch.Tensor]:
    ds = trainer.train_dataset
    stop = min(start + BATCH, len(ds))
    return trainer.data_collator([{k: ds[i][k] for k in ("input_ids", "labels")} for i in range(start, stop)])


def _lit_data(rows: list[dict], tmp_path, max_length: int = 1024, **kwargs) -> PromptCompletionDataModule:
    data = PromptCompletionDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"),
        batch_size=BATCH,
        shuffle=False,
        group_by_length=False,
        max_length=max_length,
        **kwargs,
    ).connect(builtin_tokenizer(MODEL))
    data.setup("fit")
    return data


def _lit_batch(data: PromptCompletionDataModule) -> SequenceBatch:
    return next(iter(data.train_dataloader()))


# --------------------------------------------------------------------------- 0. same starting point


def test_saved_model_reloads_with_identical_weights_and_tokenizer(model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = builtin_model(MODEL).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    tok, ref = AutoTokenizer.from_pretrained(model_dir), builtin_tokenizer(MODEL)
    assert (tok.eos_token_id, tok.pad_token_id) == (ref.eos_token_id, ref.pad_token_id)
    assert tok.chat_template == ref.chat_template
    text = EDGE_STANDARD[0]["prompt"] + "<|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]


# --------------------------------------------------------------------------- 1. tokenization


def _assert_same_tokenization(trainer: SFTTrainer, data: PromptCompletionDataModule) -> None:
    """Per row, after preparation: same ids, and TRL's labels are exactly our completion tokens;
    then the collated first batch: same padded layout, same next-token positions trained on."""
    theirs, ours = trainer.train_dataset, data.datasets["train"]
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        (ids,), (mask,) = ours[i]["input_ids"], ours[i]["completion_mask"]
        assert ids == theirs[i]["input_ids"], f"row {i}: input_ids differ"
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        assert labels == theirs[i]["labels"], f"row {i}: completion mask differs from TRL's labels"
    ref, batch = _trl_batch(trainer), _lit_batch(data)
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    targets = target_mask(batch, SFT(MODEL).token_mask(batch))  # (R, T-1)
    assert torch.equal(targets, ref["labels"][:, 1:] != -100)


@pytest.mark.parametrize("kind", ["standard", "conversational", "edge_standard", "edge_conversational"])
def test_tokenization_matches_trl(kind: str, model_dir: str, tmp_path) -> None:
    rows = _rows(kind, BATCH)
    trainer = _trl_trainer(model_dir, rows, tmp_path / "trl")
    data = _lit_data(rows, tmp_path)
    assert len(data.datasets["train"]) == len(rows)
    _assert_same_tokenization(trainer, data)


def test_truncation_matches_trl(model_dir: str, tmp_path) -> None:
    """keep_start at max_length=40 cuts every arithmetic row inside its completion; a row whose prompt
    alone fills max_length has nothing left to learn and is dropped by both."""
    rows = [*_rows("standard", BATCH - 1), {"prompt": "p" * 45, "completion": "too late"}]
    trainer = _trl_trainer(model_dir, rows, tmp_path / "trl", max_length=40)
    data = _lit_data(rows, tmp_path, max_length=40)
    assert len(data.datasets["train"]) == len(rows) - 1
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == 40
    _assert_same_tokenization(trainer, data)


def test_tokenization_matches_trl_prompt_ending_on_assistant_turn(model_dir: str, tmp_path) -> None:
    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}],
            "completion": [{"role": "assistant", "content": " 42."}],
        }
    ]
    trainer = _trl_trainer(model_dir, rows, tmp_path / "trl")
    data = _lit_data(rows, tmp_path)
    _assert_same_tokenization(trainer, data)
    (ids,), (mask,) = data.datasets["train"][0]["input_ids"], data.datasets["train"][0]["completion_mask"]
    trained = builtin_tokenizer(MODEL).decode([t for t, m in zip(ids, mask) if m])
    assert trained == " 42.<|im_end|>\n"


# --------------------------------------------------------------------------- 2. first-step loss


def _lit_first_step(batch: SequenceBatch, loss_type: str) -> tuple[torch.Tensor, dict]:
    module = SFT(MODEL, loss_type=loss_type)
    module.configure_model()
    logged: dict = {}
    module.log_metrics = lambda metrics, stage, batch_size: logged.update(metrics)  # no Trainer attached
    loss = module.training_step(batch, 0)
    return loss, logged


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_first_step_loss_matches_trl(kind: str, loss_type: str, model_dir: str, tmp_path) -> None:
    rows = _rows(kind, BATCH)
    trainer = _trl_trainer(model_dir, rows, tmp_path / "trl", loss_type=loss_type)
    trainer.model.train()
    ref_loss = trainer.compute_loss(trainer.model, _trl_batch(trainer))
    ref_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    loss, metrics = _lit_first_step(_lit_batch(_lit_data(rows, tmp_path)), loss_type)

    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert float(metrics["loss"]) == pytest.approx(ref_loss.item(), abs=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(ref_metrics["entropy"], abs=1e-5)
    assert float(metrics["mean_token_accuracy"]) == pytest.approx(
        ref_metrics["mean_token_accuracy"], abs=1e-6
    )
    assert float(metrics["num_tokens"]) == ref_metrics["num_tokens"]  # real (non-padding) tokens


def test_packed_loss_matches_trl(model_dir: str, tmp_path) -> None:
    """TRL ``packing=True`` (best-fit decreasing, padding-free rows, position ids restarting per sequence)
    against lit-align ``packing=True``. With every sequence in one batch the loss is the token mean over
    the same targets whatever the bins, so it must equal the padded loss too."""
    rows = _rows("standard", BATCH)
    trainer = _trl_trainer(model_dir, rows, tmp_path / "trl", max_length=128, packing=True)
    packed = trainer.train_dataset
    assert len(packed) < len(rows) and "seq_lengths" in packed.column_names
    trainer.model.train()
    cols = ("input_ids", "labels", "seq_lengths")
    ref_loss = trainer.compute_loss(
        trainer.model, trainer.data_collator([{k: r[k] for k in cols} for r in packed])
    )

    data = _lit_data(rows, tmp_path, max_length=128, packing=True)
    assert len(data.datasets["train"]) <= BATCH  # one batch holds every sequence
    batch = _lit_batch(data)
    assert batch.attention_mask is None and batch.num_sequences == len(rows)
    loss, _ = _lit_first_step(batch, "nll")
    padded_loss, _ = _lit_first_step(_lit_batch(_lit_data(rows, tmp_path / "padded")), "nll")

    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)


def test_first_step_gradients_match_trl(model_dir: str, tmp_path) -> None:
    """Same loss is not enough for the same update: compare the gradient of every weight."""
    rows = _rows("standard", BATCH)
    trainer = _trl_trainer(model_dir, rows, tmp_path / "trl")
    trainer.model.train()
    trainer.compute_loss(trainer.model, _trl_batch(trainer)).backward()

    module = SFT(MODEL)
    module.configure_model()
    module.log_metrics = lambda *a, **k: None
    module.training_step(_lit_batch(_lit_data(rows, tmp_path)), 0).backward()

    ref = dict(trainer.model.named_parameters())
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(
            p.grad, ref[name].grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


# --------------------------------------------------------------------------- 3. three AdamW steps


class _StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize(("kind", "loss_type"), [("standard", "nll"), ("conversational", "dft")])
def test_three_adamw_steps_match_trl(kind: str, loss_type: str, model_dir: str, tmp_path) -> None:
    steps = 3
    rows = _rows(kind, steps * BATCH)  # three different batches, taken in order by both sides

    trainer = _trl_trainer(model_dir, rows, tmp_path / "trl", loss_type=loss_type, max_steps=steps)
    trainer.train()
    ref_losses = trainer.recorded_losses
    ref_weights = {k: v.detach() for k, v in trainer.model.state_dict().items()}

    module = SFT(
        MODEL,
        loss_type=loss_type,
        optimizer=lambda p: torch.optim.AdamW(p, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    )
    record = _StepLosses()
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        gradient_clip_val=1.0,  # = HF max_grad_norm=1.0 (both torch.nn.utils.clip_grad_norm_)
        gradient_clip_algorithm="norm",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    ).fit(module, _lit_data(rows, tmp_path))

    assert len(ref_losses) == len(record.losses) == steps
    assert record.losses == pytest.approx(ref_losses, abs=1e-4)
    weights = module.model.state_dict()
    assert weights.keys() == ref_weights.keys()
    initial = builtin_model(MODEL).state_dict()
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # lr=1e-3 really moves the weights (Adam: about lr per step), well beyond the 1e-4 tolerance.
    moved = max((weights[n] - initial[n]).abs().max().item() for n in weights)
    assert moved > 2e-3
