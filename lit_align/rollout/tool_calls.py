"""Tool calls in a completion: the typed calls, the parsers of each chat-template convention (one
registry, ``TOOL_CALL_FORMATS``, that users extend with ``register_tool_call_format``), detection from
a chat template, and the casting of string arguments by a tool's schema. Running the calls is
:mod:`lit_align.rollout.tools`, whose docstring lists the departures from TRL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class ToolCall:
    """One well-formed call: the tool's name, its arguments, and the exact text it was parsed from."""
    name: str
    arguments: dict[str, Any]
    raw: str

    def as_dict(self) -> dict[str, Any]:
        """The call as chat templates read it from an assistant message's ``tool_calls``."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallError:
    """A call the model tried to make but that did not parse; ``name`` is set when it could be read.
    ``malformed=False``: calls that parsed but that the convention refuses (``ParsedResponse.refusal``)."""
    raw: str
    error: str
    name: str | None = None
    malformed: bool = True

    def answer(self) -> str:
        """The error a tool message gives for it."""
        return f"Malformed tool call: {self.error}" if self.malformed else self.error


@dataclass
class ParsedResponse:
    """A completion split into its assistant text (calls removed), its calls and its malformed calls;
    ``refusal``: why its calls are refused as a whole (a convention's limit), else None; ``attempts``: the
    calls and malformed calls in the order the text has them."""
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    refusal: str | None = None
    attempts: list[ToolCall | ToolCallError] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation (``tool_calls`` only when there are calls;
        refused calls were not made: they stay in the text)."""
        if self.refusal is not None:
            return {"role": "assistant", "content": f"{self.content} {self.refused_text}".strip()}
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.calls:
            message["tool_calls"] = [call.as_dict() for call in self.calls]
        return message

    def requests(self) -> list[ToolCall | ToolCallError]:
        """What a rollout answers, one tool message each, in text order: the calls and the malformed calls
        (answered with their error), or one error for refused calls."""
        if self.refusal is not None:
            return [ToolCallError(self.refused_text, self.refusal, malformed=False)]
        return list(self.attempts) or [*self.calls, *self.errors]

    def coerced(self, schemas: Sequence[dict]) -> ParsedResponse:
        """The same response with its calls' string arguments cast by ``schemas`` (``coerce_arguments``)."""
        return replace(self, calls=coerce_arguments(self.calls, schemas), attempts=coerce_arguments(self.attempts, schemas))

    @property
    def refused_text(self) -> str:
        """The text of the calls a refusal covers (well-formed and malformed), ``;``-separated."""
        return "; ".join(c.raw for c in (*self.calls, *self.errors))


ToolCallParser = Callable[[str], ParsedResponse]


def decode_call(raw: str, payload: str) -> ToolCall | ToolCallError:
    """A call from a JSON ``{"name": ..., "arguments"|"parameters": {...}}``; ``raw`` is the text it came from.
    Missing arguments mean ``{}`` (no-argument calls, as TRL normalises them). Parsers of new formats reuse it."""
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as err:
        name = re.search(r'"name"\s*:\s*"([^"]+)"', payload)
        return ToolCallError(raw, f"invalid JSON ({err})", name.group(1) if name else None)
    if not isinstance(obj, dict):
        return ToolCallError(raw, f"expected a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(raw, 'missing "name"')
    arguments = obj.get("arguments", obj.get("parameters")) or {}
    if not isinstance(arguments, dict):
        return ToolCallError(raw, f"arguments must be a JSON object, got {type(arguments).__name__}", name)
    return ToolCall(name, arguments, raw)


def _parsed(text: str, spans: list[tuple[int, int]], results: list[ToolCall | ToolCallError]) -> ParsedResponse:
    starts, ends = [0] + [end for _, end in spans], [begin for begin, _ in spans] + [len(text)]
    content = "".join(text[a:b] for a, b in zip(starts, ends)).strip()
    calls = [r for r in results if isinstance(r, ToolCall)]
    errors = [r for r in results if isinstance(r, ToolCallError)]
    return ParsedResponse(content, calls, errors, attempts=list(results))


# A block ends at its </tool_call>; one cut off (length limit) ends where the next one starts, or at the end.
_HERMES = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)(?:</tool_call>|(?=<tool_call>)|$)", re.DOTALL)


def parse_hermes(text: str) -> ParsedResponse:
    """Hermes / Qwen2.5 / Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number."""
    spans, results = [], []
    for match in _HERMES.finditer(text):
        spans.append(match.span())
        if match.group(0).endswith("</tool_call>"):
            results.append(decode_call(match.group(0), match.group(1).strip()))
        else:  # cut off by the length limit
            results.append(ToolCallError(match.group(0), "unterminated <tool_call>"))
    return _parsed(text, spans, results)


_LLAMA3_START = re.compile(r'(?:<\|python_tag\|>\s*)?(?=\{\s*"(?:name|parameters)"\s*:)')
_LLAMA3_TAIL = re.compile(r"\s*;?\s*")


LLAMA3_SINGLE_CALL = "This model only supports single tool-calls at once!"  # the Llama 3.1 / 3.2 templates' error


def parse_llama3(text: str) -> ParsedResponse:
    """Llama 3.1 / 3.2 JSON calls: ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``,
    several separated by ``;``. A JSON object without ``parameters``/``arguments`` is prose, left in the text.
    The convention allows one call per message: a message with several (malformed ones included) is refused
    (``refusal``), none of them run."""
    spans, results, pos, decoder = [], [], 0, json.JSONDecoder()
    while match := _LLAMA3_START.search(text, pos):
        brace = match.end()
        try:
            obj, end = decoder.raw_decode(text, brace)
        except json.JSONDecodeError:
            following = _LLAMA3_START.search(text, brace + 1)
            end = following.start() if following else len(text)
            obj = None
        if obj is not None and not (isinstance(obj, dict) and ({"parameters", "arguments"} & obj.keys())):
            pos = end
            continue
        results.append(decode_call(text[match.start() : end].strip(), text[brace:end]))
        pos = _LLAMA3_TAIL.match(text, end).end()  # the ';' and spaces between calls go with the call
        spans.append((match.start(), pos))
    parsed = _parsed(text, spans, results)
    if len(results) > 1:
        names = ", ".join(r.name or "?" for r in results)
        parsed.refusal = f"{LLAMA3_SINGLE_CALL} The message made {len(results)} calls ({names}); none was run: call one tool per message."
    return parsed


TOOL_CALL_FORMATS: dict[str, ToolCallParser] = {"hermes": parse_hermes, "llama3": parse_llama3}
# (format, does this chat template's text use it?), most specific first; user formats are put in front.
_DETECTORS: list[tuple[str, Callable[[str], bool]]] = [
    # Qwen3.5 / Qwen3-Coder / Nemotron 3 (<function=...>) and GLM-4 (<arg_key>) put XML, not JSON, inside
    # <tool_call>: no built-in parser; register one.
    ("hermes", lambda t: "<tool_call>" in t and "<function=" not in t and "<arg_key>" not in t),
    ("llama3", lambda t: "<|python_tag|>" in t or '"parameters"' in t),
]


def register_tool_call_format(
    name: str, parser: ToolCallParser, detect: Callable[[str], bool] | None = None, replace: bool = False
) -> None:
    """Add a format: ``parser(text) -> ParsedResponse`` (``decode_call`` decodes a JSON call); ``detect(chat
    template text) -> bool`` lets ``detect_tool_format`` pick it, before the built-in formats."""
    if name in TOOL_CALL_FORMATS and not replace:
        raise ValueError(f"tool-call format {name!r} is already registered; pass replace=True to replace it")
    TOOL_CALL_FORMATS[name] = parser
    if detect is not None:
        _DETECTORS[:] = [(name, detect)] + [(n, d) for n, d in _DETECTORS if n != name]


def parse_tool_calls(text: str, format: str = "hermes") -> ParsedResponse:
    """Split a decoded completion into assistant text, tool calls and malformed calls, in ``format``."""
    if format not in TOOL_CALL_FORMATS:
        raise ValueError(f"unknown tool-call format {format!r}; known: {sorted(TOOL_CALL_FORMATS)} "
                         "(add one with register_tool_call_format)")
    return TOOL_CALL_FORMATS[format](text)


def detect_tool_format(tokenizer_or_chat_template: Any) -> str | None:
    """The tool-call format a chat template teaches (a tokenizer, processor or template string), or ``None``."""
    template = tokenizer_or_chat_template
    if not isinstance(template, (str, dict)) and template is not None:
        template = getattr(template, "chat_template", None)
    if isinstance(template, dict):  # named templates ({"default": ..., "tool_use": ...})
        template = "\n".join(str(t) for t in template.values())
    if not template:
        return None
    return next((name for name, detect in _DETECTORS if detect(template)), None)


def _schema_types(schema: Any) -> list[str]:
    """The JSON types a parameter schema allows (``type``, a list of them, ``anyOf``/``oneOf``, ``nullable``)."""
    if not isinstance(schema, dict):
        return []
    declared = schema.get("type")
    kinds = [declared] if isinstance(declared, str) else [t for t in declared or [] if isinstance(t, str)]
    for union in ("anyOf", "oneOf"):
        for choice in schema.get(union) or []:
            kinds += _schema_types(choice)
    return kinds + (["null"] if schema.get("nullable") and "null" not in kinds else [])


def _cast(raw: str, kinds: list[str]) -> Any:
    """``raw`` as the first non-string type of ``kinds`` it reads as (transformers' rule); else the text itself."""
    for kind in kinds:
        text = raw.strip()
        try:
            if kind == "integer":
                if re.fullmatch(r"[+-]?\d+", text):
                    return int(text)
                number = float(text)  # JSON integers include whole numbers written as floats ("3.0")
                if number.is_integer():
                    return int(number)
            elif kind == "number":
                number = float(text)
                if number == number and abs(number) != float("inf"):
                    return int(number) if number.is_integer() and "." not in text else number
            elif kind == "boolean" and text.lower() in ("true", "1", "false", "0"):
                return text.lower() in ("true", "1")
            elif kind == "null" and text in ("null", "None"):
                return None
            elif kind in ("object", "array"):
                value = json.loads(text)
                if isinstance(value, dict if kind == "object" else list):
                    return value
        except ValueError:
            continue
    return raw


def coerce_arguments(calls: Sequence[ToolCall | ToolCallError], schemas: Sequence[dict]) -> list[ToolCall | ToolCallError]:
    """``calls`` with string arguments cast to the types their tool's schema declares (``"3"`` to ``3`` for an
    integer parameter), as TRL's ``parse_response(tools=...)`` does; anything else is left as it is."""
    params = {s.get("function", s).get("name"): s.get("function", s).get("parameters", {}).get("properties", {})
              for s in schemas}
    out = []
    for call in calls:
        properties = params.get(call.name) if isinstance(call, ToolCall) else None
        if properties:
            call = ToolCall(call.name, {k: _cast(v, _schema_types(properties.get(k))) if isinstance(v, str) and k in properties
                                        else v for k, v in call.arguments.items()}, call.raw)
        out.append(call)
    return out
