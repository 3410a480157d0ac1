"""Generation decoupled from the optimizer step (TRL's steps_per_generation, generation_batch_size,
num_generations_eval) for GRPO and RLOO: what the DataModule batches, which slice each step
trains on, when old log-probs are kept, resuming between slices, and bad settings."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_align import GRPO, RLOO, PromptOnlyDataModule, RolloutCallback
from lit_align.data.base import DataRequirements
from lit_align.models.builtin import builtin_tokenizer
from tests.scripted_engine import ScriptedEngine
from tests.test_online import DATA, adamw, fit


class Spy(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch.rollout)


def run(cls, steps, batch_size=4, accumulate_grad_batches=1, **kwargs):
    module = cls(reward_funcs=["arithmetic_reward"], num_generations=2, max_completion_length=12, optimizer=adamw(1e-2), **kwargs)
    engine, spy = ScriptedEngine(builtin_tokenizer()), Spy()
    trainer, record = fit(module, PromptOnlyDataModule(DATA, batch_size=batch_size), steps=steps,
                          callbacks=[RolloutCallback(engine=engine), spy], accumulate_grad_batches=accumulate_grad_batches)
    return module, engine, spy.seen, record, trainer


def rows(rollout) -> set:
    return {(p, c) for p, c in zip(rollout.prompts, rollout.completions)}


def test_a_prompt_batch_holds_the_steps_it_serves():
    dm = PromptOnlyDataModule(DATA, batch_size=4, eval_split=0.25, eval_batch_size=6)
    dm.connect(builtin_tokenizer(), DataRequirements(rows_per_prompt=2, generation_steps=3, batch_repeats=3,
                                                     eval_rows_per_prompt=3))
    dm.setup()
    batches = iter(dm.train_dataloader())
    first = [next(batches).prompts for _ in range(3)]
    assert len(first[0]) == 6 and first[0] == first[1] == first[2]  # 3 steps x 2 prompts, served 3 times
    assert len(next(iter(dm.val_dataloader())).prompts) == 2  # 6 completions / num_generations_eval 3


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_one_rollout_serves_steps_per_generation_steps_in_disjoint_slices(cls):
    module, engine, seen, record, _ = run(cls, steps=4, steps_per_generation=2)
    assert engine.calls == 2 and module.generation_steps == 2
    for a, b in ((seen[0], seen[1]), (seen[2], seen[3])):
        assert len(a) == len(b) == 4 and not rows(a) & rows(b)  # each step: batch_size rows, no row twice
    assert not rows(seen[0]) & rows(seen[2])
    if cls is GRPO:  # the policy moves between slices: old log-probs make the ratio
        assert seen[1].old_logps is not None
        # dapo's normaliser: the generation batch's tokens per step it serves (TRL's num_items_in_batch * GA / S,
        # with Lightning dividing by GA)
        tokens = float(seen[0].loss_mask.sum() + seen[1].loss_mask.sum())
        assert float(seen[0].extras["num_items"]) == float(seen[1].extras["num_items"]) == tokens / 2
    assert all("train/loss" in m for m in record.metrics)


def test_slices_come_round_again_with_num_iterations():
    _, engine, seen, _, _ = run(GRPO, steps=4, steps_per_generation=2, num_iterations=2)
    assert engine.calls == 1
    assert seen[0] is seen[2] and seen[1] is seen[3] and seen[0] is not seen[1]  # TRL's order: 0, 1, 0, 1


def test_default_is_one_generation_per_optimizer_step():
    module, engine, seen, _, trainer = run(GRPO, steps=2, accumulate_grad_batches=2)
    assert module.generation_steps == 2 and engine.calls == 2 and trainer.global_step == 2
    assert seen[0].old_logps is None  # sampled and used within one optimizer step: no old log-probs (TRL's rule)
    assert rows(seen[0]).isdisjoint(rows(seen[1]))


def test_generation_batch_size_sets_the_steps():
    module, engine, _, _, _ = run(RLOO, steps=3, generation_batch_size=12)
    assert module.generation_steps == 3 and engine.calls == 1
    with pytest.raises(ValueError, match=r"generation_batch_size=10 must be divisible by the global batch size.*4 x 1 = 4"):
        run(GRPO, steps=1, generation_batch_size=10)


def test_a_resumed_run_trains_on_the_slice_it_stopped_at(tmp_path):
    def make():
        return GRPO(reward_funcs=["arithmetic_reward"], num_generations=2, max_completion_length=12, steps_per_generation=2,
                    optimizer=adamw(1e-2))

    torch.manual_seed(0)
    whole = Spy()
    fit(make(), PromptOnlyDataModule(DATA, batch_size=4), steps=2, callbacks=[RolloutCallback(engine=ScriptedEngine()), whole])
    torch.manual_seed(0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(make(), PromptOnlyDataModule(DATA, batch_size=4), steps=1, enable_checkpointing=True,
        callbacks=[RolloutCallback(engine=ScriptedEngine()), ckpt])
    resumed = Spy()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RolloutCallback(engine=ScriptedEngine()), resumed])
    trainer.fit(make(), PromptOnlyDataModule(DATA, batch_size=4), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(resumed.seen) == 1 and rows(resumed.seen[0]) == rows(whole.seen[1])


def test_validation_samples_num_generations_eval():
    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=2, num_generations_eval=3, max_completion_length=12)
    dm = PromptOnlyDataModule(DATA, batch_size=4, eval_split=0.25, eval_batch_size=6)

    class ValSpy(L.Callback):
        sizes: list = []

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args):
            self.sizes.append((len(batch.prompts), len(batch.rollout), batch.rollout.rows_per_prompt))

    spy = ValSpy()
    fit(module, dm, steps=1, callbacks=[RolloutCallback(engine=ScriptedEngine()), spy], limit_val_batches=1, val_check_interval=1)
    assert spy.sizes and spy.sizes[0] == (2, 6, 3) and module.num_generations == 2


def test_bad_generation_settings_are_reported():
    with pytest.raises(ValueError, match="steps_per_generation and generation_batch_size say the same thing"):
        GRPO(reward_funcs=["arithmetic_reward"], steps_per_generation=2, generation_batch_size=16)
    with pytest.raises(ValueError, match="generation_batch_size=9 must be divisible by num_generations=2"):
        RLOO(reward_funcs=["arithmetic_reward"], generation_batch_size=9)
    with pytest.raises(ValueError, match="steps_per_generation must be >= 1"):
        GRPO(reward_funcs=["arithmetic_reward"], steps_per_generation=0)
