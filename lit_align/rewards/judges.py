"""Pairwise judges: which of two completions of a prompt is better.

A judge is any object with ``judge(prompts, completion_pairs) -> list[float]``: for each
prompt, the probability that the *first* completion of its pair is the better one (1.0 / 0.0
for a hard choice; TRL's removed ``BasePairwiseJudge`` returned the index of the better one,
which is ``1 - probability`` rounded). Built-ins:

- :class:`RewardJudge`: reward functions or a reward model score both completions; the
  probability is ``sigmoid(score_0 - score_1)`` (``hard=True``: 1 where the first scores higher);
- :class:`OpenAIPairwiseJudge`: an LLM-as-judge over any OpenAI-compatible chat-completions
  HTTP endpoint (vLLM, TGI, OpenAI, ...), asked to answer ``0`` or ``1``.

In YAML a judge is ``{class_path: lit_align.rewards.OpenAIPairwiseJudge, init_args: {...}}``.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

from lit_align.rewards.registry import RewardFunc, compute_rewards, load_reward_func


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, prompts: list, completion_pairs: list[tuple[Any, Any]]) -> list[float]: ...


def check_judgement(values: Any, n: int, name: str) -> list[float]:
    """A judge's output as ``n`` probabilities in [0, 1], or a clear error."""
    if values is None or not hasattr(values, "__len__") or len(values) != n:
        got = "None" if values is None else f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise ValueError(f"judge {name} returned {got} for {n} pairs; expected one probability per pair")
    out = []
    for i, v in enumerate(values):
        try:
            p = float(v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"judge {name} returned {v!r} for pair {i}; expected a probability in [0, 1]") from err
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise ValueError(f"judge {name} returned {p} for pair {i}; expected a probability in [0, 1]")
        out.append(p)
    return out


class RewardJudge:
    """Judge by reward: functions with TRL's signature and/or reward-model directories.

    Args:
        reward_funcs: What ``load_reward_func`` accepts (import paths, model directories, callables).
        reward_weights: One weight per function (default 1).
        hard: Return 1/0 (the higher score wins, ties to the first) instead of ``sigmoid(difference)``.
    """

    def __init__(self, reward_funcs: Sequence[str | dict | RewardFunc], reward_weights: Sequence[float] | None = None, hard: bool = False):
        self.reward_funcs = [load_reward_func(f) for f in reward_funcs]
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} functions")
        self.hard = hard

    def judge(self, prompts: list, completion_pairs: list[tuple[Any, Any]], **columns: list) -> list[float]:
        flat_prompts = [p for p in prompts for _ in range(2)]
        flat = [c for pair in completion_pairs for c in pair]
        cols = {k: [v for v in vals for _ in range(2)] for k, vals in columns.items()}
        rewards = compute_rewards(self.reward_funcs, flat_prompts, flat, [[] for _ in flat], cols)
        scores = (rewards.nan_to_num(0.0) * rewards.new_tensor(self.reward_weights)).sum(1).view(-1, 2)
        diff = scores[:, 0] - scores[:, 1]
        return (diff >= 0).float().tolist() if self.hard else diff.sigmoid().tolist()


DEFAULT_JUDGE_PROMPT = """You compare two answers to the same request and say which is better.

## Request
{prompt}

## Answer 0
{completion_0}

## Answer 1
{completion_1}

Reply with a single character: 0 if Answer 0 is better, 1 if Answer 1 is better."""


def _text(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list):  # a conversation: its messages, one per line
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in x)
    return str(x)


class OpenAIPairwiseJudge:
    """An LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint (no SDK needed).

    Args:
        model: The judge model's name at the endpoint.
        base_url: The API root, for example ``http://localhost:8000/v1`` (vLLM) or
            ``https://api.openai.com/v1``.
        api_key_env: Environment variable holding the API key (sent as a Bearer token if set).
        prompt_template: Uses ``{prompt}``, ``{completion_0}``, ``{completion_1}``.
        max_workers: Requests in flight at once.
        timeout: Seconds per request. A request that fails, times out, or gets an answer other
            than ``0``/``1`` raises an error naming the endpoint and the reply.
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        prompt_template: str = DEFAULT_JUDGE_PROMPT,
        max_workers: int = 8,
        timeout: float = 60.0,
    ) -> None:
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.prompt_template = prompt_template
        self.max_workers = max_workers
        self.timeout = timeout

    def _ask(self, prompt: Any, pair: tuple[Any, Any]) -> float:
        content = self.prompt_template.format(prompt=_text(prompt), completion_0=_text(pair[0]), completion_1=_text(pair[1]))
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0.0})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as err:
            raise RuntimeError(f"judge endpoint {self.url} failed: {err}") from err
        try:
            answer = reply["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise RuntimeError(f"judge endpoint {self.url} sent no chat completion: {str(reply)[:200]}") from err
        if answer[:1] not in ("0", "1"):
            raise ValueError(f"judge {self.model} at {self.url} answered {answer!r}; expected '0' or '1'")
        return 1.0 if answer[0] == "0" else 0.0

    def judge(self, prompts: list, completion_pairs: list[tuple[Any, Any]], **columns: list) -> list[float]:
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self._ask, prompts, completion_pairs))


def load_judge(spec: str | dict | PairwiseJudge) -> PairwiseJudge:
    """A judge from its config form: an object with ``judge``, ``{class_path, init_args}`` or an import path."""
    if hasattr(spec, "judge"):
        return spec  # type: ignore[return-value]
    judge = load_reward_func(spec) if not isinstance(spec, str) else load_reward_func({"class_path": spec})
    if not hasattr(judge, "judge"):
        raise ValueError(f"judge {spec!r} has no judge(prompts, completion_pairs) method")
    return judge
