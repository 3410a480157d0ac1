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


def _targets(batch: SequenceBatch) -> Tensor:
    """Positions ``t`` whose next token is a completion token of the same sequence: ``(R, T-1)``."""
    same = batch.sequence_ids[:, 1:] == batch.sequence_ids[:, :-1]
    return batch.completion_mask[:, 1:] & same


def scatter_to_completions(values: Tensor, sequence_index: Tensor, completion_mask: Tensor) -> Tensor:
    """Place per-target values (any order of sequences, in order within each) at ``(N, C)``."""
    order = torch.sort(sequence_index, stable=True).indices
    out = values.new_zeros(completion_mask.shape)
    return out.masked_scatter(completion_mask.bool(), values[order])


def completion_hidden(model: nn.Module, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states of the positions that predict completion tokens ``(n, H)``, their labels
    ``(n,)`` and sequence index ``(n,)``."""
    mask = _targets(batch)
    hidden = decoder_hidden(model, batch)[:, :-1][mask]
    return hidden, batch.input_ids[:, 1:][mask], batch.sequence_ids[:, 1:][mask]


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
