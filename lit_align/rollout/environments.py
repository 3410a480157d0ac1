"""Environments for multi-turn rollouts (TRL 1.16's ``environment_factory``).

An environment is a class made by a factory (a callable or import path), one instance per
completion, reused across batches (a pool per environment). ``reset(**row)`` starts a rollout
with the row's columns and may return text appended to the prompt's last user message; its public
methods are the tools the policy may call during that rollout (with the standalone ``tools``); an
optional ``get_reward()`` (sync or async) becomes a reward column named after the class. A dict of
factories selects one per row by the row's ``environment`` column.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lit_align.imports import import_object


def environment_methods(instance: Any) -> list[Callable]:
    """The public methods of an environment other than ``reset`` and ``get_reward``: its tools."""
    names = [n for n, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)]
    return [getattr(instance, n) for n in names if n not in ("reset", "get_reward") and not n.startswith("_")]


def environment_reward(env_type: type) -> Callable:
    """A reward function scoring each completion with its environment's ``get_reward()`` (None for a
    completion of another environment), named after the class, as TRL adds it."""
    if inspect.iscoroutinefunction(env_type.get_reward):

        async def reward(environments: list, **kwargs: Any) -> list:
            return [await e.get_reward() if type(e) is env_type else None for e in environments]
    else:

        def reward(environments: list, **kwargs: Any) -> list:
            return [e.get_reward() if type(e) is env_type else None for e in environments]

    reward.__name__ = env_type.__name__
    return reward


class Environments:
    """The factories, each probed once (it must define ``reset``), their instance pools, and the
    reward functions of the classes that define ``get_reward``."""

    def __init__(self, factory: Callable | str | dict[str, Callable | str]) -> None:
        self.multi = isinstance(factory, dict)
        specs = factory if self.multi else {None: factory}
        self.factories = {name: import_object(f, "environment_factory") if isinstance(f, str) else f for name, f in specs.items()}
        self.pools: dict[Any, list] = {}
        self.reward_funcs: list[Callable] = []
        for name, make in self.factories.items():
            instance = make()
            if not callable(getattr(instance, "reset", None)):
                raise ValueError(f"environment_factory[{name!r}] made a {type(instance).__name__}, which has no reset(): "
                                 "every environment needs reset(**row)")
            self.pools[name] = [instance]
            if callable(getattr(type(instance), "get_reward", None)) and type(instance).__name__ not in {
                    f.__name__ for f in self.reward_funcs}:
                self.reward_funcs.append(environment_reward(type(instance)))

    def draw(self, names: list) -> list:
        """One instance per completion (reused from the pools, more made when a batch needs them)."""
        cursor: dict[Any, int] = {}
        out = []
        for name in names:
            if name not in self.factories:
                raise ValueError(f"a row has environment={name!r}, which is not one of environment_factory's "
                                 f"{sorted(map(str, self.factories))}")
            pool, k = self.pools[name], cursor.get(name, 0)
            if k == len(pool):
                pool.append(self.factories[name]())
            cursor[name] = k + 1
            out.append(pool[k])
        return out

    def names(self, rows: int, column: list | None) -> list:
        """Each row's environment: the ``environment`` column with several factories, else the one."""
        if not self.multi:
            return [None] * rows
        if column is None:
            raise ValueError("environment_factory is a dict of environments, so every row needs an 'environment' column "
                             "naming one of them")
        return list(column)
