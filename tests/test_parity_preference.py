"""End-to-end parity of lit-align DPO, CPO and ORPO with TRL 1.16 (docs/methods.md §3, §8, §9), fp32, ``builtin:tiny``.

Both sides start from the same weights (``builtin:tiny`` saved with ``save_pretrained`` is what TRL loads
by path; lit-align builds it from the seed) and read the same raw preference rows in the same order,
each through its own data pipeline and model forward. Checked, from the cheapest to the most end-to-end:

1. tokenization: TRL's prepared ids (DPO: ``prompt_ids``/``chosen_ids``/``rejected_ids``; CPO/ORPO: the
   legacy ``chosen_input_ids``/``chosen_labels``...) against our sequences and completion masks, then the
   collated batch and the positions each side scores;
2. the first-step loss and every metric TRL logs, to 1e-5 (sums of ~200 log-probs: 1e-6 relative), for
   every DPO ``loss_type``, the f-divergences, label smoothing, LD-DPO, WPO and a weighted list, and for
   every CPO ``loss_type`` and ORPO;
2b. CPO/ORPO with a tokenizer that has a BOS token it does not add (TRL's CPO/ORPO put it before every
   prompt): tokenization, first-step loss and metrics, and ``PreferenceDataModule`` following the module
   being trained through a real ``lightning.Trainer`` fit (CPO/ORPO: BOS, DPO: none);
3. lit-align alone: packed and padding-free layouts and precomputed reference log-probs give the padded,
   live-reference loss (TRL's ``precompute_ref_log_probs`` too);
4. three AdamW steps with matched hyper-parameters: per-step losses and final weights to 1e-4.

(2) and (3) start from a policy briefly trained beforehand (``policy_dir``: at initialisation the top-1
token accuracy is 0 and tests nothing) against a perturbed copy of it as DPO's reference (``ref_dir``:
with the policy as its own reference every log-ratio is 0 and each loss a constant, ``sigmoid`` = log 2).
(4) starts from ``builtin:tiny`` with each side's default reference, a copy loaded from the policy's path.
Section 5 pins down the differences found, with their cause.
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

from lit_align import CPO, DPO, ORPO, PreferenceDataModule
from lit_align.data.arithmetic import arithmetic_rows
from lit_align.data.tokenize import add_bos
from lit_align.models.builtin import builtin_model, builtin_tokenizer
from lit_align.ops.forward import target_mask
from lit_align.ops.packing import SequenceBatch

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

MODEL = "builtin:tiny"
BATCH = 8  # pairs per batch (E): 2E sequences
LR = 1e-3
EOS = builtin_tokenizer(MODEL).eos_token_id

# Rows beyond the arithmetic task, for tokenization: non-ASCII bytes, a chosen completion that already
# ends with EOS (no second one may be added), whitespace at the boundary; system and multi-turn prompts.
EDGE_STANDARD = [
    {"prompt": "Héllo wörld 🚀 ", "chosen": "ça va ✓", "rejected": "non ✗"},
    {"prompt": "Q: 2+2?", "chosen": " 4<|im_end|>", "rejected": " 5"},
    {"prompt": "x", "chosen": "y\n", "rejected": "z z\n"},
]
EDGE_CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Compute 7+5."}],
        "chosen": [{"role": "assistant", "content": "7+5=12\nAnswer: 12"}],
        "rejected": [{"role": "assistant", "content": "7+5=13\nAnswer: 13"}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Compute 7+5."},
            {"role": "assistant", "content": "Answer: 12"},
            {"role": "user", "content": "And 12-3? ünï 🚀"},
        ],
        "chosen": [{"role": "assistant", "content": "12-3=9\nAnswer: 9 ✓"}],
        "rejected": [{"role": "assistant", "content": "Answer: 8 ✗"}],
    },
]
# No prompt column: both sides extract it (the common prefix; a space before the split joins the completion).
IMPLICIT_STANDARD = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Héllo 🚀: oui", "rejected": "Héllo 🚀: non<|im_end|>"},
]
IMPLICIT_CONVERSATIONAL = [
    {
        "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green ✗"}],
    },
]


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: these matmuls are tiny, and on 2 shared cores OpenMP's
    spin-waiting makes a step 10-50x slower with 2 threads. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(model, path) -> str:
    model.save_pretrained(path)
    builtin_tokenizer(MODEL).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``builtin:tiny`` and its tokenizer saved as a Hugging Face directory, for TRL to load by path."""
    return _save(builtin_model(MODEL), tmp_path_factory.mktemp("builtin_tiny"))


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A policy that predicts something: ``builtin:tiny`` after 20 AdamW steps of NLL on other arithmetic
    rows (prompt + chosen), so top-1 token accuracy (about 0.4) is not 0 as at initialisation."""
    tokenizer = builtin_tokenizer(MODEL)
    model = builtin_model(MODEL).train()
    rows = arithmetic_rows("preference", size=32, seed=1)
    enc = tokenizer(
        [r["prompt"] + r["chosen"] + tokenizer.eos_token for r in rows], padding=True, return_tensors="pt"
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _save(model, tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def ref_dir(policy_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A reference close to the policy (seeded noise on every weight): log-ratios of a few nats, not 0 (the
    policy as its own reference makes each loss a constant, sigmoid = log 2) and not so large that the
    f-divergence scores or the sigmoids saturate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return _save(model, tmp_path_factory.mktemp("reference"))


def _rows(kind: str, n: int = BATCH) -> list[dict]:
    fixed = {
        "edge_standard": EDGE_STANDARD,
        "edge_conversational": EDGE_CONVERSATIONAL,
        "implicit_standard": IMPLICIT_STANDARD,
        "implicit_conversational": IMPLICIT_CONVERSATIONAL,
    }
    if kind in fixed:
        return fixed[kind]
    return arithmetic_rows("preference", size=n, conversational=kind == "conversational")


def _write_jsonl(rows: list[dict], path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


_RECORDING: dict[type, type] = {}


def _recording(cls: type) -> type:
    """``cls`` recording the loss of every ``compute_loss`` call (the Trainer's logged loss is a running mean)."""
    if cls not in _RECORDING:

        class Recording(cls):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                self.recorded_losses.append(float(loss.detach()))
                return loss

        _RECORDING[cls] = Recording
    return _RECORDING[cls]


def _training_args(out_dir, max_steps: int, batch_size: int = BATCH) -> dict:
    return dict(
        output_dir=str(out_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=batch_size,
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


def _trl(
    trainer_cls,
    config_cls,
    model_dir: str,
    rows: list[dict],
    out_dir,
    max_steps: int = 1,
    ref_dir=None,
    batch_size: int = BATCH,
    **kw,
):
    """A TRL trainer on ``rows``; ``ref_dir``: DPO's reference loaded from there (default: the policy's path)."""
    import datasets

    args = config_cls(**_training_args(out_dir, max_steps, batch_size), **kw)
    extra = {}
    if ref_dir is not None:
        from transformers import AutoModelForCausalLM

        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _recording(trainer_cls)(
            model=model_dir, args=args, train_dataset=datasets.Dataset.from_list(rows), **extra
        )
    trainer.recorded_losses = []
    assert trainer.model.dtype == torch.float32
    return trainer


def _trl_dpo(model_dir, rows, out_dir, **kw) -> DPOTrainer:
    return _trl(DPOTrainer, DPOConfig, model_dir, rows, out_dir, **kw)


def _dpo_batch(trainer: DPOTrainer, start: int = 0) -> dict[str, torch.Tensor]:
    ds, size = trainer.train_dataset, trainer.args.per_device_train_batch_size
    keys = [
        k
        for k in ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
        if k in ds.column_names
    ]
    return trainer.data_collator(
        [{k: ds[i][k] for k in keys} for i in range(start, min(start + size, len(ds)))]
    )


def _legacy_batch(trainer: CPOTrainer | ORPOTrainer) -> dict[str, torch.Tensor]:
    """CPO/ORPO's collated batch, as ``concatenated_forward`` lays it out: ``[chosen; rejected]``, right-padded."""
    ds, size = trainer.train_dataset, trainer.args.per_device_train_batch_size
    batch = trainer.data_collator([ds[i] for i in range(min(size, len(ds)))])
    pad = trainer.padding_value if isinstance(trainer, ORPOTrainer) else trainer.pad_token_id
    cat = trainer.concatenated_inputs(batch, padding_value=pad)
    return {k.replace("concatenated_", ""): v for k, v in cat.items()}


def _lit_data(
    rows: list[dict], tmp_path, max_length: int | None = 1024, tokenizer=None, batch_size: int = BATCH, **kwargs
) -> PreferenceDataModule:
    """Prepared outside a Trainer (so ``add_bos_to_prompt`` must be given where it matters); ``tokenizer``:
    default the builtin byte tokenizer."""
    data = PreferenceDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"),
        batch_size=batch_size,
        shuffle=False,
        group_by_length=False,
        max_length=max_length,
        **kwargs,
    ).connect(tokenizer or builtin_tokenizer(MODEL))
    data.setup("fit")
    return data


def _lit_batch(data: PreferenceDataModule) -> SequenceBatch:
    return next(iter(data.train_dataloader()))


def _lit_first_step(module, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """``training_step`` on ``batch`` without a Trainer: the loss and the metrics it logs."""
    module.configure_model()
    logged: dict = {}
    module.log_metrics = lambda metrics, stage, batch_size: logged.update(metrics)
    loss = module.training_step(batch, 0)
    return loss, {k: float(v) for k, v in logged.items()}


def _approx(expected: float):
    """1e-5, or 1e-6 relative. Both sides compute bitwise-identical hidden states and per-token log-probs,
    but sum them in another order (TRL: a row sum over every padded position, lit-align: ``index_add``
    over the targets), so a sequence log-prob of about -200 differs by an ulp or two (1.5e-5 each), and
    losses such as ``sppo_hard`` (about 58, gradient ~20 in each log-ratio) by a few 1e-5."""
    return pytest.approx(expected, rel=1e-6, abs=1e-5)


def _assert_metrics(ours: dict[str, float], theirs: dict[str, float], names) -> None:
    for name in names:
        assert ours[name] == _approx(theirs[name]), name


class _StepLosses(L.Callback):
    """The loss of every step, and what the step logged (``trainer.callback_metrics``)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit(module, data: PreferenceDataModule, steps: int) -> _StepLosses:
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
    ).fit(module, data)
    return record


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _assert_same_weights(module, trainer) -> None:
    weights = module.model.state_dict()
    ref_weights = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert weights.keys() == ref_weights.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, ref_weights[name], atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # lr=1e-3 really moves the weights (Adam: about lr per step), well beyond the 1e-4 tolerance.
    initial = builtin_model(MODEL).state_dict()
    assert max((weights[n] - initial[n]).abs().max().item() for n in weights) > 2e-3


# --------------------------------------------------------------------------- 1. tokenization


def _assert_same_dpo_tokenization(trainer: DPOTrainer, data: PreferenceDataModule) -> None:
    """Per row: prompt+chosen and prompt+rejected ids, completions starting at TRL's prompt length; then the
    collated first batch: same ``[chosen; rejected]`` padded layout and the same scored positions."""
    theirs, ours = trainer.train_dataset, data.datasets["train"]
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        prompt = theirs[i]["prompt_ids"]
        for j, key in enumerate(("chosen_ids", "rejected_ids")):
            completion = theirs[i][key]
            assert ours[i]["input_ids"][j] == prompt + completion, f"row {i} {key}: ids differ"
            assert ours[i]["completion_mask"][j] == [0] * len(prompt) + [1] * len(completion), (
                f"row {i} {key}"
            )
    ref, batch = _dpo_batch(trainer), _lit_batch(data)
    assert batch.num_examples == len(ref["input_ids"]) // 2 and batch.num_sequences == len(ref["input_ids"])
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert torch.equal(batch.completion_mask, ref["completion_mask"].bool())
    # TRL scores the targets whose label is not -100 (labels = input_ids where completion_mask)
    assert torch.equal(target_mask(batch, batch.completion_mask), ref["completion_mask"][:, 1:].bool())


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
def test_dpo_tokenization_matches_trl(kind: str, model_dir: str, tmp_path) -> None:
    rows = _rows(kind)
    trainer = _trl_dpo(model_dir, rows, tmp_path / "trl")
    data = _lit_data(rows, tmp_path)
    assert len(data.datasets["train"]) == len(rows)
    _assert_same_dpo_tokenization(trainer, data)
    if kind == "edge_standard":  # EOS once, also where the chosen completion already ended with it
        assert all(ids[-1] == EOS and ids[-2] != EOS for ids in trainer.train_dataset["chosen_ids"])


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_dpo_truncation_matches_trl(truncation_mode: str, model_dir: str, tmp_path) -> None:
    """max_length=40 cuts every arithmetic pair (TRL cuts in the collator, we at tokenization); with
    keep_start a row whose prompt alone fills max_length is dropped by both, with keep_end it stays."""
    rows = [*_rows("standard", BATCH - 1), {"prompt": "p" * 45, "chosen": "too late", "rejected": "never"}]
    trainer = _trl_dpo(model_dir, rows, tmp_path / "trl", max_length=40, truncation_mode=truncation_mode)
    data = _lit_data(rows, tmp_path, max_length=40, truncation_mode=truncation_mode)
    kept = len(rows) - (truncation_mode == "keep_start")
    assert len(trainer.train_dataset) == len(data.datasets["train"]) == kept
    ref, batch = _dpo_batch(trainer), _lit_batch(data)
    assert ref["input_ids"].shape == batch.input_ids.shape == (2 * kept, 40)
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert torch.equal(batch.completion_mask, ref["completion_mask"].bool())


def _assert_same_legacy_tokenization(trainer, data: PreferenceDataModule) -> None:
    theirs, ours = trainer.train_dataset, data.datasets["train"]
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        for j, side in enumerate(("chosen", "rejected")):
            ids, labels = theirs[i][f"{side}_input_ids"], theirs[i][f"{side}_labels"]
            assert ours[i]["input_ids"][j] == ids, f"row {i} {side}: ids differ"
            assert ours[i]["completion_mask"][j] == [int(t != -100) for t in labels], f"row {i} {side}"
    ref, batch = _legacy_batch(trainer), _lit_batch(data)
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert torch.equal(batch.completion_mask, ref["labels"] != -100)
    assert torch.equal(target_mask(batch, batch.completion_mask), ref["labels"][:, 1:] != -100)


@pytest.mark.parametrize("trainer_cls", [CPOTrainer, ORPOTrainer], ids=["cpo", "orpo"])
@pytest.mark.parametrize("kind", ["standard", "edge_standard", "implicit_standard"])
def test_cpo_orpo_tokenization_matches_trl(kind: str, trainer_cls, model_dir: str, tmp_path) -> None:
    """TRL's legacy pipeline (no BOS with the byte tokenizer, EOS appended at token level unless already
    there, response-only truncation) gives our sequences on standard rows."""
    config_cls = CPOConfig if trainer_cls is CPOTrainer else ORPOConfig
    rows = _rows(kind)
    trainer = _trl(trainer_cls, config_cls, model_dir, rows, tmp_path / "trl")
    _assert_same_legacy_tokenization(trainer, _lit_data(rows, tmp_path))


def test_cpo_truncation_matches_trl(model_dir: str, tmp_path) -> None:
    """max_length=40: TRL's CPO/ORPO cut only the response, to ``max_length - len(prompt)`` (EOS appended
    before the cut), which is our keep_start on the whole sequence when the prompt fits."""
    rows = _rows("standard")
    trainer = _trl(CPOTrainer, CPOConfig, model_dir, rows, tmp_path / "trl", max_length=40)
    data = _lit_data(rows, tmp_path, max_length=40)
    assert max(len(ids) for ids in trainer.train_dataset["chosen_input_ids"]) == 40
    _assert_same_legacy_tokenization(trainer, data)


# --------------------------------------------------------------------------- 2. first-step loss: DPO

DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "entropy",
    "num_tokens",
)
DPO_LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
DPO_CASES = {
    **{t: {"loss_type": t} for t in DPO_LOSS_TYPES},
    "exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    "robust": {"loss_type": "robust", "label_smoothing": 0.1},
    "aot-smoothed": {"loss_type": "aot", "label_smoothing": 0.1},
    "sigmoid-smoothing-ignored": {"loss_type": "sigmoid", "label_smoothing": 0.1},  # TRL 1.16: no effect
    "forward_kl": {"f_divergence_type": "forward_kl"},
    "js_divergence": {"f_divergence_type": "js_divergence"},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "ipo-js_divergence": {"loss_type": "ipo", "f_divergence_type": "js_divergence"},
    "ld_alpha": {"ld_alpha": 0.5},
    "ld_alpha-sft": {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.3},
    "use_weighting": {"use_weighting": True},
    "use_weighting-ipo": {"loss_type": "ipo", "use_weighting": True},
    "weighted_list": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "beta": {"loss_type": "sigmoid", "beta": 0.5},
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_first_step_matches_trl(case: str, policy_dir: str, ref_dir: str, tmp_path) -> None:
    config = DPO_CASES[case]
    rows = _rows("standard")
    trainer = _trl_dpo(policy_dir, rows, tmp_path / "trl", ref_dir=ref_dir, **config)
    trainer.model.train()
    with torch.no_grad():
        ref_loss = trainer.compute_loss(trainer.model, _dpo_batch(trainer))
    ref_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    module = DPO(policy_dir, ref_model_name_or_path=ref_dir, **config)
    loss, metrics = _lit_first_step(module, _lit_batch(_lit_data(rows, tmp_path)))

    assert loss.item() == _approx(ref_loss.item())
    assert metrics["loss"] == _approx(ref_loss.item())
    _assert_metrics(metrics, ref_metrics, DPO_METRICS)
    # the reference really differs from the policy: the log-ratios (rewards) are not all 0
    assert abs(metrics["rewards/chosen"]) > 1e-2 and abs(metrics["rewards/rejected"]) > 1e-2


@pytest.mark.parametrize("kind", ["conversational", "implicit_standard"])
def test_dpo_first_step_matches_trl_other_rows(kind: str, policy_dir: str, ref_dir: str, tmp_path) -> None:
    config = {"loss_type": ["sigmoid", "ipo", "sft"]}  # ipo: completion lengths; sft: token mean
    rows = _rows(kind)
    trainer = _trl_dpo(policy_dir, rows, tmp_path / "trl", ref_dir=ref_dir, **config)
    trainer.model.train()
    with torch.no_grad():
        ref_loss = trainer.compute_loss(trainer.model, _dpo_batch(trainer))
    ref_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, metrics = _lit_first_step(
        DPO(policy_dir, ref_model_name_or_path=ref_dir, **config), _lit_batch(_lit_data(rows, tmp_path))
    )
    assert loss.item() == _approx(ref_loss.item())
    _assert_metrics(metrics, ref_metrics, DPO_METRICS)


# --------------------------------------------------------------------------- 2. first-step loss: CPO and ORPO

REWARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
)  # not logits/*: TRL's CPO/ORPO average every position of the padded batch, padding included
CPO_CASES = {
    "sigmoid": {"loss_type": "sigmoid"},
    "sigmoid-smoothed": {"loss_type": "sigmoid", "label_smoothing": 0.1, "cpo_alpha": 0.5},
    "hinge": {"loss_type": "hinge"},
    "ipo": {"loss_type": "ipo"},
    "simpo": {"loss_type": "simpo", "simpo_gamma": 0.8, "label_smoothing": 0.1},
    "alphapo": {"loss_type": "alphapo", "alpha": 0.25},
}


def _legacy_first_step(trainer) -> tuple[float, dict[str, float]]:
    ds, size = trainer.train_dataset, trainer.args.per_device_train_batch_size
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator([ds[i] for i in range(min(size, len(ds)))]))
    return loss.item(), {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_first_step_matches_trl(case: str, policy_dir: str, tmp_path) -> None:
    config = CPO_CASES[case]
    rows = _rows("standard")
    trainer = _trl(CPOTrainer, CPOConfig, policy_dir, rows, tmp_path / "trl", **config)
    ref_loss, ref_metrics = _legacy_first_step(trainer)
    loss, metrics = _lit_first_step(CPO(policy_dir, **config), _lit_batch(_lit_data(rows, tmp_path)))
    assert loss.item() == _approx(ref_loss)
    assert metrics["loss"] == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, REWARD_METRICS)
    if case == "alphapo":  # CPOConfig's sugar: simpo without the NLL term
        assert trainer.loss_type == "simpo" and trainer.cpo_alpha == 0.0 and metrics["nll_loss"] == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_first_step_matches_trl(beta: float, policy_dir: str, tmp_path) -> None:
    rows = _rows("standard")
    trainer = _trl(ORPOTrainer, ORPOConfig, policy_dir, rows, tmp_path / "trl", beta=beta)
    ref_loss, ref_metrics = _legacy_first_step(trainer)
    loss, metrics = _lit_first_step(ORPO(policy_dir, beta=beta), _lit_batch(_lit_data(rows, tmp_path)))
    assert loss.item() == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, (*REWARD_METRICS, "log_odds_ratio", "log_odds_chosen"))


# --------------------------------------------------------------------------- 2b. CPO and ORPO: a tokenizer with a BOS token
#
# TRL's CPO/ORPO (legacy ``tokenize_row``) tokenize the prompt with ``add_special_tokens=False`` and then put
# ``bos_token_id`` before it when the tokenizer has one and the prompt does not already start with it
# (``trl.experimental.utils.add_bos_token_if_needed``): the completions start one token later, and ORPO's NLL over
# the whole chosen sequence gains a target (the prompt's first token, predicted from BOS). The byte tokenizer has no
# BOS token, so the tests above cannot see this; here it declares ``<|endoftext|>`` its BOS token without adding it
# (as SmolLM2's ``<|im_start|>``). CPO and ORPO declare the rule (``add_bos_to_prompt``), PreferenceDataModule follows.

BOS_TOKEN = "<|endoftext|>"  # an existing special token of the byte tokenizer
BOS_EDGE_STANDARD = [
    {"prompt": BOS_TOKEN + "Q: 1+1?", "chosen": " 2", "rejected": " 3"},  # starts with BOS: not a second one
    {"prompt": "", "chosen": "Yes.", "rejected": "No."},  # empty prompt: BOS alone, the first token is scored
]


@pytest.fixture(scope="module")
def bos_policy_dir(policy_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``policy_dir``'s weights beside the byte tokenizer with ``bos_token=<|endoftext|>``, which it does not add."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bos_policy")
    AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).save_pretrained(path)
    tokenizer = builtin_tokenizer(MODEL)
    tokenizer.bos_token = BOS_TOKEN
    tokenizer.save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.bos_token_id == 259 and loaded("ab")["input_ids"] == [97, 98]  # defined, not added
    return str(path)


def _bos_tokenizer(path: str):
    from lit_align.models.loading import load_tokenizer

    return load_tokenizer(path)  # what a lit-align module loads from that path


def test_add_bos() -> None:
    assert add_bos([5, 6], 1) == [1, 5, 6]  # a prompt without BOS gets it
    assert add_bos([1, 5, 6], 1) == [1, 5, 6]  # already there: not twice
    assert add_bos([5, 1], 1) == [1, 5, 1]  # only the first token counts
    assert add_bos([5, 6], None) == [5, 6]  # a tokenizer without a BOS token: unchanged
    assert add_bos([], 1) == [1]  # an empty prompt gets it too (TRL: ``prompt_len_input_ids == 0``)
    assert add_bos([], None) == []
    prompt = [5, 6]
    add_bos(prompt, 1)
    assert prompt == [5, 6]  # pure


def test_bos_rule_changes_nothing_without_a_bos_token(tmp_path) -> None:
    """The builtin tokenizer has no BOS token: ``add_bos_to_prompt=True`` gives the same sequences."""
    for kind, rows in {"standard": [*_rows("standard"), *BOS_EDGE_STANDARD], "chat": EDGE_CONVERSATIONAL}.items():
        with_rule = _lit_data(rows, tmp_path / kind / "on", add_bos_to_prompt=True).datasets["train"]
        without = _lit_data(rows, tmp_path / kind / "off").datasets["train"]
        assert with_rule.to_list() == without.to_list(), kind


@pytest.mark.parametrize("trainer_cls", [CPOTrainer, ORPOTrainer], ids=["cpo", "orpo"])
@pytest.mark.parametrize("kind", ["standard", "bos_edge", "edge_standard", "implicit_standard", "conversational"])
def test_cpo_orpo_tokenization_matches_trl_with_bos(kind: str, trainer_cls, bos_policy_dir: str, tmp_path) -> None:
    """Every sequence starts with exactly one BOS, as TRL's; conversational rows differ only by TRL's second EOS
    (section 5: the byte tokenizer's chat template does not start with BOS, so they get one too)."""
    config_cls, module_cls = (CPOConfig, CPO) if trainer_cls is CPOTrainer else (ORPOConfig, ORPO)
    rows = BOS_EDGE_STANDARD if kind == "bos_edge" else _rows(kind)
    trainer = _trl(trainer_cls, config_cls, bos_policy_dir, rows, tmp_path / "trl")
    tokenizer = _bos_tokenizer(bos_policy_dir)
    data = _lit_data(rows, tmp_path, tokenizer=tokenizer, add_bos_to_prompt=module_cls.add_bos_to_prompt)
    ours = data.datasets["train"]
    bos = tokenizer.bos_token_id
    assert all(ids[0] == bos and ids[1] != bos for pair in ours["input_ids"] for ids in pair)
    if kind != "conversational":
        _assert_same_legacy_tokenization(trainer, data)
        return
    theirs = trainer.train_dataset
    for i in range(len(rows)):
        for j, side in enumerate(("chosen", "rejected")):
            assert theirs[i][f"{side}_input_ids"] == [*ours[i]["input_ids"][j], EOS]
            assert [int(t != -100) for t in theirs[i][f"{side}_labels"]] == [*ours[i]["completion_mask"][j], 1]


def _bos_rows() -> list[dict]:
    """A first batch with the BOS edge rows (a prompt starting with BOS, an empty prompt) among arithmetic rows."""
    return [*_rows("standard", BATCH - len(BOS_EDGE_STANDARD)), *BOS_EDGE_STANDARD]


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_first_step_matches_trl_with_bos(case: str, bos_policy_dir: str, tmp_path) -> None:
    config = CPO_CASES[case]
    rows = _bos_rows()
    trainer = _trl(CPOTrainer, CPOConfig, bos_policy_dir, rows, tmp_path / "trl", **config)
    ref_loss, ref_metrics = _legacy_first_step(trainer)
    data = _lit_data(rows, tmp_path, tokenizer=_bos_tokenizer(bos_policy_dir), add_bos_to_prompt=CPO.add_bos_to_prompt)
    loss, metrics = _lit_first_step(CPO(bos_policy_dir, **config), _lit_batch(data))
    assert loss.item() == _approx(ref_loss)
    assert metrics["loss"] == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, REWARD_METRICS)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_first_step_matches_trl_with_bos(beta: float, bos_policy_dir: str, tmp_path) -> None:
    """The NLL covers the whole chosen sequence from BOS on: the prompt's first token is a target on both sides."""
    rows = _bos_rows()
    trainer = _trl(ORPOTrainer, ORPOConfig, bos_policy_dir, rows, tmp_path / "trl", beta=beta)
    ref_loss, ref_metrics = _legacy_first_step(trainer)
    data = _lit_data(
        rows, tmp_path, tokenizer=_bos_tokenizer(bos_policy_dir), add_bos_to_prompt=ORPO.add_bos_to_prompt
    )
    loss, metrics = _lit_first_step(ORPO(bos_policy_dir, beta=beta), _lit_batch(data))
    assert loss.item() == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, (*REWARD_METRICS, "log_odds_ratio", "log_odds_chosen"))


@pytest.mark.parametrize("method", ["cpo", "orpo", "dpo"])
def test_preference_data_follows_the_module_bos_rule(method: str, bos_policy_dir: str, tmp_path) -> None:
    """``add_bos_to_prompt=None`` (the default): the DataModule asks the module being trained. A real fit
    (lr=0) of CPO/ORPO logs TRL's first-step loss; DPO declares no rule and tokenizes as TRL's DPO (which adds
    no BOS the tokenizer does not add itself)."""
    rows = _bos_rows()
    trainer_cls, config_cls, module_cls = {
        "cpo": (CPOTrainer, CPOConfig, CPO),
        "orpo": (ORPOTrainer, ORPOConfig, ORPO),
        "dpo": (DPOTrainer, DPOConfig, DPO),
    }[method]
    trainer = _trl(trainer_cls, config_cls, bos_policy_dir, rows, tmp_path / "trl")
    data = PreferenceDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"), batch_size=BATCH, shuffle=False, group_by_length=False
    )  # no tokenizer, not set up: both come from the module when the fit starts
    module = module_cls(bos_policy_dir, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    record = _fit(module, data, steps=1)
    bos = data.tokenizer.bos_token_id
    assert bos == 259
    starts = {ids[0] for pair in data.datasets["train"]["input_ids"] for ids in pair}
    if method == "dpo":
        assert starts != {bos}  # only the row whose prompt text starts with BOS
        _assert_same_dpo_tokenization(trainer, data)
    else:
        assert starts == {bos}
        _assert_same_legacy_tokenization(trainer, data)
        assert record.losses[0] == _approx(_legacy_first_step(trainer)[0])


def test_preference_data_prepared_before_the_fit_follows_the_module(bos_policy_dir: str, tmp_path) -> None:
    """Set up outside a Trainer (``add_bos_to_prompt=None``: no module, no BOS), then fit by CPO: the
    DataModule prepares the rows again with CPO's rule rather than train on DPO-style prompts."""
    rows = _bos_rows()
    data = PreferenceDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"), batch_size=BATCH, shuffle=False, group_by_length=False
    ).connect(_bos_tokenizer(bos_policy_dir))
    data.setup("fit")
    bos = data.tokenizer.bos_token_id
    assert {ids[0] for pair in data.datasets["train"]["input_ids"] for ids in pair} != {bos}
    module = CPO(bos_policy_dir, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    _fit(module, data, steps=1)
    assert {ids[0] for pair in data.datasets["train"]["input_ids"] for ids in pair} == {bos}
    trainer = _trl(CPOTrainer, CPOConfig, bos_policy_dir, rows, tmp_path / "trl")
    _assert_same_legacy_tokenization(trainer, data)


# --------------------------------------------------------------------------- 3. layouts and precomputed reference


def test_dpo_packed_and_padding_free_match_padded(policy_dir: str, ref_dir: str, tmp_path) -> None:
    """Same module, same pairs: the loss and every metric do not depend on the layout (LD-DPO positions,
    WPO weights, completion lengths and the sft token mean all read per-sequence sums)."""
    rows = _rows("standard")
    module = DPO(
        policy_dir,
        ref_model_name_or_path=ref_dir,
        loss_type=["sigmoid", "ipo", "sft"],
        ld_alpha=0.5,
        use_weighting=True,
    )
    padded = _lit_batch(_lit_data(rows, tmp_path / "padded", max_length=256))
    ref_loss, ref_metrics = _lit_first_step(module, padded)
    for layout, kwargs in {"packed": {"packing": True}, "padding_free": {"padding_free": True}}.items():
        batch = _lit_batch(_lit_data(rows, tmp_path / layout, max_length=256, **kwargs))
        assert batch.attention_mask is None and batch.num_sequences == 2 * len(rows)
        if layout == "padding_free":
            assert batch.input_ids.shape[0] == 1
        else:
            assert 1 < batch.input_ids.shape[0] < 2 * len(rows)  # several sequences per row
        loss, metrics = _lit_first_step(module, batch)
        assert loss.item() == _approx(ref_loss.item()), layout
        names = [n for n in ref_metrics if n != "num_tokens"]  # num_tokens is cumulative
        _assert_metrics(metrics, ref_metrics, names)


def test_dpo_precomputed_reference_matches_live(
    policy_dir: str, ref_dir: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``precompute_ref_log_probs=True`` (one pass in ``on_fit_start``, cached under ``$LIT_ALIGN_CACHE``)
    gives the live reference's first-step loss; so does TRL's ``precompute_ref_log_probs=True``."""
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "cache"))
    rows = _rows("standard")
    config = {"loss_type": ["sigmoid", "ipo"], "ld_alpha": 0.5}  # LD-DPO weights the reference's sums too

    live = _trl_dpo(policy_dir, rows, tmp_path / "trl_live", ref_dir=ref_dir, **config)
    live.model.train()
    with torch.no_grad():
        live_loss = live.compute_loss(live.model, _dpo_batch(live)).item()
    live_metrics = {k: v[-1] for k, v in live._metrics["train"].items()}
    pre = _trl_dpo(
        policy_dir, rows, tmp_path / "trl_pre", ref_dir=ref_dir, precompute_ref_log_probs=True, **config
    )
    pre.model.train()
    with torch.no_grad():
        pre_batch = _dpo_batch(pre)
        assert "ref_chosen_logps" in pre_batch
        pre_loss = pre.compute_loss(pre.model, pre_batch).item()
    assert pre_loss == _approx(live_loss)

    # ours, live reference
    live_module = DPO(policy_dir, ref_model_name_or_path=ref_dir, **config)
    data = _lit_data(rows, tmp_path / "live")
    ours_live, _ = _lit_first_step(live_module, _lit_batch(data))
    assert ours_live.item() == _approx(live_loss)

    # ours, precomputed through a real fit (on_fit_start), with lr=0 so only the loss matters
    module = DPO(
        policy_dir,
        ref_model_name_or_path=ref_dir,
        precompute_ref_log_probs=True,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        **config,
    )
    data = _lit_data(rows, tmp_path / "pre")
    record = _fit(module, data, steps=1)
    assert module.ref_model is None  # no reference in memory during training
    assert record.losses[0] == _approx(live_loss)
    # what a real Trainer gets logged, under train/<TRL name>
    logged = {k.removeprefix("train/"): v for k, v in record.metrics[0].items()}
    assert logged["loss"] == _approx(live_loss)
    _assert_metrics(logged, live_metrics, DPO_METRICS)
    cached = list((tmp_path / "cache" / "ref_logps").glob("*.pt"))
    assert len(cached) == 1
    values = torch.tensor(torch.load(cached[0]))  # (E, 2): chosen, rejected per pair
    live_ref = live_module.reference_sequence_logps(_lit_batch(_lit_data(rows, tmp_path / "again")))
    torch.testing.assert_close(values.T.reshape(-1), live_ref, atol=1e-5, rtol=1e-6)
    # and TRL's cached columns hold the same numbers
    torch.testing.assert_close(pre_batch["ref_chosen_logps"], values[:, 0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(pre_batch["ref_rejected_logps"], values[:, 1], atol=1e-5, rtol=1e-6)


# --------------------------------------------------------------------------- 4. three AdamW steps


@pytest.mark.parametrize("method", ["dpo", "cpo", "orpo"])
def test_three_adamw_steps_match_trl(method: str, model_dir: str, tmp_path) -> None:
    """Three different batches taken in order by both sides; DPO with each side's default reference (a
    copy loaded from the policy's path): the log-ratios are 0 at the first step only."""
    steps = 3
    rows = _rows("standard", steps * BATCH)
    trainer_cls, config_cls, module_cls, config = {
        "dpo": (DPOTrainer, DPOConfig, DPO, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
        "cpo": (CPOTrainer, CPOConfig, CPO, {"loss_type": "simpo", "cpo_alpha": 0.5}),
        "orpo": (ORPOTrainer, ORPOConfig, ORPO, {"beta": 0.2}),
    }[method]
    trainer = _trl(trainer_cls, config_cls, model_dir, rows, tmp_path / "trl", max_steps=steps, **config)
    trainer.train()

    module = module_cls(MODEL, optimizer=_adamw, **config)
    losses = _fit(module, _lit_data(rows, tmp_path), steps).losses

    assert len(trainer.recorded_losses) == len(losses) == steps
    assert losses == pytest.approx(trainer.recorded_losses, abs=1e-4)
    _assert_same_weights(module, trainer)


# --------------------------------------------------------------------------- 5. known departures from TRL


@pytest.mark.parametrize("trainer_cls", [CPOTrainer, ORPOTrainer], ids=["cpo", "orpo"])
def test_cpo_orpo_conversational_rows_get_a_second_eos_in_trl(trainer_cls, model_dir: str, tmp_path) -> None:
    """Departure: TRL's legacy CPO/ORPO pipeline renders a conversational row to text
    (``maybe_apply_chat_template``), then appends EOS at token level when the completion's last token is
    not EOS (``add_eos_token_if_needed``). The chat template closes the assistant turn with
    ``<|im_end|>\\n``, so TRL trains on ``...<|im_end|>\\n<|im_end|>``. lit-align tokenizes every preference
    method as TRL's DPO does (the template's end of turn, no extra EOS). All other tokens agree."""
    config_cls = CPOConfig if trainer_cls is CPOTrainer else ORPOConfig
    rows = [*_rows("conversational", 2), *EDGE_CONVERSATIONAL]
    theirs = _trl(trainer_cls, config_cls, model_dir, rows, tmp_path / "trl").train_dataset
    ours = _lit_data(rows, tmp_path).datasets["train"]
    for i in range(len(rows)):
        for j, side in enumerate(("chosen", "rejected")):
            ids, mask = ours[i]["input_ids"][j], ours[i]["completion_mask"][j]
            assert ids[-2:] == [EOS, ord("\n")]
            assert theirs[i][f"{side}_input_ids"] == [*ids, EOS]
            assert [int(t != -100) for t in theirs[i][f"{side}_labels"]] == [*mask, 1]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="lit_align.data.formats.extract_prompt departs from TRL's off-by-one",
)
def test_implicit_prompt_when_one_completion_extends_the_other(model_dir: str, tmp_path) -> None:
    """TRL's ``extract_prompt`` loops over the common length and, when no character differs, leaves the
    split at ``min(len) - 1``: ``"Yes"`` / ``"Yes, because"`` gives prompt ``"Ye"``, completions ``"s"`` and
    ``"s, because"``. lit-align splits at ``min(len)`` (prompt ``"Yes"``, chosen completion only EOS)."""
    rows = [{"chosen": "Yes", "rejected": "Yes, because"}]
    trainer = _trl_dpo(model_dir, rows, tmp_path / "trl")
    assert trainer.train_dataset[0]["prompt_ids"] == list(b"Ye")
    _assert_same_dpo_tokenization(trainer, _lit_data(rows, tmp_path))


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="documented departure (lit_align.losses.dpo.PairLogps): lengths count targets",
)
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_dpo_empty_prompt_lengths(loss_type: str, policy_dir: str, ref_dir: str, tmp_path) -> None:
    """Pairs that differ from their first character have an empty implicit prompt, so the first completion
    token has no context and is not scored. TRL still counts it in the lengths that ``ipo`` and
    ``sigmoid_norm`` divide by (``completion_mask.sum()``); lit-align counts scored targets. The tokens,
    log-probs and every other loss agree (``sigmoid`` below)."""
    rows = [{"chosen": "Yes it is.", "rejected": "No way."}, {"chosen": "Sure", "rejected": "Nope!"}]
    losses = {}
    for name in ("sigmoid", loss_type):
        trainer = _trl_dpo(policy_dir, rows, tmp_path / name, ref_dir=ref_dir, loss_type=name)
        assert trainer.train_dataset[0]["prompt_ids"] == []
        trainer.model.train()
        with torch.no_grad():
            ref_loss = trainer.compute_loss(trainer.model, _dpo_batch(trainer)).item()
        module = DPO(policy_dir, ref_model_name_or_path=ref_dir, loss_type=name)
        losses[name] = (
            _lit_first_step(module, _lit_batch(_lit_data(rows, tmp_path / name)))[0].item(),
            ref_loss,
        )
    assert losses["sigmoid"][0] == _approx(losses["sigmoid"][1])
    assert losses[loss_type][0] == _approx(losses[loss_type][1])
