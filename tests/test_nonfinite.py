"""A NaN or inf stops the run at the step it appears, saying what it was and where: from a
reward function, from the data, from the loss and from the gradients."""

import json
import math

import lightning as L
import pytest
import torch

from lit_align import (
    GRPO,
    SFT,
    PreferenceDataModule,
    PromptCompletionDataModule,
    PromptOnlyDataModule,
    RewardModel,
)
from lit_align.data.sources import DataFormatError
from lit_align.rewards.registry import compute_rewards

DATA = "builtin:arithmetic?size=32&steps=1&max_operand=4"


def fit(module, data, steps=2):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return trainer


def half_nan(prompts, completions, **kwargs):
    return [math.nan if i % 2 else 1.0 for i in range(len(completions))]


def test_a_reward_function_returning_nan_is_named_with_its_rows():
    with pytest.raises(ValueError, match=r"reward function 'half_nan' returned nan for 2 of 4 completions \(rows \[1, 3\]\)"):
        compute_rewards([half_nan], ["p"] * 4, ["c"] * 4, [[1]] * 4)
    module = GRPO(reward_funcs=[half_nan], num_generations=4, max_completion_length=4)
    with pytest.raises(ValueError, match="'half_nan' returned nan"):  # before anything is trained on it
        fit(module, PromptOnlyDataModule(DATA, batch_size=8), steps=1)


def test_completions_no_reward_function_scores_are_warned_about():
    def only_first(prompts, completions, **kwargs):
        return [1.0] + [None] * (len(completions) - 1)

    with pytest.warns(UserWarning, match=r"every reward function returned None for 3 of 4 completions \(rows \[1, 2, 3\]\)"):
        rewards = compute_rewards([only_first], ["p"] * 4, ["c"] * 4, [[1]] * 4)
    assert rewards[0, 0] == 1.0 and rewards[1:].isnan().all()  # counted as 0 downstream, as TRL does


def test_a_nan_margin_in_the_data_is_reported_before_training(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0}, {"prompt": "q", "chosen": "a", "rejected": "b", "margin": math.nan}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json writes NaN, as pandas exports do
    with pytest.raises(DataFormatError, match=r"pairs.jsonl \[train\]: row 1: 'margin' is nan; expected a finite number"):
        fit(RewardModel(), PreferenceDataModule(str(path), batch_size=2), steps=1)


def test_an_exploding_learning_rate_stops_at_the_first_non_finite_value():
    module = SFT(optimizer=lambda p: torch.optim.SGD(p, lr=1e38))
    with pytest.raises(FloatingPointError, match=r"SFT: (gradients are not finite|the training loss is (nan|inf)) at step \d"):
        fit(module, PromptCompletionDataModule(DATA, batch_size=4), steps=6)
    assert module.trainer.global_step < 6  # stopped at the step, not at the end


class NaNAtStep1(SFT):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.trainer.global_step == 1 else loss


class Snapshots(L.Callback):
    def __init__(self):
        self.before = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = [p.detach().clone() for p in module.parameters()]


def test_nonfinite_skip_drops_the_step_and_counts_it():
    module, snapshots = NaNAtStep1(nonfinite="skip"), Snapshots()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[snapshots],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="a non-finite loss or gradient at step 1; the step was skipped"):
        trainer.fit(module, PromptCompletionDataModule(DATA, batch_size=4))
    assert trainer.global_step == 4 and module.skipped_steps == 1
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    unchanged = [torch.equal(a, b) for a, b in zip(snapshots.before[1], snapshots.before[2])]
    assert all(unchanged)  # no update from the NaN batch (AdamW's moments and weight decay included)
    assert not all(torch.equal(a, b) for a, b in zip(snapshots.before[2], snapshots.before[3]))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    with pytest.raises(ValueError, match="nonfinite='ignore': expected 'error' or 'skip'"):
        SFT(nonfinite="ignore")
    with pytest.raises(FloatingPointError, match="the training loss is nan at step 1 .* or set nonfinite: skip"):
        fit(NaNAtStep1(), PromptCompletionDataModule(DATA, batch_size=4), steps=4)
