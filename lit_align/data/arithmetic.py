"""The embedded task ``builtin:arithmetic``: multi-step sums with running totals, in every TRL format.

A prompt is ``"Compute 7+5-3+8."`` and its correct solution writes one step per line,
each starting from the running total, then the answer::

    7+5=12
    12-3=9
    9+8=17
    Answer: 17

Because the answer is checkable (:func:`solve`, :func:`parse_answer`), the task yields
rewards for online methods and correct/corrupted pairs for preference methods, and the
sequences are short enough (< 90 tokens) to train on two CPU cores.

Rows are deterministic in (seed, split). Train and test prompts are disjoint: a prompt
belongs to the test split iff a fixed hash (CRC32) of it is 0 mod 8, so evaluation
measures generalisation, not memorisation.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets is imported lazily: rewards import this module and must stay light
    import datasets

FORMATS = (
    "language_modeling",
    "prompt_completion",
    "preference",
    "unpaired_preference",
    "stepwise",
    "prompt_only",
)
TASKS = ("arithmetic",)
SPLITS = ("train", "test")
# Option name -> type; the values given in a builtin name are parsed with these.
OPTIONS: dict[str, type] = {
    "size": int,
    "seed": int,
    "steps": int,
    "conversational": bool,
    "max_operand": int,
    "test_size": int,
    "noise": float,
    "tools": bool,
}
DEFAULT_SIZE = 1000
_TEST_BUCKETS = 8  # 1 in 8 prompts (by hash) belongs to the test split
_MAX_TRIES = 10_000  # rejection-sampling guard for tiny problem spaces
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_ANSWER = "Answer:"


# --------------------------------------------------------------------------- names


def parse_builtin_dataset(name: str) -> tuple[str, dict]:
    """Split ``builtin:<task>?k=v&...`` into the task and its typed options.

    ``"builtin:arithmetic?size=200&conversational=true"`` -> ``("arithmetic", {"size": 200, "conversational": True})``.
    Only the options present in the name are returned; defaults are applied by the consumer.
    """
    prefix = "builtin:"
    if not isinstance(name, str) or not name.startswith(prefix):
        raise ValueError(
            f"{name!r} is not a builtin dataset name; expected 'builtin:<task>[?option=value&...]'"
        )
    task, _, query = name[len(prefix) :].partition("?")
    if task not in TASKS:
        raise ValueError(f"unknown builtin task {task!r} in {name!r}; known tasks: {', '.join(TASKS)}")
    valid = ", ".join(f"{k} ({t.__name__})" for k, t in OPTIONS.items())
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, raw = item.partition("=")
        if key not in OPTIONS:
            raise ValueError(f"unknown option {key!r} in {name!r}; valid options: {valid}")
        if not eq:
            raise ValueError(
                f"option {key!r} in {name!r} has no value (write {key}=...); valid options: {valid}"
            )
        if key in options:
            raise ValueError(f"option {key!r} is given twice in {name!r}")
        options[key] = _parse_value(key, raw, name, valid)
    return task, options


def _parse_value(key: str, raw: str, name: str, valid: str) -> Any:
    kind = OPTIONS[key]
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
    else:
        try:
            value = kind(raw)
        except ValueError:
            pass
        else:
            if kind is not float or 0.0 <= value <= 1.0:
                return value
    expected = "a float in [0, 1]" if kind is float else kind.__name__
    raise ValueError(f"option {key!r} in {name!r} must be {expected}, got {raw!r}; valid options: {valid}")


# --------------------------------------------------------------------------- the task


def solve(prompt: str) -> int:
    """The true answer of a prompt (the value of its ``a+b-c...`` expression)."""
    match = re.search(r"\d+(?:\s*[+-]\s*\d+)*", prompt)
    if match is None:
        raise ValueError(f"no arithmetic expression in prompt {prompt!r}")
    terms = re.findall(r"([+-]?)\s*(\d+)", match.group(0))
    return sum(-int(n) if sign == "-" else int(n) for sign, n in terms)


def parse_answer(completion: str) -> int | None:
    """The integer right after the last ``Answer:`` in ``completion``, or None."""
    at = completion.rfind(_ANSWER)
    if at < 0:
        return None
    match = re.match(r"[ \t]*(-?\d+)", completion[at + len(_ANSWER) :])
    return int(match.group(1)) if match else None


def _problem(rng: random.Random, steps: int, max_operand: int) -> tuple[list[int], list[str]]:
    operands = [rng.randint(0, max_operand) for _ in range(steps + 1)]
    ops = [rng.choice("+-") for _ in range(steps)]
    return operands, ops


def calculator(expression: str) -> int:
    """Evaluate a sum or difference of integers, such as 7+5-3.

    Args:
        expression: The expression, integers joined by + and -.
    """
    if not re.fullmatch(r"\s*\d+(?:\s*[+-]\s*\d+)*\s*", expression):
        raise ValueError(f"not a sum of integers: {expression!r}")
    return solve(expression)


def calculator_schema() -> dict:
    """The chat-template tool schema of :func:`calculator` (what a ``tools`` column holds)."""
    from transformers.utils import get_json_schema

    return get_json_schema(calculator)


def _tool_turns(prompt: str) -> list[dict]:
    """A demonstration that asks the calculator: the call, its result, the answer."""
    expression = prompt.removeprefix("Compute ").removesuffix(".")
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": str(solve(prompt))},
            {"role": "assistant", "content": f"{_ANSWER} {solve(prompt)}"}]


def _prompt(operands: list[int], ops: list[str]) -> str:
    expr = str(operands[0]) + "".join(op + str(n) for op, n in zip(ops, operands[1:]))
    return f"Compute {expr}."


def _is_test(prompt: str) -> bool:
    # A fixed hash (not the salted builtin hash()) so the partition is the same in every process.
    return zlib.crc32(prompt.encode()) % _TEST_BUCKETS == 0


def _steps(operands: list[int], ops: list[str], error_at: int | None, delta: int) -> list[str]:
    """Solution lines (without the answer line). A slip of ``delta`` at step ``error_at`` is carried on."""
    total = operands[0]
    lines = []
    for i, (op, n) in enumerate(zip(ops, operands[1:])):
        result = total + n if op == "+" else total - n
        if i == error_at:
            result += delta
        lines.append(f"{total}{op}{n}={result}")
        total = result
    # Only + and - follow the slip, so the final total is off by exactly delta: always wrong.
    return [*lines, f"{_ANSWER} {total}"]


def _problems(
    split: str, size: int, seed: int, steps: int, max_operand: int
) -> list[tuple[list[int], list[str]]]:
    # The string seed is hashed with SHA-512 by random.Random, so it is stable across processes.
    rng = random.Random(f"arithmetic/{split}/{seed}/{steps}/{max_operand}")
    want_test = split == "test"
    out = []
    for _ in range(size):
        for _ in range(_MAX_TRIES):
            operands, ops = _problem(rng, steps, max_operand)
            if _is_test(_prompt(operands, ops)) == want_test:
                break
        else:
            raise ValueError(
                f"could not draw a {split} problem with steps={steps}, max_operand={max_operand}: "
                "the problem space is too small; increase max_operand"
            )
        out.append((operands, ops))
    return out


def _balanced_flags(rng: random.Random, size: int) -> list[bool]:
    """``size`` booleans, half True (rounded up), shuffled: both classes present once size >= 2."""
    flags = [i < (size + 1) // 2 for i in range(size)]
    rng.shuffle(flags)
    return flags


def _slip(rng: random.Random, steps: int) -> tuple[int, int]:
    return rng.randrange(steps), rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5])


def arithmetic_rows(
    fmt: str,
    split: str = "train",
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    steps: int = 3,
    conversational: bool = False,
    max_operand: int = 20,
    noise: float = 0.0,
    tools: bool = False,
) -> list[dict]:
    """``size`` rows of the arithmetic task in TRL format ``fmt`` (see :data:`FORMATS`).

    The same (split, seed, steps, max_operand) gives the same prompts in every format.
    Corrupted solutions carry an arithmetic slip at a random step through to a wrong answer.
    ``noise``: the fraction of demonstrations (``language_modeling`` and ``prompt_completion``
    rows) that carry such a slip, as imperfect human demonstrations do; other formats ignore it.
    ``tools`` (conversational ``language_modeling`` and ``prompt_only``): rows carry a ``tools``
    column with the :func:`calculator` schema; a demonstration asks the calculator and answers with
    its result, except the ``noise`` fraction, which works the sum out itself with a slip.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for builtin:arithmetic; valid splits: {', '.join(SPLITS)}")
    if tools and not (conversational and fmt in ("language_modeling", "prompt_only")):
        raise ValueError("tools=true gives conversational language_modeling and prompt_only rows (tool calls are "
                         f"messages); got format {fmt!r}, conversational={conversational}")
    if size < 0 or steps < 1 or max_operand < 1 or not 0.0 <= noise <= 1.0:
        raise ValueError(
            f"need size >= 0, steps >= 1, max_operand >= 1, 0 <= noise <= 1; got {size=}, {steps=}, "
            f"{max_operand=}, {noise=}"
        )
    problems = _problems(split, size, seed, steps, max_operand)
    # A separate stream for the noise, so the prompts do not depend on the format.
    rng = random.Random(f"arithmetic-noise/{split}/{seed}/{fmt}")
    correct = _balanced_flags(rng, size)
    # Its own stream too: noise=0 leaves every demonstration (and every other format) as it was.
    slips = random.Random(f"arithmetic-demo-noise/{split}/{seed}")

    def user(text: str) -> Any:
        # Standard prompts end with a newline so prompt + completion reads as two lines
        # (TRL concatenates them as they are).
        return [{"role": "user", "content": text}] if conversational else text + "\n"

    def assistant(text: str) -> Any:
        return [{"role": "assistant", "content": text}] if conversational else text

    rows = []
    for (operands, ops), ok in zip(problems, correct):
        prompt = _prompt(operands, ops)
        good = "\n".join(_steps(operands, ops, None, 0))
        slipped = bool(noise and fmt in ("language_modeling", "prompt_completion") and slips.random() < noise)
        if slipped:
            good = "\n".join(_steps(operands, ops, *_slip(slips, steps)))
        if tools:
            schema = [calculator_schema()]
            row = ({"messages": user(prompt) + (assistant(good) if slipped else _tool_turns(prompt)), "tools": schema}
                   if fmt == "language_modeling" else {"prompt": user(prompt), "answer": solve(prompt), "tools": schema})
        elif fmt == "language_modeling":
            if conversational:
                row = {"messages": user(prompt) + assistant(good)}
            else:
                row = {"text": prompt + "\n" + good}
        elif fmt == "prompt_completion":
            row = {"prompt": user(prompt), "completion": assistant(good)}
        elif fmt == "preference":
            bad = "\n".join(_steps(operands, ops, *_slip(rng, steps)))
            row = {"prompt": user(prompt), "chosen": assistant(good), "rejected": assistant(bad)}
        elif fmt == "unpaired_preference":
            text = good if ok else "\n".join(_steps(operands, ops, *_slip(rng, steps)))
            row = {"prompt": user(prompt), "completion": assistant(text), "label": ok}
        elif fmt == "stepwise":
            # TRL/PRM convention: the first wrong step and every later step are labelled False.
            error_at, delta = (None, 0) if ok else _slip(rng, steps)
            lines = _steps(operands, ops, error_at, delta)
            labels = [error_at is None or i < error_at for i in range(len(lines))]
            # Steps stay strings in both forms (TRL's stepwise format has no message-list steps).
            row = {"prompt": user(prompt), "completions": lines, "labels": labels}
        else:  # prompt_only
            row = {"prompt": user(prompt), "answer": solve(prompt)}
        rows.append(row)
    return rows


def arithmetic_dataset(name: str, fmt: str, split: str) -> datasets.Dataset:
    """The ``datasets.Dataset`` for a ``builtin:arithmetic?...`` name, format and split.

    The test split has ``test_size`` rows, by default ``max(size // 10, 16)``.
    """
    import datasets

    _, options = parse_builtin_dataset(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name!r}; valid splits: {', '.join(SPLITS)}")
    size = options.pop("size", DEFAULT_SIZE)
    test_size = options.pop("test_size", max(size // 10, 16))
    rows = arithmetic_rows(fmt, split, size=size if split == "train" else test_size, **options)
    return datasets.Dataset.from_list(rows)
