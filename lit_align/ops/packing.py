"""Packing sequences into rows of bounded length, and the batch layout every method reads.

Every batch is a set of *sequences* laid out in *rows*:

- padded: one sequence per row, right-padded; positions run on through the padding, so the
  causal mask alone is right and the forward gets no attention mask (``attention_mask`` is
  still provided, for code that wants it);
- packed: several sequences per row (best-fit decreasing into ``capacity`` tokens),
  position ids restarting at 0 for each sequence and no attention mask, so
  transformers builds a block-diagonal causal mask (it only does so when the forward
  gets no attention mask and no cache: pass ``use_cache=False``);
- padding-free: every sequence of the batch in a single row (the packed layout with
  one bin), meant for variable-length flash attention;
- shared prompt (rollouts only, :func:`lit_align.ops.completions.shared_prompt_batch`): one row
  per group of completions of one prompt, the prompt once and then each completion, with an
  explicit attention mask (each completion sees the prompt and itself).

``sequence_ids`` says which sequence each token belongs to (-1 on padding), so
per-sequence sums (DPO's log-probs of chosen and rejected) read the same in all three.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """A collated batch of token sequences (see the module docstring for layouts).

    Sequence ``s`` of a batch of ``E`` examples with ``k`` sequences each is sequence
    ``j`` of example ``i`` where ``s = j * E + i``: for preference pairs the first ``E``
    sequences are the chosen ones and the last ``E`` the rejected ones.
    """

    input_ids: Tensor  # (R, T) long
    position_ids: Tensor  # (R, T) long, restarting at 0 for each sequence
    sequence_ids: Tensor  # (R, T) long, -1 on padding
    completion_mask: Tensor  # (R, T) bool: tokens that are targets of the completion loss
    attention_mask: Tensor | None = None  # (R, T) long, padded layout only (for users; the forward needs none)
    assistant_mask: Tensor | None = None  # (R, T) bool, conversational data whose template marks turns
    step_labels: Tensor | None = None  # (R, T) long, -100 but on the token closing a step (PRM)
    labels: Tensor | None = None  # (E,) per-example labels (unpaired preference: desirable or not)
    margin: Tensor | None = None  # (E,) per-pair margins (reward model)
    ref_logps: Tensor | None = None  # (S,) precomputed reference log-probs, when the data carries them
    vision: dict[str, Tensor] | None = None  # a VLM's image inputs: pixel_values (every image of every row, in row order), grids
    shared_prompt: Tensor | None = None  # (R, T) bool: a prompt every sequence of its row continues (ops.completions.shared_prompt_batch)
    num_sequences: int = 0
    num_examples: int = 0

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.sequence_ids >= 0).sum())

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def shared_prompt_attention(batch: SequenceBatch) -> Tensor:
    """Who attends to whom in the shared-prompt layout (:func:`lit_align.ops.completions.shared_prompt_batch`):
    ``(R, 1, T, T)`` bool, True where query ``i`` sees key ``j``: ``j <= i`` in the same sequence or in the
    row's prompt; padding sees itself only."""
    seq, shared = batch.sequence_ids, batch.shared_prompt
    width = seq.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=seq.device).tril()
    real = seq >= 0
    sees = ((seq[:, :, None] == seq[:, None, :]) | shared[:, None, :]) & real[:, :, None] & real[:, None, :] & causal
    return (sees | torch.eye(width, dtype=torch.bool, device=seq.device))[:, None]


def split_sequence(seq: dict[str, list[int]], capacity: int) -> list[dict[str, list[int]]]:
    """``seq`` cut into pieces of at most ``capacity`` tokens (every key cut at the same places):
    TRL's ``bfd_split`` keeps what ``bfd`` would truncate, as further sequences."""
    n = len(seq["input_ids"])
    return [{k: v[start : start + capacity] for k, v in seq.items()} for start in range(0, max(n, 1), capacity)]


def wrap_sequences(seqs: Sequence[dict[str, list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """TRL's ``wrapped`` packing: every sequence joined end to end, then cut every ``capacity``
    tokens regardless of where sequences end (a piece may attend across a document boundary)."""
    keys = [k for k in seqs[0] if all(k in s for s in seqs)]
    joined = {k: [t for s in seqs for t in s[k]] for k in keys}
    return split_sequence(joined, capacity)


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped in bins of at most ``capacity``.

    Longest first, each into the fullest bin that still has room (``bisect`` over the
    sorted free space keeps it O(n log n)). Lengths above ``capacity`` get a bin each.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        need = lengths[i]
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (space - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, multiple_of: int | None = None,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Token-id rows left-padded for generation: ``(R, W)`` ids and 0/1 mask (``W`` rounded up to
    ``multiple_of`` when given)."""
    width = max(len(r) for r in rows)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _pad_value(name: str, pad_token_id: int) -> int:
    return {"input_ids": pad_token_id, "step_labels": IGNORE_INDEX}.get(name, 0)


def collate_sequences(
    sequences: list[dict[str, list[int]]],
    pad_token_id: int,
    layout: str = "padded",
    capacity: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Lay sequences out in rows (``layout``: ``padded``, ``packed`` or ``padding_free``), the
    row width rounded up to a multiple of ``pad_to_multiple_of`` when given.

    Each sequence is a dict of equal-length token lists (``input_ids``, ``completion_mask``
    and optionally ``assistant_mask``, ``step_labels``). Returns the tensor fields of
    :class:`SequenceBatch`.
    """
    if layout == "padded":
        rows = [[i] for i in range(len(sequences))]
    elif layout == "packed":
        if capacity is None:
            raise ValueError("the packed layout needs a capacity (the row length, max_length)")
        rows = pack_bfd([len(s["input_ids"]) for s in sequences], capacity)
    elif layout == "padding_free":
        rows = [list(range(len(sequences)))]
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'padded', 'packed' or 'padding_free'")
    keys = [k for k in sequences[0] if isinstance(sequences[0][k], list)]
    width = max(sum(len(sequences[i]["input_ids"]) for i in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = {k: torch.full((len(rows), width), _pad_value(k, pad_token_id), dtype=torch.long) for k in keys}
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(sequences[i]["input_ids"])
            for k in keys:
                out[k][r, start : start + n] = torch.tensor(sequences[i][k], dtype=torch.long)
            position_ids[r, start : start + n] = torch.arange(n)
            sequence_ids[r, start : start + n] = i
            start += n
        if layout == "padded":
            # Right padding continues the row's positions: with one sequence per row and the padding
            # last, no real token can attend to it, so the model needs no attention mask and takes
            # the plain causal path (about 20% faster on CPU than a dense padding mask).
            position_ids[r, start:] = torch.arange(start, width)
        else:
            # Padding forms a segment of its own (positions restart), so in the packed layouts it
            # attends only to itself and never to a real sequence.
            position_ids[r, start:] = torch.arange(width - start)
    out["position_ids"] = position_ids
    out["sequence_ids"] = sequence_ids
    if layout == "padded":
        out["attention_mask"] = (sequence_ids >= 0).long()
    for k in ("completion_mask", "assistant_mask"):
        if k in out:
            out[k] = out[k].bool()
    return out


def collate_examples(
    items: list[dict], pad_token_id: int, layout: str, capacity: int | None, pad_to_multiple_of: int | None = None
) -> SequenceBatch:
    """Collate tokenized examples into a :class:`SequenceBatch`.

    When every example holds the same number ``k`` of sequences (pairs: ``k = 2``), sequence
    ``j`` of example ``i`` becomes sequence ``j * E + i``; packed SFT rows hold varying
    numbers and are taken in order.
    """
    counts = {len(item["input_ids"]) for item in items}
    fields = [k for k in ("input_ids", "completion_mask", "assistant_mask", "step_labels") if k in items[0]]
    if len(counts) == 1:
        k = counts.pop()
        pairs = [(i, j) for j in range(k) for i in range(len(items))]
    else:
        pairs = [(i, j) for i, item in enumerate(items) for j in range(len(item["input_ids"]))]
    sequences = [{f: items[i][f][j] for f in fields} for i, j in pairs]
    tensors = collate_sequences(sequences, pad_token_id, layout, capacity, pad_to_multiple_of)
    labels = torch.tensor([bool(it["label"]) for it in items]) if "label" in items[0] else None
    margin = torch.tensor([float(it["margin"]) for it in items]) if "margin" in items[0] else None
    ref = [it["ref_logps"] for it in items] if "ref_logps" in items[0] else None
    return SequenceBatch(
        **tensors,
        labels=labels,
        margin=margin,
        ref_logps=torch.tensor(ref, dtype=torch.float32).T.reshape(-1) if ref is not None else None,
        num_sequences=len(sequences),
        num_examples=len(items),
    )
