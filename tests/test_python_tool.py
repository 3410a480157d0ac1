"""The Python-execution tool (``lit_align.rollout.python_tool``), the GSM8K reward, and the agentic GRPO
recipe ``configs/recipes/grpo-qwen3-tools.yaml`` run end to end on CPU with a scripted policy."""

from __future__ import annotations

import ast
import json
import os
import pickle
import time
from pathlib import Path

import lightning as L
import pytest
import yaml
from transformers.utils import get_json_schema

from lit_align import GRPO, PromptOnlyDataModule, RolloutCallback
from lit_align.rewards import gsm8k_reward, load_reward_func
from lit_align.rewards.gsm8k import final_answer_text, gold_number, predicted_number
from lit_align.rollout.python_tool import NO_OUTPUT, PythonToolError, python, python_tool
from lit_align.rollout.tools import Toolbox, ToolCall, ToolCallError, load_tools
from tests.scripted_engine import ToolCaller

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/recipes/grpo-qwen3-tools.yaml"


def call(code: str) -> ToolCall:
    return ToolCall("python", {"code": code}, "")


def error_of(message: dict) -> str:
    return ast.literal_eval(message["content"])["error"]  # Toolbox's (TRL's) str({"error": ...})


# -- the tool ---------------------------------------------------------------------------------


def test_prints_what_the_code_prints_stdout_and_stderr_in_order():
    assert python("print(17 * 23)") == "391"
    assert python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nprint('out again')") == "out\nerr\nout again"
    assert python("import math\nprint(math.comb(10, 3))") == "120"
    assert python("x = 6 * 7") == NO_OUTPUT  # nothing printed: a hint rather than an empty message
    assert python("print('é ✓')") == "é ✓"


def test_an_exception_gives_an_error_with_its_traceback():
    with pytest.raises(PythonToolError) as err:
        python("print('before')\nvalues = {}\nvalues['missing']")
    message = str(err.value)
    assert message.startswith("The code failed (exit status 1):\nbefore\nTraceback (most recent call last):")
    assert 'File "<code>", line 3, in <module>' in message  # the code, not a temporary file's path
    assert message.endswith("KeyError: 'missing'")
    with pytest.raises(PythonToolError, match=r"exit status 3"):
        python("import sys; sys.exit(3)")
    with pytest.raises(PythonToolError, match="EOFError"):  # no stdin
        python("input()")
    with pytest.raises(PythonToolError, match="SyntaxError"):
        python("print(")


def test_a_runaway_program_is_cut_at_its_timeout_with_its_output_so_far():
    tool = python_tool(timeout=1)
    start = time.monotonic()
    with pytest.raises(PythonToolError) as err:
        tool("print('working', flush=True)\nwhile True: pass")
    assert time.monotonic() - start < 1 + 1.5
    assert str(err.value) == "Timed out after 1 s: the code was stopped. Its output until then:\nworking"
    start = time.monotonic()  # printing without end: memory stays bounded, the message short
    with pytest.raises(PythonToolError, match="Timed out after 1 s") as err:
        python_tool(timeout=1, max_output_chars=300)("while True: print('spam' * 100)")
    assert time.monotonic() - start < 1 + 1.5 and len(str(err.value)) < 400


def test_long_output_is_cut_keeping_its_start_and_end():
    tool = python_tool(max_output_chars=200)
    out = tool("print('a' * 10000)\nprint('END')")
    assert len(out) <= 200 and out.startswith("aaaa") and out.endswith("END")
    assert "[... output truncated: 10,004 characters in all ...]" in out
    with pytest.raises(PythonToolError) as err:  # a traceback after long output: its end is kept
        tool("print('b' * 10000)\n1 / 0")
    assert str(err.value).endswith("ZeroDivisionError: division by zero") and len(str(err.value)) < 260
    assert len(python("print('c' * 100000)")) == 2000  # the default limit


def test_the_code_runs_isolated_in_a_fresh_directory_and_its_children_die_with_it(monkeypatch):
    monkeypatch.setenv("LIT_ALIGN_TEST_SECRET", "hunter2")
    out = python("import os, sys\nprint(os.environ.get('LIT_ALIGN_TEST_SECRET'))\nprint(os.getcwd())\n"
                 "print(sys.flags.isolated)\nopen('note.txt', 'w').write('x')")
    secret, cwd, isolated = out.splitlines()
    assert secret == "None" and isolated == "1"
    assert Path(cwd).name.startswith("lit-align-python-") and not Path(cwd).exists()  # removed after the call
    assert python("import os\nprint(os.path.exists('note.txt'))") == "False"  # nothing kept between calls
    pid = int(python("import subprocess\nprint(subprocess.Popen(['sleep', '30']).pid)"))
    time.sleep(0.2)
    assert not running(pid)  # the process group was killed when the code ended


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not reaped by its new parent, does not)."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="resource limits are POSIX")
def test_the_memory_limit_stops_a_large_allocation():
    with pytest.raises(PythonToolError, match="MemoryError"):
        python_tool(memory_mb=256)("block = bytearray(1024 * 2**20)")
    assert python_tool(memory_mb=None)("print(len(bytearray(64 * 2**20)))") == str(64 * 2**20)


def test_schema_names_python_with_a_code_string_and_a_custom_tool_keeps_it():
    schema = get_json_schema(python)
    function = schema["function"]
    assert function["name"] == "python"
    assert function["parameters"]["properties"]["code"]["type"] == "string"
    assert function["parameters"]["required"] == ["code"]
    assert "Raises" not in function["description"] and "sandbox" not in function["description"]
    custom = python_tool(timeout=2, max_output_chars=500, memory_mb=512)
    assert custom.__name__ == "python" and get_json_schema(custom) == schema
    restored = pickle.loads(pickle.dumps(custom))  # spawned processes get tools by pickle
    assert (restored.timeout, restored.max_output_chars, restored.memory_mb) == (2.0, 500, 512)
    assert restored("print(1 + 1)") == "2"
    for bad in ({"timeout": 0}, {"max_output_chars": 10}, {"memory_mb": 0}):
        with pytest.raises(ValueError):
            python_tool(**bad)


def test_qwen3_chat_template_shows_the_tool_to_the_model():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (Path(pytest.importorskip("trl").__file__).parent / "chat_templates/qwen3.jinja").read_text()
    box = Toolbox(["lit_align.rollout.python_tool.python"])
    rendered = render_jinja_template([[{"role": "user", "content": "What is 17 * 23?"}]], tools=box.schemas,
                                     chat_template=template, add_generation_prompt=True)[0][0]
    assert '"name": "python"' in rendered and "<tool_call>" in rendered
    box.close()


def test_runs_in_the_toolbox_as_a_tool_with_successes_and_failures_counted():
    box = Toolbox(["lit_align.rollout.python_tool.python"], timeout=10)  # an import path, as in YAML
    assert list(box.tools) == ["python"] and load_tools([python_tool()])[0].__name__ == "python"
    rows = [[call("print(6 * 7)")], [call("1 / 0"), call("print('fine')")], [],
            [ToolCall("python", {"code": 42}, ""), ToolCallError('<tool_call>{"name": "python"', "invalid JSON", "python")]]
    messages, stats = box.run(rows)
    assert messages[0] == [{"role": "tool", "name": "python", "content": "42"}]
    assert "ZeroDivisionError: division by zero" in error_of(messages[1][0])
    assert messages[1][1] == {"role": "tool", "name": "python", "content": "fine"}
    assert messages[2] == []
    assert error_of(messages[3][0]) == "python() argument 'code' must be string, got 42"
    assert stats.calls_per_row == [1, 2, 0, 2] and stats.failures_per_row == [0, 1, 0, 2]
    quick = Toolbox([python_tool(timeout=0.5)], timeout=10)  # the tool's own timeout answers first
    messages, stats = quick.run([[call("import time\ntime.sleep(30)")]])
    assert error_of(messages[0][0]) == "Timed out after 0.5 s: the code was stopped." and stats.failures == 1
    box.close()
    quick.close()


# -- the GSM8K reward ---------------------------------------------------------------------------


def test_gsm8k_answers_are_read_from_the_final_turn():
    assert gold_number("Natalia sold <<48/2=24>>24 clips in May.\n#### 1,072") == 1072
    assert gold_number("72") == 72 and gold_number(18) == 18 and gold_number("n/a") is None
    assert predicted_number("So the answer is 18.") == 18
    assert predicted_number("10 - 2 = 8, times 3 is 24") == 24
    assert predicted_number("The total is $\\boxed{1{,}000}$ dollars for 2 weeks.") == 1000  # boxed first
    assert predicted_number("#### 7\nI used 3 steps.") == 7
    assert predicted_number("It costs $1,234.50") == predicted_number("1234.5") and predicted_number("none") is None
    conversation = [
        {"role": "assistant", "content": "Let me compute 2.", "tool_calls": [{"type": "function", "function": {"name": "python"}}]},
        {"role": "tool", "name": "python", "content": "42"},
        {"role": "assistant", "content": "<think>\nhm 41\n</think>\n\nThe answer is 42."},
    ]
    assert final_answer_text(conversation) == "\n\nThe answer is 42."
    assert final_answer_text(conversation[:2]) is None  # the last turn still calls a tool: no answer yet
    logged = {}
    rewards = gsm8k_reward(
        completions=[conversation, conversation[:2], [{"role": "assistant", "content": "It is 41"}], "#### 42", conversation],
        answer=["#### 42", "#### 2", "42", "42", "unknown"],
        log_extra=lambda name, values: logged.setdefault(name, values),
    )
    assert rewards == [1.0, 0.0, 0.0, 1.0, None]
    assert logged == {"gold_answer": ["42", "2", "42", "42", ""], "parsed_answer": ["42", "", "41", "42", "42"]}
    assert load_reward_func("gsm8k_reward") is gsm8k_reward  # a bare name in YAML
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        gsm8k_reward(completions=["1", "2"], answer=["1"])


# -- the recipe, end to end -----------------------------------------------------------------------


def test_the_recipe_runs_a_tool_rollout_with_its_tool_reward_and_data_settings(tmp_path):
    """The recipe's tool, reward, tool and data settings, with builtin:tiny and a scripted policy that
    calls ``python`` and then answers from its result, on local rows shaped like allenai/RLVR-GSM."""
    recipe = yaml.safe_load(RECIPE.read_text())
    model_args, data_args = recipe["model"]["init_args"], recipe["data"]["init_args"]
    assert model_args["tools"] == ["lit_align.rollout.python_tool.python"]
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is 6 times 7?"}], "ground_truth": "42",
             "dataset": "gsm8k"} for i in range(4)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch.rollout, {k: float(v) for k, v in trainer.callback_metrics.items()}))

    keep = ("tools", "max_tool_calling_iterations", "tool_call_timeout", "reward_funcs", "loss_type", "beta")
    module = GRPO(**{k: model_args[k] for k in keep}, num_generations=2, max_completion_length=200)
    data = PromptOnlyDataModule(**{**data_args, "dataset_name_or_path": str(path), "batch_size": 4})
    engine = ToolCaller('{"name": "python", "arguments": {"code": "print(6 * 7)"}}', "So the answer is 42.")
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
              callbacks=[RolloutCallback(engine=engine), Spy()]).fit(module, data)
    rollout, metrics = seen[0]
    assert "<tools>python;</tools>" in engine.contexts[0]  # the prompt carries the tool
    assert "<|im_start|>tool\n42<|im_end|>" in engine.contexts[-1]  # the code's output, back in the context
    assert rollout.completions[0][1] == {"role": "tool", "name": "python", "content": "42"}
    assert rollout.completions[0][-1] == {"role": "assistant", "content": "So the answer is 42."}
    assert metrics["train/tools/call_frequency"] == 1.0 and metrics["train/tools/failure_frequency"] == 0.0
    assert metrics["train/rewards/gsm8k_reward/mean"] == 1.0
