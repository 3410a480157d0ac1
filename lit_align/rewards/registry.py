"""Reward functions from configs, and scoring a batch of completions with several of them.

A reward function has TRL's signature ``f(prompts, completions, completion_ids, **columns)
-> list[float | None]`` (one value per completion; None where it does not apply), sync or
``async``. In YAML a reward function is one of:

- an import path: ``lit_align.rewards.arithmetic_reward`` or ``my_pkg.rewards:my_reward``;
  a bare name (``arithmetic_reward``) is looked up in ``lit_align.rewards``;
- a reward model: a Hugging Face sequence-classification directory, a Hub id (``org/name``, as
  TRL reads a string) or ``builtin:tiny``, scored with
  :class:`~lit_align.rewards.model.RewardModelScorer` (loaded with the module's other models);
- ``{class_path: ..., init_args: {...}}``: a class or factory called with ``init_args``
  (``{class_path: lit_align.rewards.SoftOverlongPunishment, init_args: {...}}``).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lit_align.imports import import_object

RewardFunc = Callable[..., Sequence[float | None]]


def _import(path: str) -> Any:
    return import_object(
        path, "reward function", default_module="lit_align.rewards",
        expected="an import path such as 'lit_align.rewards.arithmetic_reward', a reward-model directory, or "
        "{class_path: ..., init_args: ...}",
    )


def load_reward_func(spec: str | dict | RewardFunc) -> RewardFunc:
    """One reward function from its config form (see the module docstring)."""
    if callable(spec):
        return spec
    if isinstance(spec, dict):
        if "class_path" not in spec:
            raise ValueError(f"reward function {spec!r}: a mapping needs 'class_path' (and optional 'init_args')")
        return _import(spec["class_path"])(**spec.get("init_args", {}))
    if not isinstance(spec, str):
        raise TypeError(f"reward function must be a string, a mapping or a callable, got {type(spec).__name__}")
    if spec.startswith("builtin:") or os.path.isdir(spec) or _is_hub_id(spec):
        from lit_align.rewards.model import RewardModelScorer

        return RewardModelScorer(spec)
    func = _import(spec)
    if isinstance(func, type):
        func = func()
    if not callable(func):
        raise ValueError(f"reward function {spec!r} is a {type(func).__name__}, not a callable")
    return func


def _is_hub_id(spec: str) -> bool:
    """``org/name``: a reward model on the Hub (TRL's reading of a string); import paths have no ``/``."""
    return spec.count("/") == 1 and ":" not in spec and not spec.startswith((".", "/")) and not os.path.exists(spec)


def reward_name(func: RewardFunc) -> str:
    """The name metrics use (``rewards/<name>/mean``): the function's ``__name__``."""
    return getattr(func, "__name__", None) or type(func).__name__


def _call_all(funcs: Sequence[RewardFunc], kwargs: dict[str, Any]) -> list[Any]:
    """Call every function; ``async`` ones run concurrently (as TRL does)."""
    results: list[Any] = []
    pending: dict[int, Any] = {}
    for i, f in enumerate(funcs):
        try:
            out = f(**kwargs)
        except Exception as err:
            raise RuntimeError(f"reward function {reward_name(f)!r} raised {type(err).__name__}: {err}") from err
        if inspect.isawaitable(out):
            pending[i] = out
        results.append(out)
    if pending:

        async def gather() -> list[Any]:
            return await asyncio.gather(*pending.values(), return_exceptions=True)

        for i, out in zip(pending, asyncio.run(gather())):
            if isinstance(out, BaseException):
                name = reward_name(funcs[i])
                raise RuntimeError(f"reward function {name!r} raised {type(out).__name__}: {out}") from out
            results[i] = out
    return results


def compute_rewards(
    funcs: Sequence[RewardFunc],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Every function's reward for every completion: ``(N, K)`` float32, NaN for None."""
    n = len(completions)
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **(columns or {})}
    out = torch.full((n, len(funcs)), float("nan"), dtype=torch.float32)
    for k, (f, values) in enumerate(zip(funcs, _call_all(funcs, kwargs))):
        name = reward_name(f)
        if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise ValueError(f"reward function {name!r} returned {type(values).__name__}; expected a list of {n} floats (or None)")
        if len(values) != n:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for {n} completions; expected one per completion")
        nan_rows = []
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError) as err:
                raise ValueError(f"reward function {name!r} returned {v!r} for completion {i}; expected a float or None") from err
            if math.isinf(v):
                raise ValueError(f"reward function {name!r} returned {v} for completion {i}; rewards must be finite")
            if math.isnan(v):
                nan_rows.append(i)
            out[i, k] = v
        if nan_rows:  # None says "not scored"; NaN is a bug that would train on as 0
            raise ValueError(
                f"reward function {name!r} returned nan for {len(nan_rows)} of {n} completions (rows {nan_rows[:8]}"
                f"{', ...' if len(nan_rows) > 8 else ''}); return a finite float, or None where the function does not apply"
            )
    unscored = out.isnan().all(dim=1).nonzero().flatten().tolist()
    if unscored:  # TRL warns too, and counts them as 0
        warnings.warn(
            f"every reward function returned None for {len(unscored)} of {n} completions (rows {unscored[:8]}); "
            "they count as reward 0. Make at least one function score every completion",
            stacklevel=2,
        )
    return out.to(device)
