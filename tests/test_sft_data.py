"""TRL's SFT data options: dataset_text_field, formatting_func, pre-tokenized rows and
dataset_kwargs, packing_strategy and eval_packing, and assistant_only_loss on chat templates
without {% generation %} markers."""

from __future__ import annotations

import json

import lightning as L
import pytest

from lit_align import SFT, LanguageModelingDataModule, PromptCompletionDataModule
from lit_align.data.arithmetic import arithmetic_rows
from lit_align.data.base import DataRequirements
from lit_align.data.sources import DataFormatError
from lit_align.data.tokenize import tokenize_text
from lit_align.models.builtin import builtin_tokenizer


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepared(dm, requirements: DataRequirements | None = None):
    dm.connect(builtin_tokenizer("builtin:tiny"), requirements)
    dm.setup()
    return dm


def texts(n=12):
    return [{"text": r["prompt"] + r["completion"]} for r in arithmetic_rows("prompt_completion", size=n, steps=1, max_operand=9)]


def format_row(row: dict) -> str:
    """A formatting_func as a TRL user writes one."""
    return f"{row['question']}{row['answer']}"


def not_a_string(row: dict):
    return [row["question"]]


def test_dataset_text_field_and_formatting_func_give_the_rows_text_gives(tmp_path):
    rows = texts()
    plain = prepared(LanguageModelingDataModule(write_jsonl(tmp_path / "t.jsonl", rows)))
    renamed = prepared(LanguageModelingDataModule(
        write_jsonl(tmp_path / "c.jsonl", [{"content": r["text"], "text": "ignored"} for r in rows]), dataset_text_field="content"))
    qa = [{"question": r["text"][:8], "answer": r["text"][8:]} for r in rows]
    formatted = prepared(LanguageModelingDataModule(write_jsonl(tmp_path / "qa.jsonl", qa), formatting_func="tests.test_sft_data:format_row"))
    called = prepared(LanguageModelingDataModule(str(tmp_path / "qa.jsonl"), formatting_func=format_row))
    expected = plain.datasets["train"]["input_ids"]
    for dm in (renamed, formatted, called):
        assert dm.datasets["train"]["input_ids"] == expected
    with pytest.raises(DataFormatError, match=r"dataset_text_field='body' is not a column \(found: content, text\)"):
        prepared(LanguageModelingDataModule(str(tmp_path / "c.jsonl"), dataset_text_field="body"))
    with pytest.raises(DataFormatError, match="formatting_func not_a_string returned list for row 0; expected a string"):
        prepared(LanguageModelingDataModule(str(tmp_path / "qa.jsonl"), formatting_func="tests.test_sft_data.not_a_string"))
    with pytest.raises(ValueError, match="formatting_func 'tests.test_sft_data:nothing': cannot import 'nothing'"):
        prepared(LanguageModelingDataModule(str(tmp_path / "qa.jsonl"), formatting_func="tests.test_sft_data:nothing"))


def test_tokenized_rows_are_used_as_they_are(tmp_path):
    """Rows with input_ids (TRL: pre-tokenized data skips preparation): the ids and masks as given."""
    tok = builtin_tokenizer("builtin:tiny")
    rows = []
    for r in arithmetic_rows("prompt_completion", size=8, steps=1, max_operand=9):
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"] + tok.eos_token)["input_ids"]
        rows.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    for kwargs in ({}, {"dataset_kwargs": {"skip_prepare_dataset": True}}):
        for cls in (LanguageModelingDataModule, PromptCompletionDataModule):
            dm = prepared(cls(write_jsonl(tmp_path / "ids.jsonl", rows), **kwargs))
            assert dm.datasets["train"]["input_ids"] == [[r["input_ids"]] for r in rows]
            assert dm.datasets["train"]["completion_mask"] == [[r["completion_mask"]] for r in rows]
    with pytest.raises(DataFormatError, match="skip_prepare_dataset says the data is tokenized, but it has no 'input_ids'"):
        prepared(LanguageModelingDataModule(write_jsonl(tmp_path / "t.jsonl", texts()), dataset_kwargs={"skip_prepare_dataset": True}))
    with pytest.raises(DataFormatError, match=r"row 1, column 'completion_mask' has 2 values for \d+ input_ids"):
        bad = [rows[0], {**rows[1], "completion_mask": [0, 1]}]
        prepared(LanguageModelingDataModule(write_jsonl(tmp_path / "bad.jsonl", bad)))
    with pytest.raises(DataFormatError, match=r"row 0, column 'input_ids': expected a list of integers"):
        prepared(LanguageModelingDataModule(write_jsonl(tmp_path / "str.jsonl", [{"input_ids": ["a", "b"]}])))
    with pytest.raises(ValueError, match=r"dataset_kwargs: unknown keys \['add_special_tokens'\]"):
        LanguageModelingDataModule(dataset_kwargs={"add_special_tokens": False})


def test_packing_strategies(tmp_path):
    """bfd truncates a long document, bfd_split keeps its overflow as more pieces, wrapped joins
    everything and cuts every max_length tokens; all but bfd keep every token."""
    rows = texts(24)
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    whole = prepared(LanguageModelingDataModule(path, max_length=None))
    total = sum(len(s) for seqs in whole.datasets["train"]["input_ids"] for s in seqs)
    longest = max(len(s) for seqs in whole.datasets["train"]["input_ids"] for s in seqs)
    cap = longest - 4  # every long document overflows
    packed = {s: prepared(LanguageModelingDataModule(path, max_length=cap, packing=True, packing_strategy=s))
              for s in ("bfd", "bfd_split", "wrapped")}
    tokens = {s: sum(len(x) for seqs in dm.datasets["train"]["input_ids"] for x in seqs) for s, dm in packed.items()}
    assert tokens["bfd"] < total and tokens["bfd_split"] == tokens["wrapped"] == total
    wrapped = [len(seqs[0]) for seqs in packed["wrapped"].datasets["train"]["input_ids"]]
    assert wrapped[:-1] == [cap] * (len(wrapped) - 1) and wrapped[-1] <= cap
    for dm in packed.values():
        assert all(sum(len(x) for x in seqs) <= cap for seqs in dm.datasets["train"]["input_ids"])
    with pytest.raises(ValueError, match="packing_strategy must be one of"):
        LanguageModelingDataModule(packing=True, packing_strategy="greedy")


def test_eval_packing(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", texts(40))
    for eval_packing, val_layout in ((None, "packed"), (False, "padded")):
        dm = prepared(LanguageModelingDataModule(path, eval_split=0.25, max_length=64, packing=True, eval_packing=eval_packing,
                                                 packing_strategy="bfd_split"))
        assert dm.layout_for("train") == "packed" and dm.layout_for("val") == val_layout
        val = dm.datasets["val"]
        if val_layout == "padded":  # one document per row, cut to max_length
            assert len(val) == 10 and all(len(seqs) == 1 and len(seqs[0]) <= 64 for seqs in val["input_ids"])
        batch = next(iter(dm.val_dataloader()))
        assert (batch.num_sequences == batch.input_ids.size(0)) == (val_layout == "padded")
    only_eval = prepared(LanguageModelingDataModule(path, eval_split=0.25, max_length=64, eval_packing=True))
    assert only_eval.layout_for("train") == "padded" and only_eval.layout_for("val") == "packed"
    assert len(only_eval.datasets["val"]) < 10


# --------------------------------------------------------------------------- assistant_only_loss


def without_markers(tok):
    tok.chat_template = tok.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    return tok


def conversations(n=6):
    rows = arithmetic_rows("language_modeling", size=2 * n, steps=1, max_operand=9, conversational=True)
    return [{"messages": [{"role": "system", "content": "Be brief."}, *a["messages"], *b["messages"]]}
            for a, b in zip(rows[::2], rows[1::2])]


def test_assistant_turns_found_by_rendering_match_the_template_markers():
    """On a template with {% generation %} markers, the tokens found by rendering turn by turn with
    the markers removed are exactly the marked ones (two assistant turns per conversation)."""
    marked, plain = builtin_tokenizer("builtin:tiny"), without_markers(builtin_tokenizer("builtin:tiny"))
    for row in conversations():
        want = tokenize_text(marked, row["messages"], row, assistant_mask=True)
        got = tokenize_text(plain, row["messages"], row, assistant_mask=True)
        assert got["input_ids"] == want["input_ids"]
        assert got["assistant_mask"] == want["assistant_mask"] and sum(want["assistant_mask"]) > 0


def test_assistant_only_loss_trains_on_a_template_without_markers(tmp_path):
    """Before, SFT(assistant_only_loss=True) stopped at the first batch on such a template."""
    (tmp_path / "plain.jinja").write_text(without_markers(builtin_tokenizer("builtin:tiny")).chat_template)
    module = SFT(assistant_only_loss=True, chat_template_path=str(tmp_path / "plain.jinja"))
    data = LanguageModelingDataModule(write_jsonl(tmp_path / "chat.jsonl", conversations(8)), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    row = data.datasets["train"][0]
    trained = [t for t, m in zip(row["input_ids"][0], row["assistant_mask"][0]) if m]
    assert module.tokenizer.decode(trained).count("Answer:") == 2 and "Be brief" not in module.tokenizer.decode(trained)


# --------------------------------------------------------------------------- sources: mixtures, files, columns


def qa_rows(n, seed=0):
    return [{"q": r["prompt"], "a": r["completion"], "source": "qa"}
            for r in arithmetic_rows("prompt_completion", size=n, steps=1, max_operand=9, seed=seed)]


def test_a_two_source_mixture_with_renamed_columns_and_a_fraction(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows("prompt_completion", size=12, steps=1, max_operand=9))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(20, seed=1))
    mixture = [{"path": a}, {"path": b, "columns": {"q": "prompt", "a": "completion"}, "fraction": 0.5}]
    dm = prepared(PromptCompletionDataModule(mixture=mixture))
    assert len(dm.datasets["train"]) == 12 + 10
    held = prepared(PromptCompletionDataModule(mixture=mixture, eval_split=0.5))
    assert len(held.datasets["train"]) + len(held.datasets["val"]) == 22
    with pytest.raises(DataFormatError, match=r"must end with the same columns .* mixture\[1\]: a, q, source"):
        prepared(PromptCompletionDataModule(mixture=[{"path": a}, {"path": b}]))
    with pytest.raises(ValueError, match=r"mixture\[0\]: unknown keys \['weight'\]"):
        prepared(PromptCompletionDataModule(mixture=[{"path": a, "weight": 2}]))
    with pytest.raises(DataFormatError, match=r"mixture\[0\] \(.*b.jsonl\): no column 'question'"):
        prepared(PromptCompletionDataModule(mixture=[{"path": b, "columns": ["question"]}]))


def test_column_mapping_and_data_files(tmp_path):
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir/one.jsonl", qa_rows(6))
    write_jsonl(tmp_path / "dir/two.jsonl", qa_rows(9, seed=2))
    dm = prepared(PromptCompletionDataModule(str(tmp_path / "dir"), data_files="two.jsonl",
                                             column_mapping={"q": "prompt", "a": "completion"}))
    assert len(dm.datasets["train"]) == 9
    with pytest.raises(DataFormatError, match="column_mapping: no column 'question' to rename"):
        prepared(PromptCompletionDataModule(str(tmp_path / "dir"), column_mapping={"question": "prompt"}))
    with pytest.raises(DataFormatError, match=r"builtin:arithmetic is generated, not read: \['data_files'\]"):
        prepared(PromptCompletionDataModule("builtin:arithmetic", data_files="x.jsonl"))


# --------------------------------------------------------------------------- through the CLI


def sft_cli(tmp_path, monkeypatch, *overrides):
    from pathlib import Path

    from lit_align.cli import build_cli

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs/sft.yaml"
    cli = build_cli(["fit", f"--config={config}", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                     "--data.init_args.eval_split=0.25", *overrides])
    assert cli.trainer.global_step == 2
    return cli


@pytest.mark.slow
def test_sft_config_on_tokenized_formatted_and_mixed_data(tmp_path, monkeypatch):
    """The shipped SFT config with TRL's data options, through lit-align fit: pre-tokenized rows,
    a formatting_func by import path, and a two-source mixture."""
    tok = builtin_tokenizer("builtin:tiny")
    ids = [{"input_ids": tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"]}
           for r in arithmetic_rows("prompt_completion", size=16, steps=1, max_operand=9)]
    cli = sft_cli(tmp_path, monkeypatch, f"--data.init_args.dataset_name_or_path={write_jsonl(tmp_path / 'ids.jsonl', ids)}",
                  "--data.init_args.dataset_kwargs={skip_prepare_dataset: true}")
    assert cli.datamodule.datasets["train"][0]["input_ids"][0] in [r["input_ids"] for r in ids]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": r["q"], "answer": r["a"]} for r in qa_rows(16)])
    cli = sft_cli(tmp_path, monkeypatch, "--data=LanguageModelingDataModule", f"--data.dataset_name_or_path={qa}",
                  "--data.formatting_func=tests.test_sft_data:format_row", "--data.eval_split=0.25")
    assert type(cli.datamodule).__name__ == "LanguageModelingDataModule"
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows("prompt_completion", size=12, steps=1, max_operand=9))
    cli = sft_cli(tmp_path, monkeypatch,
                  f"--data.init_args.mixture=[{{path: {a}}}, {{path: {qa}, columns: {{question: prompt, answer: completion}}}}]")
    assert len(cli.datamodule.datasets["train"]) + len(cli.datamodule.datasets["val"]) == 28


def test_pad_to_multiple_of(tmp_path):
    from lit_align import PromptOnlyDataModule

    path = write_jsonl(tmp_path / "t.jsonl", texts(8))
    for layout in ({}, {"packing": True}, {"padding_free": True}):
        batch = next(iter(prepared(LanguageModelingDataModule(path, batch_size=4, pad_to_multiple_of=64, **layout)).train_dataloader()))
        assert batch.input_ids.size(1) % 64 == 0 and batch.num_tokens < batch.input_ids.numel()
    assert next(iter(prepared(LanguageModelingDataModule(path, batch_size=4)).train_dataloader())).input_ids.size(1) % 64
    prompts = prepared(PromptOnlyDataModule("builtin:arithmetic?size=8&steps=1&max_operand=4", batch_size=4, pad_to_multiple_of=16))
    assert next(iter(prompts.train_dataloader())).prompt_ids.size(1) == 16
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        LanguageModelingDataModule(pad_to_multiple_of=0)


def test_chat_template_kwargs_reach_every_row(tmp_path):
    """TRL's chat_template_kwargs: variables for the template of every conversational row; a row's
    own column adds to them and wins."""
    from lit_align import PromptOnlyDataModule

    tok = builtin_tokenizer("builtin:tiny")
    tok.chat_template = "{{- greeting ~ ' ' -}}{%- for m in messages -%}{{- m['content'] -}}{%- endfor -%}"
    rows = [{"prompt": [{"role": "user", "content": "Compute 1+1."}]},
            {"prompt": [{"role": "user", "content": "Compute 2+2."}], "chat_template_kwargs": {"greeting": "Yo"}}]
    dm = PromptOnlyDataModule(write_jsonl(tmp_path / "p.jsonl", rows), batch_size=2, chat_template_kwargs={"greeting": "Hi"})
    dm.connect(tok)
    dm.setup()
    texts = [tok.decode(r[0]) for r in dm.datasets["train"]["input_ids"]]
    assert texts == ["Hi Compute 1+1.", "Yo Compute 2+2."]


def test_reward_model_path_is_a_reward_model():
    from lit_align import OnlineDPO
    from lit_align.rewards.model import RewardModelScorer

    module = OnlineDPO(reward_model_path="builtin:tiny")
    assert [type(f) for f in module.reward_funcs] == [RewardModelScorer]
    with pytest.raises(ValueError, match="exactly one of judge and reward_funcs"):
        OnlineDPO(reward_model_path="builtin:tiny", judge={"class_path": "lit_align.rewards.judges.RewardJudge"})


# --------------------------------------------------------------------------- streaming


def stream_batches(dm, n=None):
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if n is not None and i == n:
            break
        out.append([batch.input_ids[r][batch.sequence_ids[r] >= 0].tolist() for r in range(batch.input_ids.size(0))])
    return out


def test_a_stream_gives_the_batches_the_dataset_gives(tmp_path):
    """Unshuffled, a streamed split is batched as the same split held in memory; packed, every row
    fits max_length and keeps the tokens best-fit decreasing keeps in memory (per block)."""
    path = write_jsonl(tmp_path / "t.jsonl", texts(24))
    held = prepared(LanguageModelingDataModule(path, batch_size=4, shuffle=False, group_by_length=False))
    streamed = prepared(LanguageModelingDataModule(path, batch_size=4, shuffle=False, streaming=True))
    assert stream_batches(streamed) == stream_batches(held)
    packed = prepared(LanguageModelingDataModule(path, batch_size=2, streaming=True, packing=True, max_length=48))
    rows = [row for batch in stream_batches(packed) for row in batch]
    assert all(len(r) <= 48 for r in rows)
    assert sum(map(len, rows)) == sum(len(s) for seqs in held.datasets["train"]["input_ids"] for s in seqs)
    with pytest.raises(ValueError, match="with streaming give a split name"):
        LanguageModelingDataModule(path, streaming=True, eval_split=0.1)
    with pytest.raises(ValueError, match="a stream is batched as it comes"):
        LanguageModelingDataModule(path, streaming=True, group_by_length=True)


def test_a_streamed_run_resumes_on_the_batches_it_stopped_at(tmp_path):
    """SFT on a shuffled stream, checkpointed mid-epoch (step 3), at the end of the first epoch
    (step 10: Lightning has already looked past the stream's end) and in the second (step 12): each
    resumed run trains on the batches the uninterrupted run trained on, step for step."""
    path = write_jsonl(tmp_path / "t.jsonl", texts(40))
    saves = (3, 10, 12)

    class SaveAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in saves:
                trainer.save_checkpoint(tmp_path / f"step={trainer.global_step}.ckpt")

    class Record(L.Callback):
        def __init__(self):
            self.batches = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches[trainer.global_step] = batch.input_ids[batch.sequence_ids >= 0].tolist()

    def run(steps, ckpt=None, save=False):
        L.seed_everything(0)
        record = Record()
        callbacks = [record, SaveAt()] if save else [record]
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks, enable_checkpointing=False)
        data = LanguageModelingDataModule(path, batch_size=4, streaming=True, shuffle_buffer_size=8)
        trainer.fit(SFT(), data, ckpt_path=ckpt)
        return record.batches

    whole = run(14, save=True)
    assert len(whole) == 14 and whole[0] != whole[10]  # two epochs of 10 batches, shuffled differently
    for step in saves:
        resumed = run(14, ckpt=str(tmp_path / f"step={step}.ckpt"))
        assert sorted(resumed) == list(range(step, 14))
        assert all(resumed[s] == whole[s] for s in resumed), step


def test_streamed_mixture_and_validation(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", texts(6))
    b = write_jsonl(tmp_path / "b.jsonl", [{"body": r["text"]} for r in texts(10)])
    dm = prepared(LanguageModelingDataModule(mixture=[{"path": a}, {"path": b, "columns": {"body": "text"}}], batch_size=4,
                                             streaming=True, shuffle=False))
    assert sum(len(batch) for batch in stream_batches(dm)) == 16
    with pytest.raises(ValueError, match=r"mixture\[0\]: fraction needs the whole source"):
        prepared(LanguageModelingDataModule(mixture=[{"path": a, "fraction": 0.5}], streaming=True))
    val = prepared(LanguageModelingDataModule("builtin:arithmetic?size=16&steps=1", eval_split="test", batch_size=4, streaming=True))
    batch = next(iter(val.val_dataloader()))
    assert batch.num_examples == 4
