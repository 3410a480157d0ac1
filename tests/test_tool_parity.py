"""Multi-turn tool rollouts: lit-align's ``ToolUse`` against TRL 1.16's ``GRPOTrainer`` tool loop.

One deterministic policy (a ``Script``: each completion's model turns, chosen from its context) drives
both sides, so every difference below is a difference of the tool loops themselves:

- lit-align: a real ``GRPO(tools=...)`` fitted for one step by Lightning, the script as its engine
  (``ToolUse.tool_turns``, ``tool_suffix_ids``, ``joined_turns``, ``Toolbox.run``, ``build_rollout``'s
  tool metrics, ``shared_step``'s loss);
- TRL: a real ``GRPOTrainer(tools=...)`` on the same weights (``builtin:tiny``, fp32), of which only
  ``_generate_single_turn`` (the ``model.generate`` / vLLM call) is replaced by the same script, cut at
  ``max_completion_length`` as ``generate``'s ``max_new_tokens`` would. Everything else is TRL's own
  code: ``_generate_and_score_completions`` -> ``_tokenize_prompts``, ``_generate`` (``parse_response``,
  the ``tools/call_frequency`` and ``tools/failure_frequency`` metrics), ``_tool_call_loop`` (tool calls,
  ``_get_tool_suffix_ids``, the overlong rollback, the post-tool truncation, ``tool_mask``), rewards,
  advantages, ``num_items_in_batch``; then ``_compute_loss`` (``completion_mask * tool_mask``) and its
  backward pass.

One narrow set-up step: TRL parses calls with ``tokenizer.parse_response``, which needs a response
template; ``add_response_schema`` only knows the templates of published models, so the tokenizer gets
the one TRL gives Qwen2.5/Qwen3 (``qwen3_template``), whose Hermes ``<tool_call>{json}</tool_call>``
convention is the one ``builtin:tiny``'s chat template renders.

Compared: prompt ids, completion ids, tool masks, truncation flags, the conversations the reward
functions see, the rewards and advantages, ``tools/call_frequency`` and ``tools/failure_frequency``,
the GRPO loss (1e-5, fp32) and its gradient; then edge cases one by one (a result that exactly fills
the budget, a cut turn with a whole call, string arguments), and the three departures that
``lit_align/rollout/tools.py`` documents, pinned both ways.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.chat_template_utils import qwen3_template  # noqa: E402

from lit_align import GRPO, PromptOnlyDataModule, RolloutCallback  # noqa: E402
from lit_align.models.builtin import builtin_model, builtin_tokenizer  # noqa: E402
from lit_align.rollout.engines import Generations, completion_mask, eos_ids, right_pad  # noqa: E402
from lit_align.rollout.tools import CALL_FREQUENCY, FAILURE_FREQUENCY  # noqa: E402
from tests.scripted_engine import add, broken  # noqa: E402

LIMIT = 200  # max_completion_length
G = 2  # num_generations


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


class Script:
    """A deterministic policy: ``turns[prompt][j]`` are the model turns of completion ``j`` of ``prompt``'s
    group (EOS is added after each). A first turn gets ``j``; a later one is the turn after those already in
    its context, whose first turn tells the row (first turns differ within a group)."""

    def __init__(self, turns: dict[str, list[list[str]]]) -> None:
        self.turns = turns

    def next_turn(self, context: str, j: int | None) -> str:
        prompt = next(p for p in self.turns if f"<|im_start|>user\n{p}<|im_end|>" in context)
        if j is not None:
            return self.turns[prompt][j][0]
        done = context.count("<|im_start|>assistant\n") - 1  # model turns already in the context
        return next(t for t in self.turns[prompt] if t[0] in context)[done]

    def ids(self, tok, context_ids: list[int], j: int | None, budget: int) -> list[int]:
        text = self.next_turn(tok.decode(context_ids), j)
        return (tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:budget]


# prompt -> one script per completion of its group: the model's turns in order (EOS is added after each).
SCRIPT = Script({
    "Add 2 and 3.": [
        [call("add", a=2, b=3), "The sum is 5."],  # calls a tool, then answers
        ["It is 5, no tool needed."],  # never calls one
    ],
    "Use a missing tool.": [
        [call("sub", a=5, b=3), "There is no sub."],  # an unknown tool
        [call("broken", a=1), call("add", a=1, b=2, c=3), "Both failed."],  # a tool that raises, then bad arguments
    ],
    "Add twice.": [
        [call("add", a=1, b=1), call("add", a=2, b=2), "Done: 4."],  # two rounds of calls
        [call("add", a=1, b=2) + call("add", a=3, b=4), "3 and 7."],  # two calls in one turn
    ],
    "Say a lot.": [
        [call("add", a=1, b=1), "x" * 3 * LIMIT],  # the answer after the tool is cut at the length budget
        ["Short."],
    ],
    "Fill up.": [
        ["z" * (LIMIT - 70) + call("add", a=1, b=1), "never said"],  # the call fits, its result does not
        ["y" * 3 * LIMIT],  # the first turn is cut at the length budget
    ],
})


class ScriptEngine:
    """lit-align's side: an engine playing the script."""

    samples_any_model = True

    def __init__(self, script: Script) -> None:
        self.script, self.tokenizer = script, None

    def connect(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def generate(self, model, prompt_ids, prompt_mask, sampling) -> Generations:
        tok, n, rows = self.tokenizer, sampling.num_generations, []
        for p, m in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            context = [t for t, k in zip(p, m) if k]
            rows += [self.script.ids(tok, context, j if n > 1 else None, sampling.max_completion_length) for j in range(n)]
        ids = right_pad(rows, tok.pad_token_id, device=prompt_ids.device)
        mask, truncated = completion_mask(ids, eos_ids(tok))
        return Generations(prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), ids, mask, truncated)

    def sync_weights(self, model) -> None:
        pass


def scripted_single_turn(trainer: GRPOTrainer, script: Script):
    """TRL's side: ``GRPOTrainer._generate_single_turn`` playing the script. The first turn gets one row
    per completion (prompts repeated ``num_generations`` times in a row), the tool loop's turns
    ``num_generations=1``; ``generate`` would stop at ``max_new_tokens=max_completion_length``."""

    def single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        tok, first = trainer.processing_class, num_generations > 1
        return [script.ids(tok, ids, i % num_generations if first else None, trainer.max_completion_length)
                for i, ids in enumerate(prompt_ids)], None

    return single_turn


def reward(completions, **kwargs) -> list[float]:
    """Reads the conversation (the last turn, the number of messages), so both sides must pass the same one."""
    return [float(len(c[-1]["content"]) % 7 + 0.5 * len(c)) for c in completions]


# ---- the two runs -------------------------------------------------------------------------------

def lit_align_run(tmp_path, script: Script = SCRIPT, tools=(add, broken)):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in script.turns))
    seen: dict = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["weights"] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

        def on_after_backward(self, trainer, pl_module):
            seen["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["rollout"], seen["loss"] = batch.rollout, float(outputs["loss"])
            seen["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    module = GRPO(reward_funcs=[reward], num_generations=G, max_completion_length=LIMIT, tools=list(tools), beta=0.0)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
              callbacks=[RolloutCallback(engine=ScriptEngine(script)), Spy()]).fit(
        module, PromptOnlyDataModule(str(path), batch_size=G * len(script.turns), shuffle=False))
    return seen


def trl_trainer(tmp_path, script: Script = SCRIPT, tools=(add, broken)) -> GRPOTrainer:
    tok = builtin_tokenizer()
    tok.response_template = qwen3_template  # what add_response_schema sets for Qwen's Hermes-style templates
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in script.turns]
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=G * len(rows), num_generations=G,
                      max_completion_length=LIMIT, beta=0.0, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no")
    trainer = GRPOTrainer(model=builtin_model(), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, tools=list(tools))
    trainer._generate_single_turn = scripted_single_turn(trainer, script)
    return trainer


def trl_run(tmp_path, script: Script = SCRIPT, tools=(add, broken)):
    trainer = trl_trainer(tmp_path, script, tools)
    seen: dict = {}
    original = trainer._calculate_rewards

    def spy_rewards(inputs, prompts, completions, completion_ids_list):
        seen["completions"] = completions
        return original(inputs, prompts, completions, completion_ids_list)

    trainer._calculate_rewards = spy_rewards
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop
    inputs = [{"prompt": [{"role": "user", "content": p}]} for p in script.turns for _ in range(G)]
    out = trainer._generate_and_score_completions(inputs)
    loss = trainer._compute_loss(trainer.model, out)
    loss.backward()
    seen.update(out=out, loss=float(loss), trainer=trainer,
                grads={n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
                weights={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                metrics={k: v[-1] for k, v in trainer._metrics["train"].items()})
    return seen


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ours = lit_align_run(tmp_path_factory.mktemp("lit"))
    theirs = trl_run(tmp_path_factory.mktemp("trl"))
    return ours, theirs


# ---- the parity ---------------------------------------------------------------------------------

def test_the_script_covers_every_kind_of_row(runs):
    """Not vacuous: the rollout has calls, failures, two rounds, a two-call turn and cut rows."""
    ours, _ = runs
    gens = ours["rollout"].generations
    tool_tokens = ((gens.tool_mask == 0) & gens.completion_mask.bool()).sum(1).tolist()
    assert [t > 0 for t in tool_tokens] == [True, False, True, True, True, True, True, False, False, False]
    assert gens.is_truncated.tolist() == [False] * 6 + [True, False, False, True]
    assert ours["metrics"]["train/" + CALL_FREQUENCY] == pytest.approx(10 / 10)
    assert ours["metrics"]["train/" + FAILURE_FREQUENCY] == pytest.approx(3 / 10)


def test_prompts_completions_and_tool_masks_match_trl(runs):
    ours, theirs = runs
    gens, out = ours["rollout"].generations, theirs["out"]
    assert unpadded(gens.prompt_ids, gens.prompt_mask) == unpadded(out["prompt_ids"], out["prompt_mask"])
    assert unpadded(gens.completion_ids, gens.completion_mask) == unpadded(out["completion_ids"], out["completion_mask"])
    assert unpadded(gens.tool_mask, gens.completion_mask) == unpadded(out["tool_mask"], out["completion_mask"])
    tok = builtin_tokenizer()
    trl_truncated = [tok.decode(ids[-1:]) != "<|im_end|>" for ids in unpadded(out["completion_ids"], out["completion_mask"])]
    assert gens.is_truncated.tolist() == trl_truncated


def test_reward_functions_see_the_same_conversations(runs):
    ours, theirs = runs
    assert ours["rollout"].completions == theirs["completions"]
    assert torch.allclose(ours["rollout"].advantages.reshape(-1), theirs["out"]["advantages"].reshape(-1), atol=1e-6)


def test_tool_metrics_match_trl(runs):
    ours, theirs = runs
    for name in (CALL_FREQUENCY, FAILURE_FREQUENCY):
        assert ours["metrics"]["train/" + name] == pytest.approx(theirs["metrics"][name], abs=1e-7), name
    assert ours["metrics"]["train/completions/mean_length"] == pytest.approx(theirs["metrics"]["completions/mean_length"])


def test_the_loss_and_its_gradient_match_trl(runs):
    ours, theirs = runs
    assert all(torch.equal(ours["weights"][n], w) for n, w in theirs["weights"].items())  # the same model
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5) and theirs["loss"] != 0.0
    assert ours["grads"].keys() == theirs["grads"].keys()
    for name, grad in theirs["grads"].items():
        torch.testing.assert_close(ours["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


# ---- where the loops still differ (one run of both sides; each prompt is one case) ---------------

RECORDED: list[str] = []


def record(note: str) -> str:
    """Write a note down (a tool with a side effect, like an environment's).

    Args:
        note: The note.
    """
    RECORDED.append(note)
    return "noted"


async def async_add(a: int, b: int) -> int:
    """Add two integers, asynchronously.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


SUFFIX = "\n<|im_start|>tool\n2<|im_end|>\n<|im_start|>assistant\n"  # builtin:tiny's tool turn for add(1, 1)
SUFFIX_TOKENS = len(builtin_tokenizer()(SUFFIX, add_special_tokens=False)["input_ids"])
FULL_CALL = call("add", a=1, b=1)
EDGE = Script({
    # the call's result exactly fills the budget: len(completion) + len(tool suffix) == max_completion_length
    "Exactly full.": [["z" * (LIMIT - SUFFIX_TOKENS - 1 - len(FULL_CALL)) + FULL_CALL, "never said"], ["fine"]],
    "Cut after a call.": [[call("record", note="hi") + "w" * 3 * LIMIT, "never said"], ["fine"]],  # a whole call, then cut
    "Strings.": [[call("add", a="2", b=3), "ok"], ["fine"]],  # a numeric argument written as a string
    "Missing.": [[call("add", a=1), "ok"], ["fine"]],  # a required argument left out
    "Malformed.": [["<tool_call>{bad}</tool_call>", "ok"], ["fine"]],  # a call that is not JSON
    "Async first.": [[call("async_add", a=1, b=2) + call("add", a=3, b=4), "ok"], ["fine"]],  # async tool, then sync
})
EDGE_TOOLS = (add, record, async_add)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    RECORDED.clear()
    ours = lit_align_run(tmp_path_factory.mktemp("lit_edge"), EDGE, EDGE_TOOLS)
    ours["recorded"] = list(RECORDED)
    RECORDED.clear()
    theirs = trl_run(tmp_path_factory.mktemp("trl_edge"), EDGE, EDGE_TOOLS)
    theirs["recorded"] = list(RECORDED)
    tok = builtin_tokenizer()
    gens, out = ours["rollout"].generations, theirs["out"]
    rows = {}
    for k, prompt in enumerate(EDGE.turns):
        rows[prompt] = tuple(
            {"text": [tok.decode(ids) for ids in unpadded(c_ids, c_mask)[2 * k: 2 * k + 2]],
             "tool_mask": unpadded(t_mask, c_mask)[2 * k: 2 * k + 2],
             "conversation": completions[2 * k: 2 * k + 2]}
            for c_ids, c_mask, t_mask, completions in (
                (gens.completion_ids, gens.completion_mask, gens.tool_mask, ours["rollout"].completions),
                (out["completion_ids"], out["completion_mask"], out["tool_mask"], theirs["completions"]))
        )
    return ours, theirs, rows


def test_edge_rows_without_a_difference_match(edge):
    """The control rows (``fine``, one per group) match, and each case reached the loop (not vacuous)."""
    ours, theirs, rows = edge
    for prompt, (mine, trl) in rows.items():
        assert mine["text"][1] == trl["text"][1] == "fine<|im_end|>", prompt
        assert mine["tool_mask"][1] == trl["tool_mask"][1]
    mine, trl = rows["Exactly full."]  # the boundary is hit: the row is exactly max_completion_length long
    lengths = [len(builtin_tokenizer()(side["text"][0], add_special_tokens=False)["input_ids"]) for side in (mine, trl)]
    assert lengths == [LIMIT, LIMIT] and trl["text"][0].endswith(SUFFIX)


def same_rows(rows, prompt):
    mine, trl = rows[prompt]
    assert mine["text"] == trl["text"]
    assert mine["tool_mask"] == trl["tool_mask"]
    assert mine["conversation"] == trl["conversation"]


def test_a_tool_result_that_exactly_fills_the_budget(edge):
    """Kept, and the completion ends on the tool turn, truncated (TRL drops a result only when it overflows)."""
    same_rows(edge[2], "Exactly full.")


def test_a_cut_turn_with_a_whole_call_runs_it_as_trl(edge):
    """A turn cut at the budget that holds a whole call: the call runs (side effects and counts) and its result
    is then dropped as overlong, as TRL parses every turn before checking the budget."""
    ours, theirs, rows = edge
    same_rows(rows, "Cut after a call.")
    assert ours["recorded"] == theirs["recorded"] == ["hi"]


def test_string_arguments_are_cast_by_the_schema_as_trl(edge):
    """``add(a="2", b=3)`` returns 5: string arguments are cast by the tool's schema (``parse_response``'s rule)."""
    same_rows(edge[2], "Strings.")


# ---- documented departures (lit-align/rollout/tools.py's docstring): pinned, so a change is seen --

def tool_turns(conversation: list[dict]) -> list[str]:
    return [m["content"] for m in conversation if m["role"] == "tool"]


def test_departure_a_missing_argument_is_named_before_the_call(edge):
    """lit-align binds the signature before calling, TRL lets Python raise: the same failure, other words."""
    mine, trl = edge[2]["Missing."]
    assert tool_turns(mine["conversation"][0]) == [str({"error": "add() missing a required argument: 'b'"})]
    assert tool_turns(trl["conversation"][0]) == [str({"error": "add() missing 1 required positional argument: 'b'"})]


def test_departure_a_malformed_call_is_answered_with_its_error(edge):
    """lit-align answers a malformed call with its error, and the model goes on; TRL's ``parse_response``
    gives up on the turn, which ends the rollout as plain text."""
    mine, trl = edge[2]["Malformed."]
    (answer,) = tool_turns(mine["conversation"][0])
    assert answer.startswith("{'error': 'Malformed tool call: invalid JSON") and mine["conversation"][0][-1]["content"] == "ok"
    assert tool_turns(trl["conversation"][0]) == [] and trl["text"][0] == "<tool_call>{bad}</tool_call><|im_end|>"


def test_departure_answers_follow_the_call_order(edge):
    """lit-align answers a sync and an async call in call order; TRL puts the sync tools' answers first."""
    mine, trl = edge[2]["Async first."]
    assert tool_turns(mine["conversation"][0]) == ["3", "7"]
    assert tool_turns(trl["conversation"][0]) == ["7", "3"]

