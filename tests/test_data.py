"""Data layer: the six formats from every kind of source, TRL's tokenization rules, layouts, errors."""

import json

import datasets
import pytest
import torch

from lit_align import (
    LanguageModelingDataModule,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    StepwiseDataModule,
    UnpairedPreferenceDataModule,
)
from lit_align.data.arithmetic import arithmetic_rows
from lit_align.data.formats import extract_prompt
from lit_align.data.sources import DataFormatError
from lit_align.ops.packing import collate_sequences, pack_bfd

EOS = 258  # <|im_end|> of the builtin tokenizer


def setup(dm, tokenizer):
    dm.connect(tokenizer).setup("fit")
    return dm


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# -- the six formats on the embedded task -------------------------------------------------------
@pytest.mark.parametrize(
    "cls, conversational",
    [
        (LanguageModelingDataModule, False),
        (LanguageModelingDataModule, True),
        (PromptCompletionDataModule, False),
        (PromptCompletionDataModule, True),
        (PreferenceDataModule, False),
        (PreferenceDataModule, True),
        (UnpairedPreferenceDataModule, False),
        (UnpairedPreferenceDataModule, True),
        (StepwiseDataModule, False),
        (PromptOnlyDataModule, False),
        (PromptOnlyDataModule, True),
    ],
)
def test_every_format_loads_and_collates(cls, conversational, tokenizer):
    flag = "true" if conversational else "false"
    dm = setup(cls(f"builtin:arithmetic?size=24&conversational={flag}", batch_size=4, eval_split="test"), tokenizer)
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 16
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4 if cls is PromptOnlyDataModule else batch.num_examples == 4


def test_prompt_completion_standard_follows_trl(tokenizer):
    dm = setup(PromptCompletionDataModule("builtin:arithmetic?size=4"), tokenizer)
    row = arithmetic_rows("prompt_completion", size=4)[0]
    item = dm.datasets["train"][0]
    ids, mask = item["input_ids"][0], item["completion_mask"][0]
    # Byte tokenizer: prompt bytes, then completion bytes, then EOS appended by the EOS rule.
    expected = list((row["prompt"] + row["completion"]).encode()) + [EOS]
    assert ids == expected
    assert mask == [0] * len(row["prompt"].encode()) + [1] * (len(row["completion"].encode()) + 1)


def test_conversational_completion_mask_and_assistant_mask(tokenizer):
    dm = setup(PromptCompletionDataModule("builtin:arithmetic?size=4&conversational=true"), tokenizer)
    item = dm.datasets["train"][0]
    ids, mask, amask = item["input_ids"][0], item["completion_mask"][0], item["assistant_mask"][0]
    text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert text.startswith(arithmetic_rows("prompt_completion", size=4)[0]["completion"].split("\n")[0])
    # The completion mask starts after "<|im_start|>assistant\n"; the assistant mask covers
    # the answer and its <|im_end|>, not the template's trailing newline.
    assistant = tokenizer.decode([t for t, m in zip(ids, amask) if m])
    assert assistant.endswith("<|im_end|>") and "<|im_start|>" not in assistant


def test_language_modeling_text_gets_eos_and_packs(tokenizer):
    dm = setup(LanguageModelingDataModule("builtin:arithmetic?size=40", packing=True, max_length=200), tokenizer)
    lengths = [sum(len(s) for s in ids) for ids in dm.datasets["train"]["input_ids"]]
    assert all(n <= 200 for n in lengths)
    assert len(lengths) < 40  # several documents per packed row
    total = sum(len(ids[0]) for ids in setup(LanguageModelingDataModule("builtin:arithmetic?size=40"), tokenizer).datasets["train"]["input_ids"])
    assert sum(lengths) == total  # packing loses no token
    for seqs in dm.datasets["train"]["input_ids"]:
        assert all(s[-1] == EOS for s in seqs)


def test_preference_pairs_layout_and_implicit_prompt(tokenizer, tmp_path):
    rows = [{"chosen": "Q? The answer is 4", "rejected": "Q? The answer is 5"}] * 3
    dm = setup(PreferenceDataModule(write_jsonl(tmp_path / "p.jsonl", rows), batch_size=3), tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_sequences == 6
    # Sequences 0..2 are chosen, 3..5 rejected (TRL's concatenated layout).
    last = [batch.input_ids[r][batch.attention_mask[r].bool()][-2].item() for r in range(6)]
    assert last == [ord("4")] * 3 + [ord("5")] * 3
    assert extract_prompt("Q? The answer is 4", "Q? The answer is 5") == ("Q? The answer is", " 4", " 5")
    assert extract_prompt("Hi there", "Hi you") == ("Hi", " there", " you")


def test_unpaired_from_pairs_and_labels(tokenizer):
    dm = setup(UnpairedPreferenceDataModule("builtin:arithmetic?size=10"), tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert batch.labels.dtype == torch.bool
    # Preference pairs become one desirable and one undesirable row each.
    pairs = datasets.Dataset.from_list(arithmetic_rows("preference", size=5))
    dm2 = UnpairedPreferenceDataModule("unused")
    unpaired = dm2._prepare(pairs, "pairs", tokenizer)
    assert len(unpaired) == 10 and sum(unpaired["label"]) == 5


def test_stepwise_labels_on_step_ends(tokenizer):
    dm = setup(StepwiseDataModule("builtin:arithmetic?size=8"), tokenizer)
    row = arithmetic_rows("stepwise", size=8)[0]
    item = dm.datasets["train"][0]
    ids, labels = item["input_ids"][0], item["step_labels"][0]
    where = [i for i, v in enumerate(labels) if v != -100]
    assert len(where) == len(row["completions"])
    assert all(ids[i] == ord("\n") for i in where)  # the separator closes each step
    assert [bool(labels[i]) for i in where] == row["labels"]


def test_prompt_only_left_pads_and_keeps_extras(tokenizer):
    dm = setup(PromptOnlyDataModule("builtin:arithmetic?size=8", batch_size=4, group_by_length=False, shuffle=False), tokenizer)
    batch = next(iter(dm.train_dataloader()))
    rows = arithmetic_rows("prompt_only", size=8)[:4]
    assert batch.extras["answer"] == [r["answer"] for r in rows]
    assert batch.prompts == [r["prompt"] for r in rows]
    assert (batch.prompt_mask[:, -1] == 1).all()  # left padding: every prompt ends at the right edge


# -- sources --------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet", "dir"])
def test_local_sources(ext, tmp_path, tokenizer):
    rows = arithmetic_rows("prompt_completion", size=12)
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{ext}"
    if ext == "jsonl":
        write_jsonl(path, rows)
    elif ext == "json":
        ds.to_json(str(path), lines=False)
    elif ext == "csv":
        ds.to_csv(str(path))
    elif ext == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    dm = setup(PromptCompletionDataModule(str(path), eval_split=0.25), tokenizer)
    assert len(dm.datasets["train"]) == 9 and len(dm.datasets["val"]) == 3


# -- bad input ------------------------------------------------------------------------------
def test_misspelled_column_names_file_and_suggests(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejectd": "c"}])
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl.*missing column 'rejected'.*Did you mean 'rejectd'"):
        setup(PreferenceDataModule(path), tokenizer)


def test_wrong_type_names_row_and_column(tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}])
    with pytest.raises(DataFormatError, match=r"mem: row 1, column 'completion': expected a string or a list of"):
        PromptCompletionDataModule("x")._prepare(ds, "mem", tokenizer)


def test_non_boolean_label(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "c", "label": "yes"}])
    with pytest.raises(DataFormatError, match=r"u\.jsonl.*column 'label': expected a boolean"):
        setup(UnpairedPreferenceDataModule(path), tokenizer)


def test_stepwise_length_mismatch(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completions": ["a", "b"], "labels": [True]}])
    with pytest.raises(DataFormatError, match=r"row 0: 'completions' has 2 steps but 'labels' has 1"):
        setup(StepwiseDataModule(path), tokenizer)


def test_chosen_equal_rejected(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataFormatError, match=r"row 1: 'chosen' and 'rejected' are identical"):
        setup(PreferenceDataModule(path), tokenizer)


def test_empty_dataset(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_json(str(path))
    with pytest.raises(DataFormatError, match="empty"):
        setup(PromptCompletionDataModule(str(path)), tokenizer)


def test_a_malformed_jsonl_line_is_reported_with_its_number(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "completion": "a"}\n\n{"prompt": "q", "completion": "b"}\n{"prompt": "r", "completion": \n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl: line 4, column \d+: not valid JSON"):
        setup(PromptCompletionDataModule(str(path)), tokenizer)
    path.write_text('{"prompt": "p", "completion": "a"}\n["q", "b"]\n')
    with pytest.raises(DataFormatError, match=r"line 2: expected a JSON object"):
        setup(PromptCompletionDataModule(str(path)), tokenizer)


def test_a_csv_with_only_a_header_is_empty(tmp_path, tokenizer):
    path = tmp_path / "header.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(DataFormatError, match=r"header.csv: the dataset is empty \(only a header row"):
        setup(PromptCompletionDataModule(str(path)), tokenizer)


def test_eval_split_fraction_from_the_command_line(tmp_path, tokenizer):
    """``--data.eval_split=0.1`` is a fraction, as the error for single files advises (it was the split '0.1')."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptCompletionDataModule, "data")
    assert parser.parse_args(["--data.eval_split=0.1"]).data.eval_split == 0.1
    assert parser.parse_args(["--data.eval_split=test"]).data.eval_split == "test"
    rows = [{"prompt": f"p{i}", "completion": "a"} for i in range(20)]
    dm = setup(PromptCompletionDataModule(write_jsonl(tmp_path / "d.jsonl", rows), eval_split="0.1"), tokenizer)
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (18, 2)


def test_rows_too_long_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "x" * 50, "completion": "y"}, {"prompt": "x", "completion": "y"}]
    dm = setup(PromptCompletionDataModule(write_jsonl(tmp_path / "l.jsonl", rows), max_length=20), tokenizer)
    assert len(dm.datasets["train"]) == 1 and list(dm.num_dropped.values()) == [1]
    rows = [{"prompt": "x" * 50, "completion": "y"}] * 2
    with pytest.raises(DataFormatError, match="every row was dropped.*max_length=20"):
        setup(PromptCompletionDataModule(write_jsonl(tmp_path / "l2.jsonl", rows), max_length=20), tokenizer)


def test_mixed_standard_and_conversational(tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])
    ok = PromptCompletionDataModule("x")._prepare(ds, "mem", tokenizer)
    assert len(ok) == 1
    from lit_align.data.sources import check_same_form

    with pytest.raises(DataFormatError, match="mixes standard and conversational"):
        check_same_form({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, 0, ["prompt", "completion"], "mem")


def test_missing_file_and_unknown_builtin(tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        setup(PromptCompletionDataModule("/nonexistent/data.jsonl"), tokenizer)
    with pytest.raises(ValueError, match="arithmetic"):
        setup(PromptCompletionDataModule("builtin:nosuchtask"), tokenizer)


# -- layouts --------------------------------------------------------------------------------
def test_pack_bfd_is_valid_and_tight():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = pack_bfd(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.1 + 1


def test_layouts_keep_tokens_and_reset_positions():
    seqs = [{"input_ids": [1] * n, "completion_mask": [1] * n} for n in (5, 3, 4, 2)]
    padded = collate_sequences(seqs, 0, "padded")
    packed = collate_sequences(seqs, 0, "packed", capacity=8)
    flat = collate_sequences(seqs, 0, "padding_free")
    assert padded["input_ids"].shape == (4, 5) and "attention_mask" in padded
    assert packed["input_ids"].shape[0] == 2 and "attention_mask" not in packed
    assert flat["input_ids"].shape == (1, 14)
    for out in (padded, packed, flat):
        ids = out["sequence_ids"]
        for s, n in enumerate((5, 3, 4, 2)):
            assert int((ids == s).sum()) == n
            assert out["position_ids"][ids == s].tolist() == list(range(n))


def test_sampler_groups_by_length_and_covers():
    from lit_align.data.sampler import ShardedSampler

    lengths = list(range(100))
    sampler = ShardedSampler(lengths, batch_size=4, seed=1, mega_batch_factor=5)
    order = list(sampler)
    assert sorted(order) == lengths
    spreads = [max(order[i : i + 4]) - min(order[i : i + 4]) for i in range(0, 100, 4)]
    assert sum(spreads) / len(spreads) < 15  # random batches would spread ~50
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new order each epoch


def test_sampler_shards_the_global_order(monkeypatch):
    """Two ranks' batches of a step together are the one-process batch of twice the size."""
    from lit_align.data.sampler import ShardedSampler

    lengths = [(i * 37) % 23 for i in range(30)]
    single = ShardedSampler(lengths, batch_size=8, seed=2)
    monkeypatch.setattr(ShardedSampler, "_world", staticmethod(lambda: (1, 0)))
    one = list(single)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(ShardedSampler, "_world", staticmethod(lambda rank=rank: (2, rank)))
        shards.append(list(ShardedSampler(lengths, batch_size=4, seed=2, mega_batch_factor=100)))
    assert len(shards[0]) == len(shards[1]) == 15
    for step in range(3):
        together = shards[0][4 * step : 4 * step + 4] + shards[1][4 * step : 4 * step + 4]
        assert sorted(together) == sorted(one[8 * step : 8 * step + 8])


def test_a_method_declares_what_it_asks_of_its_data():
    """One typed channel, module -> data: ``data_requirements()``, connected when a fit sets the
    data up or by hand without a Trainer (no reading of the other object's attributes)."""
    from lit_align import CPO, GRPO, KTO
    from lit_align.data.base import DataRequirements

    needs = GRPO(reward_funcs=["arithmetic_reward"], num_generations=4, num_iterations=2).data_requirements()
    assert needs == DataRequirements("builtin:tiny", rows_per_prompt=4, batch_repeats=2, eval_rows_per_prompt=4)
    assert KTO().data_requirements().kl_pairs and not KTO(loss_type="apo_zero_unpaired").data_requirements().kl_pairs
    assert CPO().data_requirements().add_bos_to_prompt
    data = PromptOnlyDataModule("builtin:arithmetic?size=32", batch_size=8).connect(requirements=needs)
    data.setup("fit")
    batches = [batch.prompts for batch, _ in zip(data.train_dataloader(), range(4))]
    assert len(batches[0]) == 2  # 8 completions, 4 per prompt
    assert batches[0] == batches[1] and batches[2] == batches[3] != batches[0]  # each batch twice in a row
