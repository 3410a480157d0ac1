"""Per-token log-probs of sampled completions, for the online methods.

Generation gives left-padded prompts ``(N, P)`` and right-padded completions ``(N, C)``.
Rather than run the model over ``[pad..pad prompt completion pad..pad]`` with an attention
mask, the prompt and completion of each row are joined without padding into a
:class:`SequenceBatch` (right-padded, or packed into rows of bounded length), so the
forward needs no mask and skips the padding; the chunked LM-head op then scores only the
completion tokens, and the results are scattered back to ``(N, C)``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from lit_align.ops.forward import decoder_hidden, lm_head_params
from lit_align.ops.logprobs import selected_logprobs
from lit_align.ops.packing import SequenceBatch, collate_sequences, left_pad


def completion_batch(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    pad_token_id: int,
    layout: str = "padded",
    capacity: int | None = None,
) -> SequenceBatch:
    """Join each prompt (without its left padding) and completion (up to its mask) into one sequence.

    ``completion_mask`` of the result marks the completion tokens; sequence ``i`` is row ``i``
    of the inputs.
    """
    sequences = []
    for p, pm, c, cm in zip(prompt_ids.tolist(), prompt_mask.tolist(), completion_ids.tolist(), completion_mask.tolist()):
        prompt = [t for t, m in zip(p, pm) if m]
        completion = [t for t, m in zip(c, cm) if m]
        sequences.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    tensors = collate_sequences(sequences, pad_token_id, layout, capacity)
    device = completion_ids.device
    return SequenceBatch(
        **{k: v.to(device) for k, v in tensors.items()}, num_sequences=len(sequences), num_examples=len(sequences)
    )


def shared_prompt_batch(
    prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor, pad_token_id: int
) -> SequenceBatch:
    """The completions of one prompt in one row, the prompt once: ``[prompt, c_1, ..., c_G, pad..]``.

    The rows with the same prompt (a rollout's group, wherever a shuffle put its rows) become one row,
    in order of the prompt's first row; completion ``j`` takes the positions ``P..P+len(c_j)-1`` that it
    has after the prompt, and attends to the prompt and to itself only
    (:func:`lit_align.ops.packing.shared_prompt_attention`), so every completion token sees what it sees in
    :func:`completion_batch`. The forward runs over ``P + sum len(c_j)`` tokens a group instead of
    ``G (P + len(c_j))``: the prompt's share of the step is paid once. The prompt's tokens carry the
    group's first sequence id (:attr:`SequenceBatch.num_tokens` counts them once) and are marked in
    ``shared_prompt``. Sequence ``i`` is row ``i`` of the inputs, as in :func:`completion_batch`.
    """
    prompts = [[t for t, m in zip(p, pm) if m] for p, pm in zip(prompt_ids.tolist(), prompt_mask.tolist())]
    completions = [[t for t, m in zip(c, cm) if m] for c, cm in zip(completion_ids.tolist(), completion_mask.tolist())]
    if not all(prompts):
        raise ValueError("the shared-prompt layout needs a prompt in every row: a rollout row has none "
                         "(set shared_prompt_forward: false)")
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    groups = list(by_prompt.values())  # in order of first appearance
    rows = []
    for group in groups:
        prompt = prompts[group[0]]
        row = {"input_ids": list(prompt), "position_ids": list(range(len(prompt))),
               "sequence_ids": [group[0]] * len(prompt), "completion_mask": [0] * len(prompt), "shared_prompt": [1] * len(prompt)}
        for i in group:
            n = len(completions[i])
            for key, values in (("input_ids", completions[i]), ("position_ids", range(len(prompt), len(prompt) + n)),
                                ("sequence_ids", [i] * n), ("completion_mask", [1] * n), ("shared_prompt", [0] * n)):
                row[key].extend(values)
        rows.append(row)
    width = max(len(row["input_ids"]) for row in rows)
    pad = {"input_ids": pad_token_id, "position_ids": 0, "sequence_ids": -1, "completion_mask": 0, "shared_prompt": 0}
    device = completion_ids.device
    tensors = {k: torch.tensor([row[k] + [v] * (width - len(row[k])) for row in rows], device=device) for k, v in pad.items()}
    for k in ("completion_mask", "shared_prompt"):
        tensors[k] = tensors[k].bool()
    return SequenceBatch(**tensors, num_sequences=len(prompts), num_examples=len(prompts))


def select_sequences(batch: SequenceBatch, index: Tensor) -> SequenceBatch:
    """The sequences ``index`` of a padded :func:`completion_batch` (one sequence per row), renumbered
    ``0..len(index)-1``: a mini-batch without collating its tokens again."""
    if batch.num_sequences != batch.input_ids.size(0):
        raise ValueError("select_sequences needs the padded layout (one sequence per row)")
    if batch.vision is not None:
        raise ValueError("select_sequences cannot split a batch's image inputs: rebuild the sequences of the rows instead")
    width = int((batch.sequence_ids[index] >= 0).sum(1).max())  # right padding: drop columns no row uses
    rows = {k: v[index, :width] for k, v in batch.to_dict().items() if isinstance(v, Tensor) and v.dim() == 2}
    ids = rows["sequence_ids"]
    rows["sequence_ids"] = torch.where(ids >= 0, torch.arange(len(index), device=ids.device)[:, None], ids)
    return SequenceBatch(**rows, num_sequences=len(index), num_examples=len(index))


def target_positions(batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """The completion tokens scored and the positions whose hidden states predict them: flat indices
    into ``(R * T)``, ``(n,)`` each, the targets in row-major order.

    A target's predictor is the token before it in the same sequence; in the shared-prompt layout the
    first token of every completion is predicted by its row's last prompt token."""
    seq = batch.sequence_ids
    flat = torch.arange(seq.numel(), device=seq.device).view_as(seq)
    same = torch.zeros_like(batch.completion_mask)
    same[:, 1:] = seq[:, 1:] == seq[:, :-1]
    if batch.shared_prompt is None:
        target = flat[batch.completion_mask & same]
        return target - 1, target
    targets = batch.completion_mask & (seq >= 0)
    last_prompt = flat[:, :1] + batch.shared_prompt.sum(1, keepdim=True) - 1  # (R, 1): prompts start their rows
    return torch.where(same, flat - 1, last_prompt)[targets], flat[targets]


def scatter_to_completions(values: Tensor, sequence_index: Tensor, completion_mask: Tensor) -> Tensor:
    """Place per-target values (any order of sequences, in order within each) at ``(N, C)``."""
    order = torch.sort(sequence_index, stable=True).indices
    out = values.new_zeros(completion_mask.shape)
    return out.masked_scatter(completion_mask.bool(), values[order])


def completion_hidden(model: nn.Module, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states of the positions that predict completion tokens ``(n, H)``, their labels
    ``(n,)`` and sequence index ``(n,)``."""
    source, target = target_positions(batch)
    hidden = decoder_hidden(model, batch).flatten(0, 1)[source]
    return hidden, batch.input_ids.flatten()[target], batch.sequence_ids.flatten()[target]


def completion_logprobs(
    model: nn.Module,
    batch: SequenceBatch,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    hidden: tuple[Tensor, Tensor, Tensor] | None = None,
    fp32_head: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of the completion tokens at ``temperature`` ``(N, C)`` (0 elsewhere),
    and their entropies (detached) when asked. ``hidden`` reuses a :func:`completion_hidden`;
    ``fp32_head`` computes the logits in fp32 from a half-precision model (TRL's
    ``cast_lm_head_to_fp32``), outside any autocast."""
    states, labels, index = hidden if hidden is not None else completion_hidden(model, batch)
    head = lm_head_params(model)
    if fp32_head:
        states = states.float()
        head.update(weight=head["weight"].float(), bias=None if head["bias"] is None else head["bias"].float())
    with torch.autocast(states.device.type, enabled=False) if fp32_head else contextlib.nullcontext():
        stats = selected_logprobs(
            states, labels=labels, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy,
            with_accuracy=False, **head,
        )
    logps = scatter_to_completions(stats.logps, index, completion_mask)
    entropy = scatter_to_completions(stats.entropy, index, completion_mask) if with_entropy else None
    return logps, entropy


def completion_values(head: nn.Module, hidden: tuple[Tensor, Tensor, Tensor], completion_mask: Tensor) -> Tensor:
    """A scalar head (a critic) on the states before each completion token: ``(N, C)``.

    ``values[i, t]`` is the value of the state from which completion token ``t`` was sampled.
    """
    states, _, index = hidden
    return scatter_to_completions(head(states).squeeze(-1).float(), index, completion_mask)


def last_completion_run(batch: SequenceBatch) -> Tensor:
    """The tokens distilled, ``(R, T)`` bool: each sequence's last run of completion tokens (of assistant
    tokens too, when the chat template marks them), so a conversation trains on its last assistant turn."""
    mask = batch.completion_mask & (batch.sequence_ids >= 0)
    if batch.assistant_mask is not None:
        mask = mask & batch.assistant_mask
    seq = batch.sequence_ids
    continues = torch.zeros_like(mask)
    continues[:, 1:] = mask[:, :-1] & (seq[:, 1:] == seq[:, :-1])  # (R, T) the previous token is in the same run
    starts = mask & ~continues  # (R, T) first token of each run
    flat = torch.arange(mask.numel(), device=mask.device).view_as(mask)  # (R, T) row-major token index
    last_start = torch.full((int(seq.max()) + 1,), -1, dtype=torch.long, device=mask.device)
    last_start = last_start.scatter_reduce(0, seq[starts], flat[starts], "amax")  # (S,)
    return mask & (flat >= last_start[seq.clamp(min=0)])


def left_padded_prompts(batch: SequenceBatch, targets: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Each sequence's tokens before its first target, left-padded: ``(S, P)`` ids and mask (sequence order)."""
    ids, seq, tgt = batch.input_ids.flatten().tolist(), batch.sequence_ids.flatten().tolist(), targets.flatten().tolist()
    prompts: dict[int, list[int]] = {}
    done: set[int] = set()
    for token, s, is_target in zip(ids, seq, tgt):
        if s < 0 or s in done:
            continue
        if is_target:
            done.add(s)
        else:
            prompts.setdefault(s, []).append(token)
    rows = [prompts.get(s, []) for s in range(int(batch.sequence_ids.max()) + 1)]
    if not all(rows):
        raise ValueError(
            "sampling completes each sequence's prompt (the tokens before its completion), and a sequence of "
            "this batch has none: use prompt-completion or conversational data"
        )
    return left_pad(rows, pad_token_id, device=batch.input_ids.device)
