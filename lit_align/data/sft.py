"""What the two SFT formats share: TRL's ``SFTConfig`` data fields (packing strategies,
``eval_packing``, tokenized rows, ``dataset_kwargs``) and streaming."""

from __future__ import annotations

from typing import Any, Literal, get_args

import datasets

from lit_align.data.base import AlignDataModule
from lit_align.data.sources import DataFormatError, column_names
from lit_align.data.tokenize import truncate
from lit_align.ops.packing import split_sequence, wrap_sequences

PackingStrategy = Literal["bfd", "bfd_split", "wrapped"]


class SFTDataModule(AlignDataModule):
    """What the two SFT formats share: TRL's ``SFTConfig`` data fields (not used directly).

    Rows that already hold ``input_ids`` (and optionally ``completion_mask`` and
    ``assistant_masks``) are used as tokenized, as TRL does."""

    accepts_token_ids = True
    pack_across_examples = True

    def __init__(
        self,
        *args: Any,
        packing_strategy: PackingStrategy = "bfd",
        eval_packing: bool | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
        streaming: bool = False,
        shuffle_buffer_size: int = 1000,
        group_by_length: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            packing_strategy: With ``packing``: ``bfd`` (best-fit decreasing; longer sequences are
                truncated), ``bfd_split`` (longer sequences are cut into pieces that are packed too)
                or ``wrapped`` (everything joined and cut every ``max_length`` tokens, ignoring
                document boundaries).
            eval_packing: Pack the validation split (None: as ``packing``).
            dataset_kwargs: TRL's; ``{skip_prepare_dataset: true}`` says the data is already
                tokenized (an ``input_ids`` column, which is also recognised without it).
            streaming: Read the data as it is iterated (``datasets`` streaming; TRL's
                ``dataset_streaming``), for corpora larger than memory: rows are tokenized, shuffled
                through a buffer and packed (in blocks of 1000 rows) as they come, each rank reads
                every world-size-th row, and a resumed run continues where the checkpoint stopped.
                ``eval_split`` must then be a split name.
            shuffle_buffer_size: Rows in the shuffle buffer of a streamed training split.
            group_by_length: As the other DataModules'; None: on, off when streaming (a stream is
                batched in the order it comes).
        """
        if group_by_length is None:
            group_by_length = not streaming
        if streaming and group_by_length:
            raise ValueError("group_by_length sorts the whole dataset by length; a stream is batched as it comes")
        super().__init__(*args, group_by_length=group_by_length, **kwargs)
        if streaming and isinstance(self.eval_split, float):
            raise ValueError(f"eval_split={self.eval_split} holds out a fraction of the whole dataset; with streaming give a split name")
        self.streaming = streaming
        self.shuffle_buffer_size = shuffle_buffer_size
        self.stream_loader = None
        if packing_strategy not in get_args(PackingStrategy):
            raise ValueError(f"packing_strategy must be one of {get_args(PackingStrategy)}, got {packing_strategy!r}")
        unknown = sorted(set(dataset_kwargs or {}) - {"skip_prepare_dataset"})
        if unknown:
            raise ValueError(f"dataset_kwargs: unknown keys {unknown}; the one TRL key is 'skip_prepare_dataset'")
        if eval_packing and self.max_length is None:
            raise ValueError("eval_packing needs max_length: it is the length of a packed row")
        self.packing_strategy = packing_strategy
        self.eval_packing = eval_packing
        self.dataset_kwargs = dict(dataset_kwargs or {})

    def module_options(self) -> tuple:
        return (*super().module_options(), self.requirements.assistant_masks)

    def prepare_splits(self, tokenizer) -> dict:
        if not self.streaming:
            return super().prepare_splits(tokenizer)
        splits = {"train": self.stream_split(self.split, True, tokenizer)}
        if self.eval_split:
            splits["val"] = self.stream_split(self.eval_split, False, tokenizer)
        return splits

    def stream_split(self, split: str, train: bool, tokenizer) -> datasets.IterableDataset:
        """A split as a stream: rows checked and tokenized as they are read (``tokenized``), shuffled
        through a seeded buffer (training), and packed in blocks of 1000 rows."""
        label = f"{'mixture' if self.mixture else self.dataset_name_or_path} [{split}] (streaming)"
        ds = self.tokenized(self.load_split(split, train, streaming=True), label, tokenizer)
        if train and (self.shuffle or self.shuffle_dataset):
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        packed = self.packs("train" if train else "val")
        if packed or self.cuts_instead_of_truncating:
            ds = ds.map(lambda block: self.pack_split(datasets.Dataset.from_dict(block), packed).to_dict(), batched=True,
                        batch_size=1000, remove_columns=column_names(ds))
        return ds

    def format_rows(self, ds, label: str):
        if self.dataset_kwargs.get("skip_prepare_dataset") and "input_ids" not in column_names(ds):
            raise DataFormatError(
                f"{label}: dataset_kwargs.skip_prepare_dataset says the data is tokenized, but it has no 'input_ids' "
                f"column (found: {', '.join(column_names(ds))})"
            )
        return ds

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.stream_loader is not None and self.trainer is not None and self.trainer.training:
            self.stream_loader.trained += 1  # a batch that reached the training step (see StreamLoader)
        return batch

    def packs(self, split: str) -> bool:
        return self.packing if split == "train" or self.eval_packing is None else self.eval_packing

    @property
    def cuts_instead_of_truncating(self) -> bool:
        return self.packing and self.packing_strategy != "bfd"

    def truncate(self, seq: dict[str, list[int]]) -> dict[str, list[int]]:
        return seq if self.cuts_instead_of_truncating else super().truncate(seq)

    def pack_split(self, ds: datasets.Dataset, packed: bool) -> datasets.Dataset:
        if self.cuts_instead_of_truncating and not packed:  # this split is not packed: truncate it after all
            ds = ds.map(lambda row: _truncated(row, self.max_length, self.truncation_mode), keep_in_memory=True, desc="Truncating")
            return ds.filter(lambda mask: any(map(any, mask)), input_columns="completion_mask", keep_in_memory=True)
        if not packed or self.packing_strategy == "bfd":
            return super().pack_split(ds, packed)
        token_fields = [c for c in ds.column_names if c != "length"]
        cols = {k: ds[k] for k in token_fields}
        sequences = [{k: cols[k][i][j] for k in token_fields} for i in range(len(ds)) for j in range(len(cols["input_ids"][i]))]
        if self.packing_strategy == "wrapped":
            pieces = wrap_sequences(sequences, self.max_length)
        else:
            pieces = [p for seq in sequences for p in split_sequence(seq, self.max_length)]
        pieces = [p for p in pieces if any(p["completion_mask"])]
        ds = datasets.Dataset.from_dict({
            **{k: [[p[k]] for p in pieces] for k in token_fields}, "length": [len(p["input_ids"]) for p in pieces]
        })
        return ds if self.packing_strategy == "wrapped" else self._pack(ds)


def _truncated(row: dict, max_length: int, mode: str) -> dict:
    """A prepared row (token fields holding lists of sequences) with every sequence cut to ``max_length``."""
    keys = [k for k in row if k != "length"]
    cut = [truncate(dict(zip(keys, values)), max_length, mode) for values in zip(*(row[k] for k in keys))]
    return {**{k: [c[k] for c in cut] for k in cut[0]}, "length": sum(len(c["input_ids"]) for c in cut)}
