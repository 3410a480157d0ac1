"""Multi-turn rollouts with tools (TRL 1.16's ``tools`` and ``max_tool_calling_iterations``), for
GRPO, RLOO, PPO, OnlineDPO, NashMD and XPO.

After the first turn, the completions that call a tool (parsed in the chat template's convention,
:mod:`lit_align.rollout.tools`) get the tool results appended through the chat template, and the
policy continues from there, every such row of the batch in one call, until no row calls a tool,
``max_tool_calling_iterations`` is reached or the completion is ``max_completion_length`` long. A
completion is then the model's turns and the tool turns between them; ``Generations.tool_mask``
marks the model's own tokens, and only those count in the loss, the KL, the entropy and the
completion lengths (TRL's ``tool_mask``). The engine generates turn by turn (a generation server
too); tools run on the trainer side.

Each row of a rollout has a *sampler* (:data:`Sampler`): the model that began it continues it after
every tool result. GRPO, RLOO and PPO sample the policy only; the preference methods' second samples
are the policy's again (OnlineDPO), the policy-reference mixture's (NashMD) or the reference's (XPO),
and those rows go through the same tool turns, with the same tools, with their own model
(``tool_turns(gens, samplers)``; the rows of one sampler are sampled in one call per round).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from lit_align.data.base import DataRequirements
from lit_align.data.formats import PromptBatch
from lit_align.data.tokenize import render_prompt
from lit_align.ops.packing import left_pad
from lit_align.rollout.engines import Generations, SamplingParams, eos_ids, right_pad
from lit_align.rollout.environments import Environments, environment_methods
from lit_align.rollout.tool_calls import detect_tool_format, parse_tool_calls
from lit_align.rollout.tools import Toolbox, tool_metrics, tool_schemas
from lit_align.rollout.types import Rollout

Sampler = Callable[[Tensor, Tensor, SamplingParams], Generations]
"""``sampler(prompt_ids, prompt_mask, sampling) -> Generations``: one model through the module's engine."""


class ToolUse:
    """Mixin of an online module (before it in the bases): its ``sample_batch`` runs the tool turns."""

    def __init__(
        self,
        *args: Any,
        tools: list[Any] | None = None,
        max_tool_calling_iterations: int | None = None,
        environment_factory: Any = None,
        tool_call_format: str | None = None,
        tool_call_timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            tools: Python functions the policy may call (import paths in YAML); their names, type hints
                and docstrings are the tool schema every prompt is rendered with (TRL's ``tools``).
            max_tool_calling_iterations: Rounds of tool calls per rollout (None: until the completion is
                ``max_completion_length`` long).
            environment_factory: A class (or factory, or import path) made once per completion: its
                ``reset(**row)`` starts the rollout (text it returns is appended to the last user message), its
                public methods are tools of that rollout, its ``get_reward()`` a reward column named after it;
                or ``{name: factory}``, one chosen per row by its ``environment`` column (TRL's).
            tool_call_format: How the model writes a call (``hermes``, ``llama3`` or one registered with
                ``lit_align.rollout.tools.register_tool_call_format``); None: read from the chat template.
            tool_call_timeout: Seconds one tool call may take; a slower one answers with an error.
        """
        super().__init__(*args, **kwargs)
        if max_tool_calling_iterations is not None and max_tool_calling_iterations < 0:
            raise ValueError(f"max_tool_calling_iterations must be >= 0, got {max_tool_calling_iterations}")
        self.environments = Environments(environment_factory) if environment_factory is not None else None
        self.toolbox = Toolbox(tools or [], timeout=tool_call_timeout) if tools or self.environments else None
        if self.environments is not None:  # environments that score their rollouts are reward functions too
            self.reward_funcs += self.environments.reward_funcs
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(len(self.environments.reward_funcs))])
        self._row_tools: list[list] | None = None  # this rollout's environment methods, per completion
        self._row_schemas: list[list[dict]] | None = None  # the tool schemas each completion's prompt shows
        self._conversations: list[list[dict]] | None = None  # this rollout's messages, per completion
        self._row_environments: list | None = None
        self.max_tool_calling_iterations = max_tool_calling_iterations
        self.tool_call_format = tool_call_format
        self._tool_counts: tuple[Tensor, Tensor] | None = None
        if self.toolbox is not None and getattr(self, "dynamic_sampling", False):
            raise ValueError("dynamic_sampling resamples groups after scoring; with tools it is not supported yet: "
                             "set one of dynamic_sampling=False or tools=None")

    def data_requirements(self) -> DataRequirements:
        schemas = json.dumps(self.toolbox.schemas) if self.toolbox is not None and self.toolbox.schemas else None
        return replace(super().data_requirements(), tool_schemas=schemas)

    # -- the rollout -----------------------------------------------------------------------------
    def sample_batch(self, batch: PromptBatch) -> Generations:
        gens = super().sample_batch(batch) if self.environments is None else self.environment_turn(batch)
        if self.toolbox is None:
            return gens
        return self.tool_turns(gens)

    def policy_sampler(self) -> Sampler:
        """The policy through the module's engine."""
        return lambda ids, mask, sampling: self.sample(self.model, ids, mask, sampling=sampling)

    def sample_rows(self, ids: list[list[int]], samplers: Sequence[Sampler], sampling: SamplingParams, device) -> Generations:
        """One completion per prompt ``ids[i]`` from ``samplers[i]``, in row order; the rows of one sampler
        in one call (prompts left-padded to one width)."""
        left, mask = left_pad(ids, self.pad_token_id, device=device)
        sampling = replace(sampling, num_generations=1)
        groups: dict[int, list[int]] = {}
        for i, sampler in enumerate(samplers):
            groups.setdefault(id(sampler), []).append(i)
        if len(groups) == 1:
            return samplers[0](left, mask, sampling)
        parts = [samplers[rows[0]](left[rows], mask[rows], sampling) for rows in groups.values()]
        order = torch.tensor([i for rows in groups.values() for i in rows], device=device)
        return reduce(lambda a, b: a.cat(b, self.pad_token_id), parts).select(order.argsort())

    def environment_turn(self, batch: PromptBatch, sources: Sequence[tuple[Sampler, int]] | None = None) -> Generations:
        """The first turn with environments: one per completion, reset with its row; each prompt rendered
        again with the reset's text and its environment's tools, then sampled once. ``sources``: who samples
        the rows, in row order, and how many per prompt (default: the policy, ``num_generations``)."""
        sources = sources or [(self.policy_sampler(), self.num_generations)]
        prompts = [{"prompt": p, **{k: v[j] for k, v in batch.extras.items()}} for j, p in enumerate(batch.prompts)]
        rows = [row for _, n in sources for row in prompts for _ in range(n)]
        samplers = [sampler for sampler, n in sources for _ in range(len(prompts) * n)]
        envs = self.environments.draw(self.environments.names(len(rows), [r.get("environment") for r in rows]))
        ids, self._row_tools, self._row_schemas, self._row_environments = [], [], [], envs
        for row, env in zip(rows, envs):
            kwargs = {k: v for k, v in row.items() if k != "environment"} if self.environments.multi else row
            observation, prompt = env.reset(**kwargs), row["prompt"]
            if observation is not None:
                prompt = (prompt + observation if isinstance(prompt, str)
                          else [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + observation}])
            methods = environment_methods(env)
            self._row_tools.append(methods)
            schemas = [*self.toolbox.schemas, *tool_schemas(methods)]
            self._row_schemas.append(schemas)
            ids.append(render_prompt(self.tokenizer, prompt, {"tools": schemas or None, "chat_template_kwargs": {
                **self.template_kwargs(), **(row.get("chat_template_kwargs") or {})}}))
        return self.sample_rows(ids, samplers, self.sampling, batch.prompt_ids.device)

    def reward_columns(self) -> dict[str, Any]:
        """Reward functions also get the rollout's ``environments`` (TRL's)."""
        extra = super().reward_columns()
        return {**extra, "environments": self._row_environments} if self._row_environments is not None else extra

    def tool_format(self) -> str:
        fmt = self.tool_call_format or detect_tool_format(self.tokenizer)
        if fmt is None:
            raise ValueError("tools are set, but the chat template shows no tool-call convention lit-align knows "
                             "(hermes <tool_call>, llama3 JSON): set tool_call_format, or register a parser with "
                             "lit_align.rollout.tools.register_tool_call_format")
        return fmt

    def tool_turns(self, gens: Generations, samplers: Sequence[Sampler] | None = None) -> Generations:
        """The first turn's completions, continued through every round of tool calls (see the module
        docstring), row ``i`` by ``samplers[i]`` (default: the policy)."""
        fmt, limit = self.tool_format(), self.max_completion_length
        n = len(gens)
        samplers = list(samplers) if samplers is not None else [self.policy_sampler()] * n
        if len(samplers) != n:
            raise ValueError(f"{len(samplers)} samplers for {n} completions")
        prompts = [p[m.bool()].tolist() for p, m in zip(gens.prompt_ids, gens.prompt_mask)]
        lengths = gens.completion_mask.sum(1).tolist()
        rows = [c[:k].tolist() for c, k in zip(gens.completion_ids, lengths)]
        logps = ([lp[:k].tolist() for lp, k in zip(gens.sampling_logps, lengths)] if gens.sampling_logps is not None
                 else [[0.0] * k for k in lengths])
        own = [[1] * k for k in lengths]  # 1: the model's token, 0: a tool's
        truncated = gens.is_truncated.tolist()
        turn = list(rows)  # each row's latest model turn
        calls, failures = torch.zeros(n), torch.zeros(n)
        rounds = self.max_tool_calling_iterations if self.max_tool_calling_iterations is not None else limit
        conversations: list[list[dict]] = [[] for _ in range(n)]  # the model's turns and the tools' answers
        # Every row is parsed, cut ones too: a call they finished still runs and counts, and its result is
        # then dropped as overlong (TRL's order).
        active = list(range(n))
        context = self.max_model_length()
        for _ in range(rounds):
            parsed = {i: parse_tool_calls(self.tokenizer.decode(turn[i], skip_special_tokens=True), fmt).coerced(self.row_schemas(i))
                      for i in active}
            active = [i for i in active if parsed[i].requests()]
            if not active:
                break
            row_tools = [self._row_tools[i] for i in active] if self._row_tools is not None else None
            messages, stats = self.toolbox.run([parsed[i].requests() for i in active], row_tools)
            calls[active] += torch.tensor(stats.calls_per_row, dtype=torch.float)
            failures[active] += torch.tensor(stats.failures_per_row, dtype=torch.float)
            answers = dict(zip(active, messages))
            suffixes = {i: self.tool_suffix_ids(msgs) for i, msgs in answers.items()}
            # A result that would overflow the completion budget or the model's context is dropped, and the row
            # ends as it is; one that exactly fills the budget is kept, and the row ends on it (TRL's rule).
            active = [i for i in active if len(rows[i]) + len(suffixes[i]) <= limit
                      and len(prompts[i]) + len(rows[i]) + len(suffixes[i]) < context]
            for i in active:
                conversations[i] += [parsed[i].message(), *answers[i]]
            full = [i for i in active if len(rows[i]) + len(suffixes[i]) == limit]
            for i in full:
                rows[i], logps[i], own[i] = rows[i] + suffixes[i], logps[i] + [0.0] * len(suffixes[i]), own[i] + [0] * len(suffixes[i])
                truncated[i], turn[i] = True, []
            active = [i for i in active if i not in full]
            if not active:
                break
            budget = max(limit - len(rows[i]) - len(suffixes[i]) for i in active)
            ids = [prompts[i] + rows[i] + suffixes[i] for i in active]
            more = self.sample_rows(ids, [samplers[i] for i in active], replace(self.sampling, max_completion_length=budget),
                                    gens.prompt_ids.device)
            for j, i in enumerate(active):
                room = limit - len(rows[i]) - len(suffixes[i])
                k = min(int(more.completion_mask[j].sum()), room)
                new = more.completion_ids[j, :k].tolist()
                new_logps = more.sampling_logps[j, :k].tolist() if more.sampling_logps is not None else [0.0] * k
                rows[i] = rows[i] + suffixes[i] + new
                logps[i] = logps[i] + [0.0] * len(suffixes[i]) + new_logps
                own[i] = own[i] + [0] * len(suffixes[i]) + [1] * k
                truncated[i] = bool(more.is_truncated[j]) or k < int(more.completion_mask[j].sum())
                turn[i] = new
        self._tool_counts = (calls, failures)
        for i in range(n):
            if turn[i] or not conversations[i]:  # a row that ended on a tool result has no last turn
                conversations[i].append(parse_tool_calls(self.tokenizer.decode(turn[i], skip_special_tokens=True), fmt).message())
        self._conversations = conversations
        return self.joined_turns(gens, rows, logps, own, truncated)

    def decode(self, batch: PromptBatch, gens: Generations) -> tuple[list, list[list[int]]]:
        """Conversational completions of a multi-turn rollout are its messages: the assistant turns (with
        their tool calls) and the tool turns, as TRL's reward functions and completions table see them."""
        texts, ids = super().decode(batch, gens)
        conversations, self._conversations = self._conversations, None
        if conversations is not None and len(conversations) == len(texts) and texts and isinstance(texts[0], list):
            texts = conversations
        return texts, ids

    def joined_turns(self, gens: Generations, rows: list, logps: list, own: list, truncated: list) -> Generations:
        device = gens.prompt_ids.device
        ids = right_pad(rows, self.pad_token_id, device=device)
        cmask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            cmask[i, : len(r)] = 1
        pad = ids.size(1)
        return Generations(
            gens.prompt_ids, gens.prompt_mask, ids, cmask, torch.tensor(truncated, device=device),
            torch.tensor([lp + [0.0] * (pad - len(lp)) for lp in logps], dtype=torch.float32, device=device),
            tool_mask=torch.tensor([m + [1] * (pad - len(m)) for m in own], dtype=torch.long, device=device),
        )

    def row_schemas(self, i: int) -> list[dict]:
        """The tool schemas row ``i``'s prompt was rendered with (the module's tools and its environment's)."""
        return self._row_schemas[i] if self._row_schemas is not None else self.toolbox.schemas

    def max_model_length(self) -> int:
        """The longest sequence the engine accepts (vLLM's max_model_len, else the model's positions)."""
        llm = getattr(self.engine, "llm", None)
        if llm is not None and hasattr(llm, "llm_engine"):
            return int(llm.llm_engine.model_config.max_model_len)
        config = getattr(self.model.config, "text_config", None) or self.model.config
        return int(getattr(config, "max_position_embeddings", None) or 2**62)

    def template_kwargs(self) -> dict[str, Any]:
        """The data's ``chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``), which the tool turns are
        rendered with too (TRL's)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return dict(getattr(datamodule, "chat_template_kwargs", None) or {})

    def tool_suffix_ids(self, tool_messages: list[dict]) -> list[int]:
        """The tokens the chat template puts after an assistant turn that called tools: the tool turns
        and the next assistant header (TRL's ``_get_tool_suffix_ids``)."""
        call = [{"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}]
        dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": call}]
        template, kwargs = self.tokenizer.apply_chat_template, self.template_kwargs()
        prefix = list(template(dummy, add_generation_prompt=False, tokenize=True, return_dict=False, **kwargs))
        full = list(template(dummy + tool_messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs))
        eos = set(eos_ids(self.tokenizer, self.model))
        ends = [k for k, t in enumerate(prefix) if t in eos]
        if ends:  # the turn ends at EOS (some templates add a newline the model never wrote)
            prefix = prefix[: ends[-1] + 1]
        if full[: len(prefix)] != prefix:
            raise ValueError("the chat template renders an assistant turn differently once tool results follow it; "
                             "lit-align cannot find where the tool turns start")
        return full[len(prefix):]

    def build_rollout(self, batch: PromptBatch, gens: Generations, completions: list, rewards: Tensor, stage: str) -> Rollout:
        rollout = super().build_rollout(batch, gens, completions, rewards, stage)
        if self._tool_counts is not None:
            calls, failures = self._tool_counts
            totals = self.global_sum(torch.stack([calls.sum(), failures.sum(), torch.tensor(float(len(calls)))]).to(self.device))
            rollout.metrics.update(tool_metrics(float(totals[0]), float(totals[1]), int(totals[2])))
            self._tool_counts = None
        return rollout
