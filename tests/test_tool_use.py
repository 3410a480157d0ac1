"""Multi-turn rollouts with tools (GRPO/RLOO ``tools``, ``max_tool_calling_iterations``): the tool
turns are appended through the chat template, only the model's tokens count, the prompts carry the
tool schema, and TRL's tool metrics are logged. A scripted engine plays the policy: it calls
``add`` first and answers once a tool result is in its context."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_align import GRPO, RLOO, PromptOnlyDataModule, RolloutCallback
from tests.scripted_engine import TOOL_TEMPLATE as TEMPLATE
from tests.scripted_engine import ToolCaller, add, broken

DATA = "builtin:arithmetic?size=16&steps=1&max_operand=4&conversational=true"
def template_file(tmp_path) -> str:
    path = tmp_path / "tools.jinja"
    path.write_text(TEMPLATE)
    return str(path)


def run(tmp_path, cls=GRPO, engine=None, **kwargs):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch.rollout, {k: float(v) for k, v in trainer.callback_metrics.items()}))

    engine = engine or ToolCaller(answer="The sum is 5")
    module = cls(reward_funcs=["arithmetic_reward"], num_generations=2, max_completion_length=200, chat_template_path=template_file(tmp_path),
                 **kwargs)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
              callbacks=[RolloutCallback(engine=engine), Spy()]).fit(module, PromptOnlyDataModule(DATA, batch_size=4))
    return module, engine, seen[0]


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_a_tool_turn_is_in_the_completion_and_out_of_the_loss(tmp_path, cls):
    module, engine, (rollout, metrics) = run(tmp_path, cls, tools=[add])
    tok = module.tokenizer
    assert engine.contexts[0].startswith("<tools>add;</tools>")  # the prompt was rendered with the tool schema
    gens = rollout.generations
    text = tok.decode(gens.completion_ids[0][gens.completion_mask[0].bool()])
    assert text == ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'
                    "<|im_start|>tool\n5<|im_end|><|im_start|>assistant\nThe sum is 5<|im_end|>")
    tool_part = tok.decode(gens.completion_ids[0][(gens.tool_mask[0] == 0) & gens.completion_mask[0].bool()])
    assert tool_part == "<|im_start|>tool\n5<|im_end|><|im_start|>assistant\n"  # exactly the template's tool turn
    assert torch.equal(rollout.loss_mask, (gens.completion_mask * gens.tool_mask).float())
    assert (gens.sampling_logps[gens.tool_mask == 0] == 0).all()
    assert metrics["train/tools/call_frequency"] == 1.0 and metrics["train/tools/failure_frequency"] == 0.0
    own = int((gens.completion_mask * gens.tool_mask)[0].sum())
    assert metrics["train/completions/max_length"] == own  # lengths count the model's tokens only
    assert rollout.completions[0] == [  # reward functions and the completions table see the conversation
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "The sum is 5"},
    ]


def test_failing_and_unknown_tools_are_answered_and_counted(tmp_path):
    _, engine, (rollout, metrics) = run(tmp_path, engine=ToolCaller('{"name": "broken", "arguments": {"a": 1}}', "The sum is 5"), tools=[add, broken])
    assert "no luck" in engine.contexts[-1] and metrics["train/tools/failure_frequency"] == 1.0
    _, engine, (_, metrics) = run(tmp_path, engine=ToolCaller('{"name": "sub", "arguments": {}}', "The sum is 5"), tools=[add])
    assert "Tool sub not found." in engine.contexts[-1] and metrics["train/tools/failure_frequency"] == 1.0


def test_max_tool_calling_iterations_bounds_the_rounds(tmp_path):
    _, engine, (rollout, metrics) = run(tmp_path, tools=[add], max_tool_calling_iterations=0)
    assert rollout.generations.tool_mask.all() and len(engine.contexts) == 2  # one turn: two prompts, no tool round
    assert metrics["train/tools/call_frequency"] == 0.0
    with pytest.raises(ValueError, match="max_tool_calling_iterations must be >= 0"):
        GRPO(reward_funcs=["arithmetic_reward"], tools=[add], max_tool_calling_iterations=-1)
    with pytest.raises(ValueError, match="dynamic_sampling resamples groups"):
        GRPO(reward_funcs=["arithmetic_reward"], tools=[add], dynamic_sampling=True)


def test_a_template_without_a_known_tool_convention_is_reported(tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{%- for m in messages -%}{{ m.role }}: {{ m.content }}\n{%- endfor -%}")
    module = GRPO(reward_funcs=["arithmetic_reward"], tools=[add], chat_template_path=str(plain))
    with pytest.raises(ValueError, match="no tool-call convention lit-align knows"):
        module.tool_format()


class Counter:
    """An environment holding a running total; the policy adds to it."""

    def reset(self, prompt, answer=None, **row):
        self.total, self.target = 0, 5
        return " Reach 5."

    def add(self, a: int, b: int) -> int:
        """Add two integers to the total.

        Args:
            a: The first.
            b: The second.
        """
        self.total += a + b
        return self.total

    def get_reward(self) -> float:
        return float(self.total == self.target)


class Doubler(Counter):
    """Another environment: its ``add`` doubles, and it scores nothing."""

    def add(self, a: int, b: int) -> int:
        """Add twice.

        Args:
            a: The first.
            b: The second.
        """
        self.total += 2 * (a + b)
        return self.total

    get_reward = None


def seen_environments(prompts, completions, environments, **kwargs):
    return [float(type(e) is Counter) for e in environments]


def test_an_environment_per_completion_gives_tools_prompt_text_and_a_reward(tmp_path):
    module, engine, (rollout, metrics) = run(tmp_path, environment_factory=Counter)
    assert engine.contexts[0].startswith("<tools>add;</tools>") and engine.contexts[0].endswith(" Reach 5.<|im_end|><|im_start|>assistant\n")
    assert module.reward_names == ["arithmetic_reward", "Counter"] and rollout.reward_columns["Counter"].tolist() == [1.0] * 4
    assert metrics["train/rewards/Counter/mean"] == 1.0 and metrics["train/tools/call_frequency"] == 1.0
    assert len(module.environments.pools[None]) == 4  # one per completion, kept for the next batch


def test_a_dict_of_environments_is_chosen_per_row(tmp_path):
    import json

    rows = [{"prompt": [{"role": "user", "content": f"Compute {i}+1."}], "environment": "count" if i % 2 else "double"}
            for i in range(8)]
    path = tmp_path / "env.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch.rollout)

    module = GRPO(reward_funcs=[seen_environments], num_generations=2, max_completion_length=200,
                  chat_template_path=template_file(tmp_path), environment_factory={"count": Counter, "double": Doubler})
    engine = ToolCaller(answer="The sum is 5")
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, callbacks=[RolloutCallback(engine=engine), Spy()]).fit(
        module, PromptOnlyDataModule(str(path), batch_size=4, shuffle=False))
    environments = [r["environment"] for r in rows[:2] for _ in range(2)]
    tool_results = [c.split("<|im_start|>tool\n")[1].split("<|im_end|>")[0] for c in engine.contexts if "<|im_start|>tool" in c]
    assert tool_results == ["10" if e == "double" else "5" for e in environments]  # each row's own environment's add
    assert seen[0].reward_columns["seen_environments"].tolist() == [float(e == "count") for e in environments]
    assert module.reward_names == ["seen_environments", "Counter"]  # Doubler has no get_reward
    with pytest.raises(ValueError, match="which has no reset"):
        GRPO(reward_funcs=["arithmetic_reward"], environment_factory=dict)


def test_the_builtin_template_renders_tools_and_the_loop_runs_on_it(tmp_path):
    """builtin:tiny's own chat template speaks the Hermes convention: no template file needed."""
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch.rollout)

    module = GRPO(reward_funcs=["arithmetic_reward"], num_generations=2, max_completion_length=200, tools=[add])
    assert module.tool_format() == "hermes"
    engine = ToolCaller()
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, callbacks=[RolloutCallback(engine=engine), Spy()]).fit(
        module, PromptOnlyDataModule(DATA, batch_size=4))
    assert engine.contexts[0].startswith("<|im_start|>system\n<tools>add;</tools><|im_end|>\n<|im_start|>user\n")
    gens = seen[0].generations
    tool_part = module.tokenizer.decode(gens.completion_ids[0][(gens.tool_mask[0] == 0) & gens.completion_mask[0].bool()])
    assert tool_part == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert seen[0].completions[0][-1]["content"].startswith("Answer: ")


def test_the_arithmetic_task_has_a_calculator_and_tool_demonstrations():
    from lit_align import LanguageModelingDataModule
    from lit_align.data.arithmetic import arithmetic_rows, calculator
    from lit_align.models.builtin import builtin_tokenizer

    assert calculator("7+5-3") == 9
    with pytest.raises(ValueError, match="not a sum of integers"):
        calculator("__import__('os')")
    rows = arithmetic_rows("language_modeling", size=20, steps=1, max_operand=9, conversational=True, tools=True, noise=0.5)
    used = [r for r in rows if len(r["messages"]) == 4]
    assert 0 < len(used) < len(rows)  # the noise fraction works the sum out itself
    call = used[0]["messages"][1]["tool_calls"][0]["function"]
    assert call["name"] == "calculator" and str(calculator(call["arguments"]["expression"])) == used[0]["messages"][2]["content"]
    assert rows[0]["tools"][0]["function"]["name"] == "calculator"
    dm = LanguageModelingDataModule("builtin:arithmetic?size=20&steps=1&max_operand=9&conversational=true&tools=true&noise=0.5",
                                    batch_size=4, shuffle=False, group_by_length=False)
    from lit_align.data.base import DataRequirements

    dm.connect(builtin_tokenizer(), DataRequirements(assistant_masks=True))
    dm.setup()
    text = builtin_tokenizer().decode(dm.datasets["train"][0]["input_ids"][0])
    assert text.startswith("<|im_start|>system\n<tools>calculator;</tools>")
    prompts = arithmetic_rows("prompt_only", size=4, steps=1, max_operand=9, conversational=True, tools=True)
    assert set(prompts[0]) == {"prompt", "answer", "tools"}
    with pytest.raises(ValueError, match="tools=true gives conversational"):
        arithmetic_rows("preference", size=4, tools=True)
