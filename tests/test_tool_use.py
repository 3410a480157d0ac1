"""Multi-turn rollouts with tools (GRPO/RLOO ``tools``, ``max_tool_calling_iterations``): the tool
turns are appended through the chat template, only the model's tokens count, the prompts carry the
tool schema, and TRL's tool metrics are logged. A scripted engine plays the policy: it calls
``add`` first and answers once a tool result is in its context."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_align import GRPO, RLOO, PromptOnlyDataModule, RolloutCallback
from lit_align.rollout.engines import Generations, completion_mask, eos_ids, right_pad

DATA = "builtin:arithmetic?size=16&steps=1&max_operand=4&conversational=true"
TEMPLATE = (
    "{%- if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def broken(a: int) -> int:
    """Always fails.

    Args:
        a: Anything.
    """
    raise RuntimeError("no luck")


class ToolCaller:
    """Calls ``call`` while the context holds no tool result, then answers."""

    samples_any_model = True

    def __init__(self, call: str = '{"name": "add", "arguments": {"a": 2, "b": 3}}') -> None:
        self.tokenizer, self.call, self.contexts = None, call, []

    def connect(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def generate(self, model, prompt_ids, prompt_mask, sampling) -> Generations:
        tok, rows = self.tokenizer, []
        for p, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            context = tok.decode([t for t, k in zip(p, m) if k])
            self.contexts.append(context)
            text = "The sum is 5" if "<|im_start|>tool" in context else f"<tool_call>{self.call}</tool_call>"
            for _ in range(sampling.num_generations):
                rows.append((tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: sampling.max_completion_length])
        ids = right_pad(rows, tok.pad_token_id, device=prompt_ids.device)
        mask, truncated = completion_mask(ids, eos_ids(tok))
        n = sampling.num_generations
        return Generations(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids, mask, truncated,
                           torch.full(ids.shape, -0.5) * mask)

    def sync_weights(self, model) -> None:
        pass


def template_file(tmp_path) -> str:
    path = tmp_path / "tools.jinja"
    path.write_text(TEMPLATE)
    return str(path)


def run(tmp_path, cls=GRPO, engine=None, **kwargs):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch.rollout, {k: float(v) for k, v in trainer.callback_metrics.items()}))

    engine = engine or ToolCaller()
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
    assert rollout.completions[0][0]["content"].endswith("The sum is 5")  # reward functions see the final answer


def test_failing_and_unknown_tools_are_answered_and_counted(tmp_path):
    _, engine, (rollout, metrics) = run(tmp_path, engine=ToolCaller('{"name": "broken", "arguments": {"a": 1}}'), tools=[add, broken])
    assert "no luck" in engine.contexts[-1] and metrics["train/tools/failure_frequency"] == 1.0
    _, engine, (_, metrics) = run(tmp_path, engine=ToolCaller('{"name": "sub", "arguments": {}}'), tools=[add])
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
    module = GRPO(reward_funcs=["arithmetic_reward"], tools=[add])  # builtin:tiny's template renders no tools
    with pytest.raises(ValueError, match="no tool-call convention lit-align knows"):
        module.tool_format()
