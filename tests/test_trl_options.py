"""The last of TRL 1.16's config fields that live on the module or DataModule: pad_token,
padding_value, shuffle_dataset, cache_implementation, transformers' continuous batching,
num_completions_to_print and log_unique_prompts."""

from __future__ import annotations

import json

import pytest
import torch

from lit_align import GRPO, SFT, LanguageModelingDataModule, PreferenceDataModule, PromptOnlyDataModule
from lit_align.data.arithmetic import arithmetic_rows
from lit_align.models.builtin import builtin_model, builtin_tokenizer
from lit_align.rollout.callback import RolloutCallback, completion_rows
from lit_align.rollout.engines import HFEngine, SamplingParams
from lit_align.rollout.types import Rollout

DATA = "builtin:arithmetic?size=16&steps=1&max_operand=4"


def prompts(tok):
    rows = [tok("Compute 1+2.\n")["input_ids"], tok("Compute 3-1+4.\n")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    return ids, (ids != tok.pad_token_id).long()


def test_pad_token_is_a_token_of_the_vocabulary_and_reaches_the_model():
    module = SFT(pad_token="<|endoftext|>")
    module.configure_model()
    pad = module.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert module.tokenizer.pad_token_id == pad == module.pad_token_id
    assert module.model.config.pad_token_id == pad == module.model.generation_config.pad_token_id
    with pytest.raises(ValueError, match=r"pad_token '<pad>' is not a token of the tokenizer"):
        _ = SFT(pad_token="<pad>").tokenizer


def test_padding_value_pads_input_ids_and_changes_no_mask():
    def batch(**kwargs):
        dm = PreferenceDataModule(DATA, batch_size=4, group_by_length=False, shuffle=False, **kwargs)
        dm.connect(builtin_tokenizer())
        dm.setup()
        return next(iter(dm.train_dataloader()))

    default, custom = batch(), batch(padding_value=7)
    pad_positions = default.input_ids != custom.input_ids
    assert pad_positions.any() and (custom.input_ids[pad_positions] == 7).all()
    assert torch.equal(default.attention_mask, custom.attention_mask) if hasattr(default, "attention_mask") else True
    assert (default.input_ids[pad_positions] == builtin_tokenizer().pad_token_id).all()


def test_shuffle_dataset_shuffles_rows_once_before_packing(tmp_path):
    rows = [{"text": r["prompt"] + r["completion"]} for r in arithmetic_rows("prompt_completion", size=24, steps=1, max_operand=9)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def packed_rows(**kwargs):
        dm = LanguageModelingDataModule(str(path), max_length=48, packing=True, **kwargs)
        dm.connect(builtin_tokenizer())
        dm.setup()
        return dm.datasets["train"]["input_ids"]

    plain, shuffled, again = packed_rows(), packed_rows(shuffle_dataset=True, seed=3), packed_rows(shuffle_dataset=True, seed=3)
    assert shuffled == again and shuffled != plain  # seeded, and a different packing
    tokens = sorted(tuple(s) for seqs in plain for s in seqs)
    assert tokens == sorted(tuple(s) for seqs in shuffled for s in seqs)  # the same documents


def test_prompt_only_shuffle_dataset_is_trls_sampler_shuffle():
    assert PromptOnlyDataModule(DATA, shuffle_dataset=False).shuffle is False
    assert PromptOnlyDataModule(DATA, shuffle_dataset=True, shuffle=True).shuffle is True
    with pytest.raises(ValueError, match="shuffle_dataset=False contradicts shuffle=True"):
        PromptOnlyDataModule(DATA, shuffle_dataset=False, shuffle=True)


def test_cache_implementation_samples_with_generate(monkeypatch):
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=2, max_completion_length=4, cache_implementation="dynamic")
    assert module.sampling.generation_kwargs == {"cache_implementation": "dynamic"}
    tok, model = builtin_tokenizer(), builtin_model()
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    ids, mask = prompts(tok)
    gens = HFEngine(tok).generate(model, ids, mask, module.sampling)
    assert seen["cache_implementation"] == "dynamic" and gens.completion_ids.size(0) == 4


def test_continuous_batching_engine_gives_what_the_lean_decoder_gives():
    """transformers' ``generate_batch``: greedy completions equal the lean loop's; rows ordered by
    prompt, the samples of a prompt consecutive."""
    tok, model = builtin_tokenizer(), builtin_model().eval()
    ids, mask = prompts(tok)
    sampling = SamplingParams(max_completion_length=5, temperature=0.0, num_generations=2)
    paged = HFEngine(tok, continuous_batching={}).generate(model, ids, mask, sampling)  # on CPU its cache fits the batch
    lean = HFEngine(tok).generate(model, ids, mask, sampling)
    assert torch.equal(paged.completion_ids, lean.completion_ids) and torch.equal(paged.completion_mask, lean.completion_mask)
    assert torch.isfinite(paged.sampling_logps).all()
    module = GRPO(reward_funcs=["arithmetic_reward"], use_transformers_paged=True,
                  transformers_continuous_batching_config={"max_batch_tokens": 256})
    assert module.make_engine().continuous_batching == {"max_batch_tokens": 256}
    with pytest.raises(ValueError, match="use_transformers_continuous_batching and use_vllm pick two engines"):
        GRPO(reward_funcs=["arithmetic_reward"], use_transformers_continuous_batching=True, use_vllm=True)


def rollout_of(prompts_: list[str]) -> Rollout:
    n = len(prompts_)
    return Rollout(generations=None, sequences=None, loss_mask=torch.ones(n, 2), advantages=torch.arange(n, dtype=torch.float),
                   prompts=prompts_, completions=[f"c{i}" for i in range(n)],
                   reward_columns={"arithmetic_reward": torch.ones(n)})


def test_completions_table_unique_prompts_console_and_files(capsys, tmp_path):
    rollout = rollout_of(["a", "a", "b", "b"])
    columns, rows = completion_rows(3, rollout)
    assert columns == ["step", "prompt", "completion", "arithmetic_reward", "advantage"] and len(rows) == 4
    _, unique = completion_rows(3, rollout, unique_prompts=True)
    assert [r[1:3] for r in unique] == [["a", "c0"], ["b", "c2"]]

    class Trainer:
        global_rank, global_step, loggers, default_root_dir = 0, 3, [], str(tmp_path)

    RolloutCallback(num_completions_to_print=1)._log_table(Trainer(), rollout)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == ["step | prompt | completion | arithmetic_reward | advantage", "3 | a | c0 | 1.000 | 0.000"]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "completions" / "completions_00003.parquet").to_pylist()  # every row, as TRL's files
    assert [r["completion"] for r in table] == ["c0", "c1", "c2", "c3"] and table[0]["arithmetic_reward"] == 1.0
    RolloutCallback(num_completions_to_print=0)._log_table(Trainer(), rollout)
    assert capsys.readouterr().out == ""
    module = GRPO(reward_funcs=["arithmetic_reward"], log_unique_prompts=True, num_completions_to_print=2, log_completions=True)
    assert (module.log_unique_prompts, module.num_completions_to_print) == (True, 2)


def progress_reward(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **kwargs):
    """A reward function using TRL's extra arguments: shaped by the step, logging a column and a metric."""
    log_extra("length", [len(c) for c in completion_ids])
    log_metric("progress", trainer_state.global_step / max(trainer_state.max_steps, 1))
    return [float(trainer_state.global_step)] * len(completions)


def test_reward_functions_get_trainer_state_log_extra_and_log_metric():
    import lightning as L

    from lit_align import RolloutCallback
    from tests.scripted_engine import ScriptedEngine

    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch.rollout, float(trainer.callback_metrics["train/progress"])))

    module = GRPO(reward_funcs=[progress_reward], num_generations=2, max_completion_length=8)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[RolloutCallback(engine=ScriptedEngine(builtin_tokenizer())), Spy()])
    trainer.fit(module, PromptOnlyDataModule(DATA, batch_size=4))
    assert [r.reward_columns["progress_reward"][0].item() for r, _ in seen] == [0.0, 1.0, 2.0]
    assert [m for _, m in seen] == pytest.approx([0.0, 1 / 3, 2 / 3])
    rollout = seen[-1][0]
    lengths = rollout.generations.completion_mask.sum(1).tolist()
    assert rollout.log_columns["length"] == lengths
    columns, rows = completion_rows(2, rollout)
    assert columns == ["step", "prompt", "completion", "progress_reward", "length", "advantage"]
    assert [r[4] for r in rows] == lengths


def test_completions_go_to_a_hub_dataset_repo(tmp_path, monkeypatch):
    """TRL's log_completions_hub_repo: the repository is created and a commit scheduler pushes the
    completion files every two minutes (the Hub calls are recorded here, nothing leaves the machine)."""
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))

    class Scheduler:
        def __init__(self, **kw):
            calls["scheduler"] = kw

    monkeypatch.setattr(huggingface_hub, "CommitScheduler", Scheduler)
    module = GRPO(reward_funcs=["arithmetic_reward"], log_completions=True, log_completions_hub_repo="me/completions")
    callback = RolloutCallback(log_completions_every_n_steps=1, hub_repo=module.log_completions_hub_repo)

    class Trainer:
        global_rank, default_root_dir = 0, str(tmp_path)

    callback.setup(Trainer(), module, "fit")
    assert calls["repo"] == ("me/completions", {"repo_type": "dataset", "exist_ok": True})
    assert calls["scheduler"]["folder_path"] == tmp_path / "completions" and calls["scheduler"]["every"] == 2
    with pytest.raises(ValueError, match="log_completions_hub_repo is set, but log_completions is False"):
        GRPO(reward_funcs=["arithmetic_reward"], log_completions_hub_repo="me/completions")
