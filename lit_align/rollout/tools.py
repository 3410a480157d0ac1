"""Tool calling for agentic rollouts: parse calls out of completions, describe tools, run calls safely.

As TRL 1.16's ``GRPOTrainer(tools=...)`` (``grpo_trainer.py``, ``_tool_call_loop``): a tool is a sync or
async function whose ``__name__``, type hints and Google docstring become its JSON schema (``get_json_schema``,
as ``apply_chat_template(tools=...)`` builds it); each call gives one ``{"role": "tool", "name", "content":
str(result)}`` message, in call order; a failing call gives ``content=str({"error": message})`` and counts as
a failure; metrics ``tools/call_frequency`` (calls per completion), ``tools/failure_frequency`` (per call).

Departures from TRL:
- Calls are parsed from decoded text (special tokens skipped) by small parsers in one registry
  (``TOOL_CALL_FORMATS``), not ``tokenizer.parse_response`` with a per-template response schema: any
  tokenizer works (byte-level ``builtin:tiny`` too). String arguments are cast by the tool's schema
  (``coerce_arguments``) as ``parse_response(tools=...)`` does.
- A malformed call (bad JSON, no name, an unterminated ``<tool_call>``) is answered with an error tool message
  and counted as a failed call, so the model learns what went wrong; TRL decodes the whole turn as plain text
  and runs none of its calls.
- Arguments are bound to the signature and checked against simple annotations before the call, so a wrong
  name or type gives a message naming the argument (TRL: Python's own ``TypeError`` from the call), and costs
  no thread.
- A row's tool messages are in call order; TRL puts its async tools' answers after its sync tools'.
- Llama 3's JSON convention allows one call per assistant message (its chat template raises "This model only
  supports single tool-calls at once!"): ``parse_llama3`` refuses a message with several
  (``ParsedResponse.refusal``); its calls are not run, one error tool message answers them, counted as a failure,
  and the assistant message keeps them as text, so the conversation still renders.
- Every call has a timeout (TRL has none). Python cannot stop a thread: a sync tool past its timeout is
  *abandoned*: it runs on in its daemon thread until it returns, its result dropped, never holding the
  process at exit (``Toolbox.abandoned`` counts them). A late async tool is cancelled (one that blocks
  without awaiting blocks the event loop, as anywhere).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import threading
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

from lit_align.imports import import_object
from lit_align.rollout.tool_calls import (  # noqa: F401  (parsing lives there; these names stay importable here)
    LLAMA3_SINGLE_CALL,
    TOOL_CALL_FORMATS,
    ParsedResponse,
    ToolCall,
    ToolCallError,
    ToolCallParser,
    coerce_arguments,
    decode_call,
    detect_tool_format,
    parse_hermes,
    parse_llama3,
    parse_tool_calls,
    register_tool_call_format,
)

CALL_FREQUENCY = "tools/call_frequency"  # tool calls per completion (TRL: gathered calls / gathered completions)
FAILURE_FREQUENCY = "tools/failure_frequency"  # failed calls per call, 0 when there were no calls


def load_tools(specs: Sequence[Callable | str] | None) -> list[Callable]:
    """Tools from callables or import paths (``pkg.mod:func`` or ``pkg.mod.func``), names checked unique."""
    tools = []
    for spec in specs or []:
        tool = import_object(spec, "tool", expected="'package.module:function'") if isinstance(spec, str) else spec
        if not callable(tool) or not isinstance(getattr(tool, "__name__", None), str):
            raise ValueError(f"tool {spec!r} is not a named function (a tool's __name__ is what the model calls)")
        tools.append(tool)
    names = [tool.__name__ for tool in tools]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"several tools are named {duplicates}; the model calls tools by name")
    return tools


def tool_schemas(tools: Sequence[Callable | dict]) -> list[dict]:
    """The JSON schemas the chat template receives (``get_json_schema``); a dict is taken as a schema already."""
    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
            continue
        try:
            schemas.append(get_json_schema(tool))
        except (DocstringParsingException, TypeHintParsingException) as err:
            name = f"{getattr(tool, '__module__', '?')}.{getattr(tool, '__qualname__', tool)}"
            raise ValueError(
                f"tool {name}: cannot describe it to the model ({err}). A tool needs a type hint on every "
                "argument and a Google-style docstring: a summary line, then 'Args:' with one "
                "'name: description' line per argument."
            ) from err
    return schemas


@dataclass
class ToolStats:
    """Calls made and calls failed, per row (completion) of one ``Toolbox.run``."""
    calls_per_row: list[int]
    failures_per_row: list[int]

    @property
    def calls(self) -> int:
        return sum(self.calls_per_row)

    @property
    def failures(self) -> int:
        return sum(self.failures_per_row)


def tool_metrics(calls: float, failures: float, num_completions: int) -> dict[str, float]:
    """TRL's tool metrics from counts summed over the rollout (and over ranks, before calling this)."""
    return {CALL_FREQUENCY: calls / max(num_completions, 1), FAILURE_FREQUENCY: failures / calls if calls else 0.0}


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
               type(None): "null"}


def _simple_types(hint: Any) -> set[type] | None:
    """The plain types an annotation allows, or ``None`` when it is not simple enough to check."""
    if isinstance(hint, type) and hint in _JSON_TYPES:
        return {hint}
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return {origin}
    if origin in (typing.Union, types.UnionType):
        parts = [_simple_types(arg) for arg in typing.get_args(hint)]
        return None if any(p is None for p in parts) else set().union(*parts)
    return None


def _matches(value: Any, kind: type) -> bool:
    if kind is int:  # JSON has no int/bool overlap: True is not an integer argument
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _content(result: Any) -> Any:
    # TRL passes a list of content blocks (e.g. {"type": "image", ...}) through for VLMs; anything else is str().
    if isinstance(result, list) and result and all(isinstance(p, dict) and "type" in p for p in result):
        return result
    return str(result)


def _type_hints(tool: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(tool)
    except Exception:  # unresolvable annotations: nothing to check arguments against
        return {}


def _is_async(tool: Callable) -> bool:
    return inspect.iscoroutinefunction(tool) or inspect.iscoroutinefunction(type(tool).__call__)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


class Toolbox:
    """Runs the tool calls of a batch of completions, all concurrently, each within ``timeout`` seconds.

    Args:
        tools: functions (sync or async) or import paths to them; each needs type hints and a docstring.
        timeout: seconds one call may take (``None``: no limit); a late call becomes a failure message.
    """

    def __init__(self, tools: Sequence[Callable | str], timeout: float | None = 10.0) -> None:
        self.timeout = timeout
        self.tools = {tool.__name__: tool for tool in load_tools(tools)}
        self.schemas = tool_schemas(list(self.tools.values()))
        self._hints = {name: _type_hints(tool) for name, tool in self.tools.items()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    def run(self, calls_per_row: Sequence[Sequence[ToolCall | ToolCallError]],
            tools_per_row: Sequence[Sequence[Callable]] | None = None) -> tuple[list[list[dict]], ToolStats]:
        """One tool message per call, rows and calls in order, with the per-row counts. Never raises for a
        bad call: an unknown tool, bad arguments, an exception, a timeout or a ``ToolCallError`` (pass those
        to answer malformed calls; TRL ignores them) each give an error message and count as a failure.
        ``tools_per_row`` adds tools a row alone may call (its environment's methods)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=_serve, args=(self._loop,), name="lit-align-tools", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(self.arun(calls_per_row, tools_per_row), self._loop).result()

    async def arun(self, calls_per_row: Sequence[Sequence[ToolCall | ToolCallError]],
                   tools_per_row: Sequence[Sequence[Callable]] | None = None) -> tuple[list[list[dict]], ToolStats]:
        """``run`` for callers already inside an event loop."""
        tables = [{**self.tools, **{t.__name__: t for t in extra}} for extra in tools_per_row] if tools_per_row else None
        outcomes = await asyncio.gather(*(self._call(call, tables[r] if tables else self.tools)
                                          for r, row in enumerate(calls_per_row) for call in row))
        messages, failures, flat = [], [], iter(outcomes)
        for row in calls_per_row:
            done = [next(flat) for _ in row]
            messages.append([message for message, _ in done])
            failures.append(sum(failed for _, failed in done))
        return messages, ToolStats([len(row) for row in calls_per_row], failures)

    async def _call(self, call: ToolCall | ToolCallError, tools: dict[str, Callable]) -> tuple[dict, bool]:
        if isinstance(call, ToolCallError):
            return self._failure(call.name or "unknown", call.answer())
        tool = tools.get(call.name)
        if tool is None:
            return self._failure(call.name, f"Tool {call.name} not found.")  # TRL's wording
        if problem := self._argument_problem(call, tool):
            return self._failure(call.name, problem)
        try:
            task = asyncio.ensure_future(tool(**call.arguments) if _is_async(tool) else self._in_thread(tool, call.arguments))
        except Exception as err:  # e.g. a function that only looked async
            return self._failure(call.name, str(err) or type(err).__name__)
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if not done:
            task.cancel()
            return self._failure(call.name, f"Tool {call.name} timed out after {self.timeout:g} s.")
        if task.cancelled():
            return self._failure(call.name, f"Tool {call.name} was cancelled.")
        if (err := task.exception()) is not None:
            return self._failure(call.name, str(err) or type(err).__name__)  # TRL: str(error)
        return {"role": "tool", "name": call.name, "content": _content(task.result())}, False

    @staticmethod
    def _failure(name: str, error: str) -> tuple[dict, bool]:
        return {"role": "tool", "name": name, "content": str({"error": error})}, True

    def _argument_problem(self, call: ToolCall, tool: Callable) -> str | None:
        try:
            inspect.signature(tool).bind(**call.arguments)
        except TypeError as err:
            return f"{call.name}() {err}"
        hints = self._hints[call.name] if self.tools.get(call.name) is tool else _type_hints(tool)
        for arg, value in call.arguments.items():
            allowed = _simple_types(hints.get(arg))
            if allowed is not None and not any(_matches(value, kind) for kind in allowed):
                expected = " or ".join(sorted(_JSON_TYPES[kind] for kind in allowed))
                return f"{call.name}() argument '{arg}' must be {expected}, got {json.dumps(value)}"
        return None

    def _in_thread(self, tool: Callable, arguments: dict) -> asyncio.Future:
        # A daemon thread per call, not a ThreadPoolExecutor: its workers are joined at exit, so one hung
        # tool would keep the process alive, and every hung tool would hold a worker for good.
        future: concurrent.futures.Future = concurrent.futures.Future()

        def target() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(tool(**arguments))
            except BaseException as err:  # asyncio refuses StopIteration, and SystemExit & co. must not escape
                keep = isinstance(err, Exception) and not isinstance(err, StopIteration)
                future.set_exception(err if keep else RuntimeError(f"{type(err).__name__}: {err}"))

        thread = threading.Thread(target=target, name=f"tool-{tool.__name__}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return asyncio.wrap_future(future)  # cancelled at the timeout: the thread's result is dropped

    @property
    def abandoned(self) -> int:
        """Sync tool calls still running on their threads (timed out, or in flight right now)."""
        return sum(thread.is_alive() for thread in self._threads)

    def close(self) -> None:
        """Stop the event loop ``run`` uses (running threads are left to finish on their own)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None

    def __getstate__(self) -> dict:  # picklable (spawned processes): the loop and threads stay behind
        return {**self.__dict__, "_loop": None, "_threads": []}
