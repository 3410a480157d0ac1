"""The tool layer of agentic RL: parsing tool calls per format, tool schemas, loading tools by import path,
and running calls (errors, async tools, timeouts) with TRL 1.16's messages and metrics."""

from __future__ import annotations

import ast
import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from transformers.utils import get_json_schema

from lit_align.rollout import tool_calls as tools_module  # the format registry lives there
from lit_align.rollout.tools import (
    CALL_FREQUENCY,
    FAILURE_FREQUENCY,
    TOOL_CALL_FORMATS,
    ParsedResponse,
    Toolbox,
    ToolCall,
    ToolCallError,
    decode_call,
    detect_tool_format,
    load_tools,
    parse_tool_calls,
    register_tool_call_format,
    tool_metrics,
    tool_schemas,
)

TRL_TEMPLATES = Path(pytest.importorskip("trl").__file__).parent / "chat_templates"


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def scale(x: float, factor: float | None = None, tags: list[str] | None = None, flag: bool = False) -> str:
    """Scale a number.

    Args:
        x: The number.
        factor: The factor, 2 when not given.
        tags: Labels echoed back.
        flag: Whether to negate.
    """
    y = x * (2 if factor is None else factor)
    return f"{-y if flag else y} {tags or []}"


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: The numerator.
        b: The denominator.
    """
    return a / b


async def slow_echo(text: str) -> str:
    """Echo the text after a short wait.

    Args:
        text: What to echo.
    """
    await asyncio.sleep(0.3)
    return text.upper()


def hermes(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def error_of(message: dict) -> str:
    """The error a failure message states (its content is str({"error": ...}), as in TRL)."""
    assert message["role"] == "tool" and message["content"].startswith("{'error': ")
    return ast.literal_eval(message["content"])["error"]


# ---- parsing


def test_hermes_single_call_keeps_the_text():
    text = "Let me add them.\n" + hermes("add", {"a": 3, "b": 4})
    parsed = parse_tool_calls(text, "hermes")
    assert parsed.content == "Let me add them."
    assert parsed.calls == [ToolCall("add", {"a": 3, "b": 4}, hermes("add", {"a": 3, "b": 4}))]
    assert parsed.errors == []
    assert parsed.message() == {"role": "assistant", "content": "Let me add them.", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]}


def test_hermes_several_calls_in_order_and_text_between_kept():
    text = f"First.\n{hermes('add', {'a': 1, 'b': 2})}\nthen\n{hermes('divide', {'a': 1, 'b': 4})} done"
    parsed = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("add", {"a": 1, "b": 2}), ("divide", {"a": 1, "b": 4})]
    assert parsed.content == "First.\n\nthen\n done"
    assert parse_tool_calls("no call here") == ParsedResponse("no call here")
    assert "tool_calls" not in parse_tool_calls("plain").message()


def test_llama3_calls_bare_after_python_tag_and_semicolon_separated():
    one = parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}', "llama3")
    assert [(c.name, c.arguments) for c in one.calls] == [("add", {"a": 1, "b": 2})] and one.content == ""
    tagged = parse_tool_calls('Sure. <|python_tag|>{"name": "add", "parameters": {"a": 5, "b": 6}}', "llama3")
    assert tagged.content == "Sure." and tagged.calls[0].arguments == {"a": 5, "b": 6}
    assert tagged.calls[0].raw == '<|python_tag|>{"name": "add", "parameters": {"a": 5, "b": 6}}'
    several = parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                               '{"name": "divide", "parameters": {"a": 9, "b": 3}}', "llama3")
    assert [c.name for c in several.calls] == ["add", "divide"] and several.content == ""
    assert several.calls[1].raw == '{"name": "divide", "parameters": {"a": 9, "b": 3}}'
    prose = 'The record is {"name": "Bob", "age": 3}.'  # JSON without parameters is not a call
    assert parse_tool_calls(prose, "llama3") == ParsedResponse(prose)


def test_malformed_calls_are_reported_and_removed_from_the_text():
    text = ('a <tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call> b '
            '<tool_call>{"arguments": {}}</tool_call> c '
            '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call> d '
            '<tool_call>{"name": "add", "arguments": {"a"')
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and parsed.content == "a  b  c  d"
    reasons = [e.error for e in parsed.errors]
    assert reasons[0].startswith("invalid JSON") and parsed.errors[0].name == "add"
    assert reasons[1:] == ['missing "name"', "arguments must be a JSON object, got list", "unterminated <tool_call>"]
    assert parsed.errors[3].raw == '<tool_call>{"name": "add", "arguments": {"a"'
    bad = parse_tool_calls('{"name": "add", "parameters": {"a": 1', "llama3")
    assert bad.calls == [] and bad.errors[0].error.startswith("invalid JSON") and bad.errors[0].name == "add"
    no_args = parse_tool_calls("<tool_call>{\"name\": \"now\"}</tool_call>").calls[0]
    assert no_args.arguments == {}  # no-argument calls normalise to {}, as in TRL
    with pytest.raises(ValueError, match="unknown tool-call format 'nope'.*register_tool_call_format"):
        parse_tool_calls("x", "nope")


QWEN_STYLE = ('{%- if tools %}{{- "<|im_start|>system\\n# Tools\\n<tools>" }}{%- for tool in tools %}'
              '{{- tool | tojson }}{%- endfor %}{{- "</tools>\\nReturn <tool_call>\\n{\\"name\\": <function-name>, '
              '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}{%- endif %}'
              "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}")
LLAMA_STYLE = ("{%- for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' }}"
               "{%- if m.tool_calls %}{{ '{\"name\": \"' + m.tool_calls[0].function.name + '\", \"parameters\": ' "
               "+ m.tool_calls[0].function.arguments | tojson + '}' }}{%- else %}{{ m.content }}{%- endif %}"
               "{{ '<|eot_id|>' }}{%- endfor %}")


def test_format_detection_from_template_strings_tokenizers_and_trl_templates():
    assert detect_tool_format(QWEN_STYLE) == "hermes"
    assert detect_tool_format(LLAMA_STYLE) == "llama3"
    assert detect_tool_format("<|python_tag|>{{ messages }}") == "llama3"
    assert detect_tool_format("{{ messages[0].content }}") is None
    assert detect_tool_format(type("Tok", (), {"chat_template": QWEN_STYLE})()) == "hermes"
    assert detect_tool_format(type("Tok", (), {"chat_template": None})()) is None
    assert detect_tool_format({"default": "{{ x }}", "tool_use": LLAMA_STYLE}) == "llama3"
    # the real templates TRL ships; Qwen3.5 puts XML, not JSON, inside <tool_call>: no built-in format
    read = lambda name: (TRL_TEMPLATES / f"{name}.jinja").read_text()  # noqa: E731
    assert [detect_tool_format(read(n)) for n in ("qwen2_5", "qwen3", "llama3_1", "llama3_2", "qwen3_5_think")] == [
        "hermes", "hermes", "llama3", "llama3", None]


def test_user_registered_format_parses_and_is_detected(monkeypatch):
    monkeypatch.setattr(tools_module, "TOOL_CALL_FORMATS", dict(TOOL_CALL_FORMATS))
    monkeypatch.setattr(tools_module, "_DETECTORS", list(tools_module._DETECTORS))

    def parse_fn_tags(text: str) -> ParsedResponse:  # <fn>{"name": ..., "arguments": ...}</fn>
        pieces = text.split("<fn>")
        results = [decode_call("<fn>" + p.split("</fn>")[0] + "</fn>", p.split("</fn>")[0]) for p in pieces[1:]]
        content = pieces[0] + "".join(p.split("</fn>", 1)[1] for p in pieces[1:])
        return ParsedResponse(content.strip(), [r for r in results if isinstance(r, ToolCall)],
                              [r for r in results if isinstance(r, ToolCallError)])

    register_tool_call_format("fn_tags", parse_fn_tags, detect=lambda t: "<fn>" in t)
    parsed = parse_tool_calls('ok <fn>{"name": "add", "arguments": {"a": 1, "b": 1}}</fn>', "fn_tags")
    assert parsed.content == "ok" and parsed.calls[0].arguments == {"a": 1, "b": 1}
    assert detect_tool_format("emit <fn> ... </fn>; also <tool_call>") == "fn_tags"  # user formats come first
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        register_tool_call_format("hermes", parse_fn_tags)


# ---- tools: schemas and loading


def test_schema_equals_get_json_schema_and_dicts_pass_through():
    given = {"type": "function", "function": {"name": "given", "parameters": {"type": "object", "properties": {}}}}
    assert tool_schemas([add, scale, slow_echo, given]) == [
        get_json_schema(add), get_json_schema(scale), get_json_schema(slow_echo), given]
    assert Toolbox([add]).schemas == [get_json_schema(add)]


def test_undocumented_or_unhinted_tool_is_refused_with_a_clear_message():
    def no_doc(a: int) -> int:
        return a

    def no_hint(a):
        """Do it.

        Args:
            a: The thing.
        """

    with pytest.raises(ValueError, match=r"tool .*no_doc: cannot describe it to the model \(.*no docstring.*Args:"):
        tool_schemas([no_doc])
    with pytest.raises(ValueError, match=r"no_hint: .*missing a type hint.*type hint on every argument"):
        Toolbox([no_hint])


def test_load_tools_from_import_paths(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(
        'def mul(a: int, b: int) -> int:\n    """Multiply.\n\n    Args:\n        a: A.\n        b: B.\n    """\n'
        "    return a * b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_tools(["my_tools:mul", add])
    assert [t.__name__ for t in loaded] == ["mul", "add"]
    assert load_tools(["my_tools.mul"])[0](a=3, b=4) == 12
    assert load_tools(None) == []
    with pytest.raises(ValueError, match="tool 'my_tools:nope': cannot import 'nope'"):
        load_tools(["my_tools:nope"])
    with pytest.raises(ValueError, match=r"several tools are named \['mul'\]"):
        load_tools(["my_tools:mul", "my_tools.mul"])
    with pytest.raises(ValueError, match="not a named function"):
        load_tools([42])


# ---- running calls


def test_results_errors_and_stats_per_row_with_trl_messages():
    box = Toolbox([add, divide, scale], timeout=5.0)
    rows = [
        [ToolCall("add", {"a": 3, "b": 4}, ""), ToolCall("divide", {"a": 1.0, "b": 0.0}, "")],  # ok, exception
        [],
        [ToolCall("search", {"q": "x"}, ""), ToolCall("add", {"a": 1, "b": 2, "c": 3}, ""),  # unknown, bad name
         ToolCall("add", {"a": 1}, ""), ToolCall("add", {"a": "3", "b": 4}, ""),  # missing, bad type
         ToolCall("add", {"a": True, "b": 4}, ""), ToolCallError("<tool_call>{", "invalid JSON", "add")],
        [ToolCall("scale", {"x": 2, "tags": ["t"]}, ""), ToolCall("scale", {"x": 1.5, "factor": None, "flag": 1}, "")],
    ]
    messages, stats = box.run(rows)
    assert messages[0][0] == {"role": "tool", "name": "add", "content": "7"}
    assert error_of(messages[0][1]) == "float division by zero"  # TRL: {"error": str(exception)}
    assert messages[1] == []
    assert [m["name"] for m in messages[2]] == ["search", "add", "add", "add", "add", "add"]
    errors = [error_of(m) for m in messages[2]]
    assert errors[0] == "Tool search not found."  # TRL's wording for an unknown tool
    assert errors[1] == "add() got an unexpected keyword argument 'c'"
    assert errors[2] == "add() missing a required argument: 'b'"
    assert errors[3] == "add() argument 'a' must be integer, got \"3\""
    assert errors[4] == "add() argument 'a' must be integer, got true"
    assert errors[5] == "Malformed tool call: invalid JSON"
    assert messages[3][0]["content"] == "4 ['t']"
    assert error_of(messages[3][1]) == "scale() argument 'flag' must be boolean, got 1"
    assert stats.calls_per_row == [2, 0, 6, 2] and stats.failures_per_row == [1, 0, 6, 1]
    assert (stats.calls, stats.failures) == (10, 8)
    assert tool_metrics(stats.calls, stats.failures, num_completions=4) == {CALL_FREQUENCY: 2.5, FAILURE_FREQUENCY: 0.8}
    assert tool_metrics(0, 0, 4) == {"tools/call_frequency": 0.0, "tools/failure_frequency": 0.0}
    box.close()


def test_async_tools_are_awaited_concurrently_with_sync_ones():
    box = Toolbox([slow_echo, add], timeout=5.0)
    rows = [[ToolCall("slow_echo", {"text": f"r{i}"}, ""), ToolCall("add", {"a": i, "b": 1}, "")] for i in range(4)]
    start = time.perf_counter()
    messages, stats = box.run(rows)
    elapsed = time.perf_counter() - start
    assert [[m["content"] for m in row] for row in messages] == [[f"R{i}", str(i + 1)] for i in range(4)]
    assert stats.failures == 0
    assert elapsed < 1.0, elapsed  # four 0.3 s sleeps one after another would take 1.2 s
    assert asyncio.run(box.arun([[ToolCall("add", {"a": 1, "b": 1}, "")]]))[0] == [[
        {"role": "tool", "name": "add", "content": "2"}]]
    box.close()


def test_a_hanging_sync_tool_is_cut_at_its_timeout_and_abandoned():
    release = threading.Event()

    def hang(seconds: float) -> str:
        """Hang until released.

        Args:
            seconds: Longest wait.
        """
        release.wait(seconds)
        return "late"

    async def stall() -> str:
        """Stall (async)."""
        await asyncio.sleep(30)
        return "late"

    box = Toolbox([hang, stall, add], timeout=0.2)
    start = time.perf_counter()
    messages, stats = box.run([[ToolCall("hang", {"seconds": 30}, ""), ToolCall("add", {"a": 1, "b": 2}, "")],
                               [ToolCall("stall", {}, "")]])
    elapsed = time.perf_counter() - start
    try:
        assert 0.2 <= elapsed < 1.5, elapsed
        assert error_of(messages[0][0]) == "Tool hang timed out after 0.2 s."
        assert messages[0][1]["content"] == "3"  # the other calls still answer
        assert error_of(messages[1][0]) == "Tool stall timed out after 0.2 s."
        assert stats.failures_per_row == [1, 1]
        assert box.abandoned == 1  # the thread runs on until it returns; its result is dropped
    finally:
        release.set()
    deadline = time.perf_counter() + 5
    while box.abandoned and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert box.abandoned == 0
    assert box.run([[ToolCall("add", {"a": 2, "b": 2}, "")]])[0] == [[{"role": "tool", "name": "add", "content": "4"}]]
    box.close()


def test_parsed_calls_run_and_render_with_a_real_chat_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    parsed = parse_tool_calls("Adding.\n" + hermes("add", {"a": 20, "b": 22}))
    box = Toolbox([add])
    messages, _ = box.run([parsed.calls])
    conversation = [{"role": "user", "content": "20+22?"}, parsed.message(), *messages[0]]
    rendered = render_jinja_template([conversation], tools=box.schemas,
                                     chat_template=(TRL_TEMPLATES / "qwen2_5.jinja").read_text())[0][0]
    assert '"name": "add"' in rendered and "<tool_response>\n42\n</tool_response>" in rendered
    box.close()
