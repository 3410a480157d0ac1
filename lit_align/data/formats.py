"""The six data formats, one DataModule each, named by format (docs/architecture.md, docs/methods.md §16)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from lit_align.data.base import AlignDataModule, TokenizedRow
from lit_align.data.sft import SFTDataModule
from lit_align.data.sources import Column, DataFormatError, check_same_form, column_names
from lit_align.data.tokenize import (
    is_conversational,
    render_prompt,
    supports_assistant_mask,
    tokenize_pair,
    tokenize_prompt_completion,
    tokenize_steps,
    tokenize_text,
)
from lit_align.data.vision import load_image, row_images
from lit_align.imports import import_object
from lit_align.ops.packing import left_pad

TEXT_OR_CHAT = ("text", "messages")


class LanguageModelingDataModule(SFTDataModule):
    """Whole documents: a ``text`` column, or conversations in ``messages``.

    Every token is trained on. Conversational rows also carry an assistant mask for SFT's
    ``assistant_only_loss``: the chat template's ``{% generation %}`` markers where it has them,
    else the assistant turns found by rendering the conversation turn by turn.
    """

    format = "language_modeling"
    columns = [Column("text", TEXT_OR_CHAT, optional=True), Column("messages", ("messages",), optional=True)]

    def __init__(
        self, *args: Any, dataset_text_field: str = "text", formatting_func: str | Callable | None = None, **kwargs: Any
    ) -> None:
        """
        Args:
            dataset_text_field: The column holding the text (TRL's; default ``text``).
            formatting_func: A function ``row -> str`` that makes each row's text (TRL's), or its
                import path (``my_project.data:format_row``).
        """
        super().__init__(*args, **kwargs)
        self.dataset_text_field = dataset_text_field
        self.formatting_func = formatting_func

    def check_row_values(self, row: dict, index: int, label: str) -> None:
        if row.get("text") is None and row.get("messages") is None:
            raise DataFormatError(
                f"{label}: row {index} has neither 'text' nor 'messages' (expected a 'text' string "
                "or a 'messages' list of {'role', 'content'} dicts)"
            )

    def format_rows(self, ds, label: str):
        ds = super().format_rows(ds, label)
        names = column_names(ds)
        if "input_ids" in names:
            return ds
        if self.formatting_func is not None:
            ds = _formatted(ds, self.formatting_func, label)
        elif self.dataset_text_field != "text":
            if self.dataset_text_field not in names:
                raise DataFormatError(
                    f"{label}: dataset_text_field={self.dataset_text_field!r} is not a column (found: {', '.join(names)})"
                )
            ds = ds.remove_columns([c for c in ("text",) if c in names]).rename_column(self.dataset_text_field, "text")
        names = column_names(ds)
        if "text" not in names and "messages" not in names:
            if "conversations" not in names:
                raise DataFormatError(
                    f"{label}: LanguageModelingDataModule needs a 'text' or a 'messages' column "
                    f"(found: {', '.join(names)}); name another text column with dataset_text_field, "
                    "or make the text with formatting_func"
                )
            ds = ds.map(_sharegpt_to_chatml, remove_columns=["conversations"], **_in_memory(ds, "Converting to ChatML"))
        return ds

    def tokenize_row(self, row: dict, tokenizer) -> TokenizedRow:
        text = row.get("messages") if row.get("messages") is not None else row["text"]
        mask = is_conversational(text) and (supports_assistant_mask(tokenizer) or self.requirements.assistant_masks)
        return [tokenize_text(tokenizer, text, row, assistant_mask=mask)], {}


def _formatted(ds: datasets.Dataset, formatting_func: str | Callable, label: str) -> datasets.Dataset:
    """Each row's ``text`` made by ``formatting_func`` (checked to be a string)."""
    func = import_object(formatting_func, "formatting_func") if isinstance(formatting_func, str) else formatting_func
    name = getattr(func, "__name__", repr(func))

    def one(row: dict, index: int) -> dict:
        text = func(row)
        if not isinstance(text, str):
            raise DataFormatError(f"{label}: formatting_func {name} returned {type(text).__name__} for row {index}; expected a string")
        return {"text": text}

    return ds.map(one, with_indices=True, remove_columns=column_names(ds), **_in_memory(ds, f"Formatting with {name}"))


def _in_memory(ds, desc: str) -> dict[str, Any]:
    """``map`` arguments of an in-memory dataset (a stream's ``map`` takes neither)."""
    return {"keep_in_memory": True, "desc": desc} if isinstance(ds, datasets.Dataset) else {}


def _sharegpt_to_chatml(row: dict) -> dict:
    roles = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
    return {"messages": [{"role": roles.get(m["from"], m["from"]), "content": m["value"]} for m in row["conversations"]]}


class PromptCompletionDataModule(SFTDataModule):
    """``prompt`` and ``completion`` (strings, or message lists); the loss mask marks the completion."""

    format = "prompt_completion"
    columns = [Column("prompt", TEXT_OR_CHAT), Column("completion", TEXT_OR_CHAT)]

    def check_row_values(self, row: dict, index: int, label: str) -> None:
        check_same_form(row, index, ["prompt", "completion"], label)

    def tokenize_row(self, row: dict, tokenizer) -> TokenizedRow:
        mask = is_conversational(row["prompt"]) and (supports_assistant_mask(tokenizer) or self.requirements.assistant_masks)
        return [tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"], row, assistant_mask=mask)], {}


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Implicit prompt (TRL ``extract_prompt``): the longest common prefix of chosen and rejected.

    Message lists split at the first differing message; strings at the first differing
    character, stepping back over one space so the completion keeps its leading space.
    Departs from TRL in two edge cases where TRL's loop index misfires: when one completion is
    a prefix of the other (TRL cuts one character early: ``"Yes"``/``"Yes, because"`` gives it
    the prompt ``"Ye"``) and when the very first character differs (TRL's ``idx - 1`` wraps).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


class PreferenceDataModule(AlignDataModule):
    """``prompt`` (optional: else extracted), ``chosen``, ``rejected``: each pair is two sequences.

    Sequence ``i`` of a batch of ``E`` pairs is prompt+chosen of pair ``i``, sequence ``E+i``
    prompt+rejected (TRL's concatenated layout). With ``packing`` both are packed within the
    batch into rows of ``max_length``. An optional ``margin`` column reaches the reward model.
    Prompts are tokenized as TRL's DPO does; for CPO and ORPO (``add_bos_to_prompt``) they also
    get the tokenizer's BOS token, as TRL's CPO/ORPO give them.
    """

    format = "preference"
    columns = [
        Column("prompt", TEXT_OR_CHAT, optional=True),
        Column("chosen", TEXT_OR_CHAT),
        Column("rejected", TEXT_OR_CHAT),
        Column("margin", ("any",), optional=True),
    ]

    def __init__(self, *args: Any, add_bos_to_prompt: bool | None = None, **kwargs: Any) -> None:
        """
        Args:
            add_bos_to_prompt: Put the tokenizer's BOS token before every prompt that does not start
                with it (TRL's CPO/ORPO rule; no effect with a tokenizer that has no BOS token). None:
                when the module being trained asks for it (its ``add_bos_to_prompt``: CPO and ORPO);
                set it when preparing data without a Trainer.
        """
        super().__init__(*args, **kwargs)
        self.add_bos_to_prompt = add_bos_to_prompt
        self._bos = bool(add_bos_to_prompt)  # resolved against the module being trained in _prepare

    def _wants_bos(self) -> bool:
        if self.add_bos_to_prompt is not None:
            return self.add_bos_to_prompt
        return self.requirements.add_bos_to_prompt

    def module_options(self) -> tuple:
        return (*super().module_options(), self._wants_bos())

    def _prepare(self, ds, label, tokenizer):
        self._bos = self._wants_bos()
        return super()._prepare(ds, label, tokenizer)

    def check_row_values(self, row: dict, index: int, label: str) -> None:
        check_same_form(row, index, ["prompt", "chosen", "rejected"], label)
        if row["chosen"] == row["rejected"]:
            raise DataFormatError(
                f"{label}: row {index}: 'chosen' and 'rejected' are identical; a preference pair needs "
                "two different completions"
            )
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)):
            raise DataFormatError(f"{label}: row {index}: 'margin' is {margin!r}; expected a finite number (or null)")

    def tokenize_row(self, row: dict, tokenizer) -> TokenizedRow:
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if prompt is None:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        seqs = tokenize_pair(tokenizer, prompt, chosen, rejected, row, bos=self._bos)
        return seqs, ({"margin": float(row["margin"] or 0.0)} if "margin" in row else {})


class UnpairedPreferenceDataModule(AlignDataModule):
    """``prompt``, ``completion``, ``label`` (a boolean: desirable or not).

    Preference pairs (``chosen``/``rejected``) are unpaired on the fly, each pair giving a
    desirable and an undesirable row, in TRL's order (``unpair_preference_dataset``). For KTO each
    row also carries a *mismatched* sequence, its prompt followed by the previous row's
    completion (sequence ``E + i`` of a batch), from which the KL term is estimated.
    """

    format = "unpaired_preference"
    columns = [Column("prompt", TEXT_OR_CHAT), Column("completion", TEXT_OR_CHAT), Column("label", ("bool",))]

    def __init__(self, *args: Any, kl_pairs: bool | None = None, **kwargs: Any) -> None:
        """
        Args:
            kl_pairs: Add the mismatched (KL) sequences. None: when the module being trained asks
                for them (KTO with ``loss_type="kto"``).
        """
        super().__init__(*args, **kwargs)
        self.kl_pairs = kl_pairs

    def _prepare(self, ds, label, tokenizer):
        if "label" not in ds.column_names and {"chosen", "rejected"} <= set(ds.column_names):
            ds = ds.map(_unpair, batched=True, remove_columns=ds.column_names, desc="Unpairing preferences")
        return self._finish(super()._prepare(ds, label, tokenizer))

    def check_row_values(self, row: dict, index: int, label: str) -> None:
        check_same_form(row, index, ["prompt", "completion"], label)

    def tokenize_row(self, row: dict, tokenizer) -> TokenizedRow:
        seq = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"], row)
        start = seq["completion_mask"].index(1) if 1 in seq["completion_mask"] else len(seq["input_ids"])
        # The untruncated halves, from which the KL pairs are built (TRL cuts prompt_i + completion_{i-1}
        # as a whole, not the already cut row).
        halves = {"prompt_ids": seq["input_ids"][:start], "completion_ids": seq["input_ids"][start:]}
        return [seq], {"label": bool(row["label"]), **halves}

    def _wants_kl_pairs(self) -> bool:
        if self.kl_pairs is not None:
            return self.kl_pairs
        return self.requirements.kl_pairs

    def module_options(self) -> tuple:
        return (*super().module_options(), self._wants_kl_pairs())

    def _finish(self, ds: datasets.Dataset) -> datasets.Dataset:
        if self._wants_kl_pairs():
            ds = add_kl_sequences(ds, self.truncate)
        return ds.remove_columns(["prompt_ids", "completion_ids"])


def add_kl_sequences(ds: datasets.Dataset, truncate) -> datasets.Dataset:
    """Give row ``i`` a second sequence: its prompt and row ``i - 1``'s completion (KTO's KL pairs),
    cut by ``truncate`` as a whole, from the untruncated ``prompt_ids``/``completion_ids`` columns.

    TRL rotates completions by one within each block of ``per_device_train_batch_size`` rows
    and then forces sequential sampling so blocks stay batches; rotating over the whole dataset
    gives every row the same kind of mismatched pair, fixed per row (so reference log-probs can
    be precomputed) and independent of the order batches are drawn in. On one block of rows the
    two constructions are identical.
    """
    prompts, completions = ds["prompt_ids"], ds["completion_ids"]
    ids, masks = ds["input_ids"], ds["completion_mask"]
    pairs_ids, pairs_masks = [], []
    for i in range(len(ds)):
        previous = completions[i - 1]
        kl = truncate({"input_ids": prompts[i] + previous, "completion_mask": [0] * len(prompts[i]) + [1] * len(previous)})
        pairs_ids.append([ids[i][0], kl["input_ids"]])
        pairs_masks.append([masks[i][0], kl["completion_mask"]])
    lengths = [sum(len(s) for s in pair) for pair in pairs_ids]
    rest = {c: ds[c] for c in ds.column_names if c not in ("input_ids", "completion_mask", "length")}
    return datasets.Dataset.from_dict({**rest, "input_ids": pairs_ids, "completion_mask": pairs_masks, "length": lengths})


def _unpair(batch: dict[str, list]) -> dict[str, list]:
    """TRL's ``unpair_preference_dataset`` on one map batch: the chosen rows (``label`` True), then the
    rejected rows (False), other columns copied onto both."""
    n = len(batch["chosen"])
    prompts = batch["prompt"] if "prompt" in batch else [None] * n
    split = [extract_prompt(c, r) if p is None else (p, c, r) for p, c, r in zip(prompts, batch["chosen"], batch["rejected"])]
    extra = {k: v + v for k, v in batch.items() if k not in ("prompt", "chosen", "rejected")}
    return {
        "prompt": [p for p, _, _ in split] * 2,
        "completion": [c for _, c, _ in split] + [r for _, _, r in split],
        "label": [True] * n + [False] * n,
        **extra,
    }


class StepwiseDataModule(AlignDataModule):
    """``prompt``, ``completions`` (the steps) and ``labels`` (one boolean per step).

    Each step is followed by ``step_separator``; its label sits on the step's last token
    (``step_labels``), -100 elsewhere, as TRL's PRM tokenization does.
    """

    format = "stepwise"
    columns = [Column("prompt", ("text",)), Column("completions", ("text_list",)), Column("labels", ("bool_list",))]

    def __init__(self, *args: Any, step_separator: str = "\n", **kwargs: Any) -> None:
        """
        Args:
            step_separator: Text appended to every step; the label of a step sits on its last token.
        """
        super().__init__(*args, **kwargs)
        self.step_separator = step_separator

    def check_row_values(self, row: dict, index: int, label: str) -> None:
        if len(row["completions"]) != len(row["labels"]):
            raise DataFormatError(
                f"{label}: row {index}: 'completions' has {len(row['completions'])} steps but 'labels' has "
                f"{len(row['labels'])}; expected one boolean label per step"
            )

    def tokenize_row(self, row: dict, tokenizer) -> TokenizedRow:
        return [tokenize_steps(tokenizer, row["prompt"], row["completions"], row["labels"], self.step_separator)], {}

    def usable(self, seq: dict[str, list[int]]) -> bool:
        return any(v != -100 for v in seq["step_labels"])


class PromptOnlyDataModule(AlignDataModule):
    """``prompt`` plus any extra columns, which reach reward functions as keyword arguments.

    Batches hold left-padded prompt ids for generation (:class:`PromptBatch`). Trained with an
    online method, ``batch_size`` counts completions (TRL's rule): a batch has
    ``batch_size / num_generations`` prompts, each repeated ``num_iterations`` steps in a row.
    """

    format = "prompt_only"
    columns = [Column("prompt", TEXT_OR_CHAT)]

    def __init__(self, *args: Any, group_by_length: bool = False, shuffle_dataset: bool | None = None, **kwargs: Any) -> None:
        """
        Args:
            shuffle_dataset: TRL's GRPO/RLOO field: draw prompts in a new random order each epoch
                (True) or in the data's order (False); the same as ``shuffle``, which it sets when given.
            group_by_length: Batch prompts of similar length together. Off by default, as TRL's
                samplers draw prompts at random: generation pads little, and length-sorted batches
                make the reward curve follow prompt length (longer prompts are often harder ones)
                rather than learning.
        """
        if shuffle_dataset is not None:
            if kwargs.get("shuffle", shuffle_dataset) != shuffle_dataset:
                raise ValueError(f"shuffle_dataset={shuffle_dataset} contradicts shuffle={kwargs['shuffle']}: they are one setting "
                                 "for prompt-only data (TRL's name and lit-align's); give one")
            kwargs["shuffle"] = shuffle_dataset
        super().__init__(*args, group_by_length=group_by_length, **kwargs)

    def keep_columns(self, ds: datasets.Dataset) -> set[str]:
        return set(ds.column_names)

    def tokenize_row(self, row: dict, tokenizer) -> TokenizedRow:
        ids = render_prompt(tokenizer, row["prompt"], row)
        return [{"input_ids": ids, "completion_mask": [0] * len(ids)}], {}

    def truncate(self, seq: dict[str, list[int]]) -> dict[str, list[int]]:
        return seq  # prompts are never cut: a cut prompt asks a different question

    def usable(self, seq: dict[str, list[int]]) -> bool:
        # The completion needs room too; a prompt that fills max_length is dropped and counted.
        return self.max_length is None or len(seq["input_ids"]) < self.max_length

    def collate(self, items: list[dict], split: str = "train") -> PromptBatch:
        batch = collate_prompts(items, self.pad_token_id, self.pad_to_multiple_of)
        if self.image_tokens is not None and any(row_images(it) for it in items):  # each prompt's pixels, for generation
            batch.vision_rows = [self.image_tokens.pixels([load_image(v, f"batch row {i}") for v in row_images(it)])
                                 for i, it in enumerate(items)]
        return batch

    def loader_batch_size(self, train: bool) -> int:
        """``batch_size`` counts completions, as TRL's ``per_device_train_batch_size`` does: a
        batch holds ``batch_size / num_generations`` prompts of the module being trained, times
        its ``steps_per_generation`` in training (one rollout serves that many steps)."""
        size = super().loader_batch_size(train)
        req = self.requirements
        G = req.rows_per_prompt if train or req.eval_rows_per_prompt is None else req.eval_rows_per_prompt
        if size % G:
            name = "batch_size" if train else "eval_batch_size"
            what = "num_generations" if train or req.eval_rows_per_prompt is None else "num_generations_eval"
            raise ValueError(
                f"{type(self).__name__}: {name}={size} counts completions and must be divisible by "
                f"{what}={G} (each prompt gets {G} completions); use for example {name}={G * max(1, size // G)}"
            )
        return size // G * (req.generation_steps if train else 1)

    def batch_repeats(self) -> int:
        return self.requirements.batch_repeats


@dataclass
class PromptBatch:
    """Left-padded prompts for generation, the raw prompts, and the extra columns."""

    prompt_ids: torch.Tensor  # (E, P) long, left-padded
    prompt_mask: torch.Tensor  # (E, P) long, 0 on padding
    prompts: list  # the raw prompts (strings or message lists)
    extras: dict[str, list] = field(default_factory=dict)  # extra columns, for reward functions
    rollout: Any = None  # set by the rollout callback before training_step (a lit_align.rollout.Rollout)
    vision_rows: list[dict[str, torch.Tensor]] | None = None  # a VLM's image inputs of each prompt (its pixels, grids)

    def __len__(self) -> int:
        return len(self.prompts)


def collate_prompts(items: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> PromptBatch:
    prompt_ids, prompt_mask = left_pad([it["input_ids"][0] for it in items], pad_token_id, pad_to_multiple_of)
    skip = {"input_ids", "completion_mask", "length", "prompt"}
    extras = {k: [it[k] for it in items] for k in items[0] if k not in skip}
    return PromptBatch(prompt_ids, prompt_mask, [it["prompt"] for it in items], extras)
