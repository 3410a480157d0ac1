"""The DataModule base: load, check, tokenize (with a progress bar), split, sample, collate.

A format subclass says which columns it reads (``columns``), how one row becomes token
sequences (``tokenize_row``) and, where it differs, how a batch is collated.
"""

from __future__ import annotations

import functools
import uuid
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import datasets
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, SequentialSampler
from transformers import PreTrainedTokenizerBase

from lit_align.data.sampler import ResumableLoader, ShardedSampler
from lit_align.data.sources import (
    Column,
    DataFormatError,
    check_columns,
    check_row,
    column_names,
    load_mixture,
    load_source,
    rename_columns,
)
from lit_align.data.streaming import StreamLoader
from lit_align.data.tokenize import truncate
from lit_align.data.vision import IMAGE_COLUMNS, ImageTokens, load_image, row_images, structured_row
from lit_align.models.loading import tokenizer_pad_id
from lit_align.ops.packing import collate_examples, pack_bfd

Layout = Literal["padded", "packed", "padding_free"]

# No eval split is a choice, not a mistake: an empty val loader is how a DataModule says so.
warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")


TokenizedRow = tuple[list[dict[str, list[int]]], dict[str, Any]]  # a row's token sequences and per-row values

@dataclass(frozen=True)
class DataRequirements:
    """What the method being trained asks of its data: declared by the module
    (``AlignModule.data_requirements()``), received once by the DataModule (``connect``) when a
    fit sets the data up. Set them with ``connect`` to prepare data without a Trainer."""

    tokenizer_name_or_path: str | None = None  # the policy's tokenizer
    tokenizer: Any = field(default=None, compare=False, repr=False)  # that tokenizer as the module reads it
    rows_per_prompt: int = 1  # completions per prompt (GRPO's num_generations): a prompt batch_size counts them
    batch_repeats: int = 1  # each prompt batch served this many times in a row (num_iterations x generation_steps)
    generation_steps: int = 1  # training steps one prompt batch serves (steps_per_generation): it holds their prompts
    eval_rows_per_prompt: int | None = None  # completions per prompt in validation (None: rows_per_prompt)
    kl_pairs: bool = False  # KTO: mismatched (prompt, completion) pairs for the KL estimate
    add_bos_to_prompt: bool = False  # CPO/ORPO: the tokenizer's BOS before every prompt
    assistant_masks: bool = False  # SFT's assistant_only_loss: mark assistant tokens, with or without {% generation %}
    drop_overlong: bool = False  # RewardModel: a row with a sequence over max_length is dropped, not truncated (TRL)
    tool_schemas: str | None = None  # JSON tool schemas every conversational prompt is rendered with (a row's own win)
    processor: Any = field(default=None, compare=False, repr=False)  # a vision-language policy's processor (None: text)


class AlignDataModule(L.LightningDataModule, ABC):
    """Base class of the six format DataModules (not used directly)."""

    format: ClassVar[str] = ""
    columns: ClassVar[list[Column]] = []
    # Formats whose examples are single documents pack across examples, as TRL's SFT does
    # (a batch is then ``batch_size`` rows of ``max_length``); the others pack within a batch.
    pack_across_examples: ClassVar[bool] = False

    def __init__(
        self,
        dataset_name_or_path: str = "builtin:arithmetic",
        split: str = "train",
        eval_split: float | str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int | None = 1024,
        truncation_mode: Literal["keep_start", "keep_end"] = "keep_start",
        packing: bool = False,
        padding_free: bool = False,
        group_by_length: bool = True,
        shuffle: bool = True,
        shuffle_dataset: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        dataset_num_proc: int | None = None,
        tokenizer_name_or_path: str | None = None,
        dataset_config: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        column_mapping: dict[str, str] | None = None,
        mixture: list[dict[str, Any]] | None = None,
        pad_to_multiple_of: int | Literal["auto"] | None = "auto",
        padding_value: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            dataset_name_or_path: A Hub dataset id, a local directory (``save_to_disk`` output or
                data files), a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, or the embedded
                task ``builtin:arithmetic`` (options as a query: ``builtin:arithmetic?size=2000&seed=1``).
            split: The training split.
            eval_split: The validation split: a split name, a fraction of ``split`` held out
                (for example 0.1), or None for no validation.
            batch_size: Examples per batch on each device (rows of ``max_length`` when SFT data is packed).
            eval_batch_size: Batch size for validation and test (default: ``batch_size``).
            max_length: Longest sequence in tokens; longer ones are truncated, and rows left with
                nothing to learn from (prompt alone too long) are dropped and counted. None: no limit.
            truncation_mode: Keep the start (``keep_start``) or the end (``keep_end``) of long sequences.
            packing: Pack sequences into rows of ``max_length`` (best-fit decreasing) with position
                ids restarting per sequence: no padding, no cross-attention between sequences.
            padding_free: Put a whole batch in one row (for variable-length flash attention on GPU;
                on CPU attention cost grows with the square of the row, prefer ``packing``).
            group_by_length: Batch examples of similar length together (training only).
            shuffle: Shuffle the training data each epoch.
            shuffle_dataset: Shuffle the prepared training rows once, seeded by ``seed``, before packing
                (TRL's SFT: rows packed together then come from anywhere in the data); a stream shuffles
                through its buffer.
            seed: Seed of shuffling and of the eval fraction split.
            num_workers: DataLoader worker processes.
            dataset_num_proc: Processes for tokenization (None: in process).
            tokenizer_name_or_path: Where the tokenizer comes from. The CLI links it to the model's
                ``model_name_or_path``; in Python call ``connect(tokenizer)``, or leave it empty and
                the tokenizer of the module being trained is used.
            dataset_config: The Hub dataset's configuration (``name`` of ``datasets.load_dataset``; TRL's
                ``dataset_config``).
            data_dir: The directory of a Hub dataset or local directory to read (as ``datasets.load_dataset``).
            data_files: Which files of it to read (as ``datasets.load_dataset``).
            column_mapping: Rename columns to the format's names, e.g. ``{question: prompt, answer: completion}``.
            mixture: Several sources trained on as one (TRL's ``DatasetMixtureConfig.datasets``), in place of
                ``dataset_name_or_path``: ``[{path, name?, data_dir?, data_files?, split?, columns?, fraction?}]``;
                ``columns`` keeps (a list) or renames (a mapping) columns, ``fraction`` takes that share of a
                source's rows. A named ``eval_split`` is read from every source.
            pad_to_multiple_of: Round every batch's row width up to a multiple of this (TRL's; ``auto``:
                no rounding, as TRL off Neuron devices).
            padding_value: The id that pads ``input_ids`` (TRL's; None: the tokenizer's pad token). Masks
                mark padding, so the value changes no loss.
            chat_template_kwargs: Extra variables for the chat template of every conversational row
                (TRL's; a row's own ``chat_template_kwargs`` column adds to them and wins).
        """
        super().__init__()
        if packing and padding_free:
            raise ValueError("choose one of packing=True and padding_free=True (padding_free already packs the batch)")
        if packing and max_length is None:
            raise ValueError("packing needs max_length: it is the length of a packed row")
        self.dataset_name_or_path = dataset_name_or_path
        self.split = split
        self.eval_split = _fraction_or_name(eval_split)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.packing = packing
        self.padding_free = padding_free
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.shuffle_dataset = shuffle_dataset
        self.seed = seed
        self.num_workers = num_workers
        self.dataset_num_proc = dataset_num_proc
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.dataset_config = dataset_config
        self.data_dir = data_dir
        self.data_files = data_files
        self.column_mapping = dict(column_mapping or {})
        self.mixture = list(mixture) if mixture else None
        if pad_to_multiple_of not in ("auto", None) and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer, 'auto' or None, got {pad_to_multiple_of!r}")
        self.pad_to_multiple_of = None if pad_to_multiple_of == "auto" else pad_to_multiple_of
        self.padding_value = padding_value
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.processor: Any = None  # a vision-language model's processor, when the rows have images
        self.image_tokens: ImageTokens | None = None
        self.requirements = DataRequirements()
        self.datasets: dict[str, datasets.Dataset] = {}
        self.num_dropped: dict[str, int] = {}
        self._prepared_for: tuple = ()

    # -- what the method asks of its data -------------------------------------------------------
    def connect(
        self, tokenizer: PreTrainedTokenizerBase | None = None, requirements: DataRequirements | None = None
    ) -> AlignDataModule:
        """Use ``tokenizer`` and/or the method's ``requirements`` (returns self, so
        ``data = Module(...).connect(tok)`` reads well). A fit connects the requirements of the
        module it trains (``data_requirements()``) when it sets the data up. A vision-language model's
        processor may stand for the tokenizer: the rows' images are then read too."""
        if tokenizer is not None and getattr(tokenizer, "image_processor", None) is not None:
            self.processor, tokenizer = tokenizer, tokenizer.tokenizer
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if requirements is not None:
            self.requirements = requirements
        return self

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        from lit_align.models.loading import load_tokenizer

        name = self.tokenizer_name_or_path or self.requirements.tokenizer_name_or_path
        if name is None:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer: call data.connect(tokenizer), pass "
                "tokenizer_name_or_path, or train it with a lit-align module"
            )
        if name == self.requirements.tokenizer_name_or_path and self.requirements.tokenizer is not None:
            self.tokenizer = self.requirements.tokenizer  # the module's: its model_init_kwargs, chat template and EOS
            self.processor = self.requirements.processor
        else:
            from lit_align.models.loading import load_processor

            self.tokenizer, self.processor = load_tokenizer(name), load_processor(name)
        return self.tokenizer

    def _image_tokens(self, label: str) -> ImageTokens:
        """How the policy's processor turns this split's images into tokens; an error for a text-only model."""
        if self.processor is None and self.requirements.processor is not None and self.tokenizer is self.requirements.tokenizer:
            self.processor = self.requirements.processor
        if self.processor is None:
            name = self.tokenizer_name_or_path or self.requirements.tokenizer_name_or_path or "the model"
            raise DataFormatError(
                f"{label}: the rows have images ({'/'.join(IMAGE_COLUMNS)} column) but {name} is a text-only model "
                "(its tokenizer has no image processor); train a vision-language model (builtin:tiny-vlm, or a model "
                "whose config has a vision_config), or drop the image column"
            )
        if self.packing or self.padding_free:
            raise DataFormatError(
                f"{label}: packing and padding_free are not supported with images (a packed row would mix the image "
                "features of several rows); set packing: false and padding_free: false"
            )
        if self.image_tokens is None or self.image_tokens.processor is not self.processor:
            self.image_tokens = ImageTokens(self.processor)
        return self.image_tokens

    # -- preparation -------------------------------------------------------------------------
    def module_options(self) -> tuple:
        """What preparing the data takes from the module being trained (CPO's BOS before prompts,
        KTO's KL pairs). Data prepared under other options (before the fit, without a Trainer, or
        for another module) is prepared again rather than trained on as it is."""
        return (self.requirements.drop_overlong, self.requirements.tool_schemas)

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if callable(getattr(module, "data_requirements", None)):  # a lit-align method declares them
            self.connect(requirements=module.data_requirements())
        options = self.module_options()
        if self.datasets and options == self._prepared_for:
            return
        self.num_dropped, self._prepared_for = {}, options
        self.datasets = self.prepare_splits(self._resolve_tokenizer())

    def prepare_splits(self, tokenizer) -> dict[str, datasets.Dataset]:
        """``train`` (and ``val``) as they are batched: loaded, prepared and, for formats that pack
        across examples, packed."""
        source = "mixture" if self.mixture else self.dataset_name_or_path
        train = self.load_split(self.split, train=True)
        splits = {"train": train}
        if isinstance(self.eval_split, float):
            if not 0.0 < self.eval_split < 1.0:
                raise ValueError(f"eval_split as a fraction must be in (0, 1), got {self.eval_split}")
            parts = train.train_test_split(test_size=self.eval_split, seed=self.seed)
            splits = {"train": parts["train"], "val": parts["test"]}
        elif self.eval_split:
            splits["val"] = self.load_split(self.eval_split, train=False)
        prepared = {}
        for name, ds in splits.items():
            label = f"{source} [{self.eval_split if name == 'val' else self.split}]"
            ds = self._prepare(ds, label, tokenizer)
            if name == "train" and self.shuffle_dataset:
                ds = ds.shuffle(seed=self.seed, keep_in_memory=True).flatten_indices(keep_in_memory=True)
            prepared[name] = self.pack_split(ds, self.packs(name)) if self.pack_across_examples else ds
        return prepared

    def load_split(self, split: str, train: bool, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
        """One split, raw: from the mixture or the source, columns renamed by ``column_mapping``."""
        if self.mixture:
            sources = [{"split": split, **s} if train else {**s, "split": split} for s in self.mixture]
            ds = load_mixture(sources, None, self.format, self.seed, streaming)
        else:
            ds = load_source(self.dataset_name_or_path, split, self.format, self.dataset_config, self.data_dir,
                             self.data_files, streaming)
        return rename_columns(ds, self.column_mapping, "column_mapping") if self.column_mapping else ds

    def _prepare(self, ds: datasets.Dataset, label: str, tokenizer) -> datasets.Dataset:
        if len(ds) == 0:
            raise DataFormatError(f"{label}: the dataset is empty")
        total = len(ds)
        ds = self.tokenized(ds, label, tokenizer)
        dropped = total - len(ds)
        self.num_dropped[label] = dropped
        if dropped:
            rank_zero_info(f"{label}: dropped {dropped} of {total} rows that do not fit max_length={self.max_length}")
        if len(ds) == 0:
            raise DataFormatError(
                f"{label}: every row was dropped because its prompt alone is at least max_length="
                f"{self.max_length} tokens{' or the cut would split an image' if self.image_tokens else ''}; "
                "raise max_length or shorten the prompts"
            )
        return ds

    def tokenized(self, ds: datasets.Dataset | datasets.IterableDataset, label: str, tokenizer):
        """Rows in the format's columns (``format_rows``), checked, tokenized and truncated, and
        those left with nothing to learn from dropped; in memory, or lazily for a stream."""
        ds = self.format_rows(ds, label)
        names = column_names(ds)
        tokenized = self.accepts_token_ids and "input_ids" in names
        columns = TOKEN_ID_COLUMNS if tokenized else self.columns
        check_columns(ds, columns, label, type(self).__name__)
        keep = self.keep_columns(ds)
        vision = not tokenized and any(c in names for c in IMAGE_COLUMNS)
        if vision:
            self._image_tokens(label)
            keep |= {c for c in IMAGE_COLUMNS if c in names}
        fn = functools.partial(self._tokenize_checked, tokenizer=tokenizer, label=label, columns=columns, tokenized=tokenized,
                               vision=vision)
        in_memory = isinstance(ds, datasets.Dataset)
        # The rows are tokenized in memory and never read back from a cache, so a fresh fingerprint is as
        # good as datasets' own, which would pickle this DataModule and its tokenizer (seconds per map).
        options = {"num_proc": self.dataset_num_proc, "load_from_cache_file": False, "desc": f"Tokenizing {label}",
                   "keep_in_memory": True, "new_fingerprint": uuid.uuid4().hex}
        ds = ds.map(fn, with_indices=True, remove_columns=[c for c in names if c not in keep],
                    **(options if in_memory else {}))
        ds = ds.filter(lambda k: k, input_columns="keep", **({"keep_in_memory": True} if in_memory else {}))
        return ds.remove_columns("keep")

    def _tokenize_checked(self, row: dict, index: int, tokenizer, label: str, columns: list[Column], tokenized: bool,
                          vision: bool = False) -> dict:
        check_row(row, index, columns, label)
        counts = None
        if tokenized:
            sequences, extras = [token_id_sequence(row, index, label)], {}
        else:
            if vision:
                where = f"{label}: row {index}"
                images = [load_image(v, f"{where}, image {k}") for k, v in enumerate(row_images(row))]
                counts = [self.image_tokens.count(image) for image in images]
                row = structured_row(row, len(images), where)
            self.check_row_values(row, index, label)
            if self.requirements.tool_schemas and not row.get("tools"):
                row = {**row, "tools": self.requirements.tool_schemas}
            if self.chat_template_kwargs:
                row = {**row, "chat_template_kwargs": {**self.chat_template_kwargs, **(row.get("chat_template_kwargs") or {})}}
            sequences, extras = self.tokenize_row(row, tokenizer)
            if counts is not None:
                sequences, extras = self.image_tokens.expand_row(sequences, extras, counts, where)
        sequences = [self.truncate(seq) for seq in sequences]
        keep = all(self.usable(seq) for seq in sequences)
        if counts:  # a sequence cut inside or before an image would misplace its features: the row is dropped
            keep = keep and all(self.image_tokens.whole(seq, counts) for seq in sequences)
        return {
            **{k: [seq[k] for seq in sequences] for k in sequences[0]},
            **extras,
            "length": sum(len(seq["input_ids"]) for seq in sequences),
            "keep": keep,
        }

    def packs(self, split: str) -> bool:
        """Whether the rows of ``split`` (``train``, ``val``) are packed."""
        return self.packing

    def pack_split(self, ds: datasets.Dataset, packed: bool) -> datasets.Dataset:
        """A prepared split as it is batched: packed rows of ``max_length`` (best-fit decreasing), or as it is."""
        return self._pack(ds) if packed else ds

    def _pack(self, ds: datasets.Dataset) -> datasets.Dataset:
        token_fields = [c for c in ds.column_names if c not in ("length",)]
        bins = pack_bfd([sum(len(s) for s in ids) for ids in ds["input_ids"]], self.max_length)
        cols = {c: ds[c] for c in token_fields}
        packed = {c: [[seq for i in b for seq in cols[c][i]] for b in bins] for c in token_fields}
        packed["length"] = [sum(len(s) for s in seqs) for seqs in packed["input_ids"]]
        return datasets.Dataset.from_dict(packed)

    # -- per-format hooks --------------------------------------------------------------------
    accepts_token_ids: ClassVar[bool] = False  # rows with ``input_ids`` are used as tokenized (SFT formats)

    def format_rows(self, ds: datasets.Dataset | datasets.IterableDataset, label: str):
        """The raw rows in the format's columns, before they are checked (for example a
        ``formatting_func``); as they are by default."""
        return ds

    @abstractmethod
    def tokenize_row(self, row: dict, tokenizer) -> TokenizedRow:
        """The token sequences of one row (each a dict of equal-length token lists:
        ``input_ids``, ``completion_mask``, ...) and its per-row values (``label``, ``margin``)."""

    def check_row_values(self, row: dict, index: int, label: str) -> None:
        """Checks beyond column kinds (for example chosen differing from rejected)."""

    def keep_columns(self, ds: datasets.Dataset) -> set[str]:
        """Raw columns carried through tokenization (prompt-only data keeps extras for rewards)."""
        return set()

    def truncate(self, seq: dict[str, list[int]]) -> dict[str, list[int]]:
        """Cut a sequence to ``max_length`` (TRL: ``keep_start`` by default); with the module's
        ``drop_overlong`` the row is dropped instead (``usable``)."""
        if self.max_length is None or len(seq["input_ids"]) <= self.max_length or self.requirements.drop_overlong:
            return seq
        return truncate(seq, self.max_length, self.truncation_mode)

    def usable(self, seq: dict[str, list[int]]) -> bool:
        """A truncated sequence still has something to learn from (else its row is dropped)."""
        if self.requirements.drop_overlong and self.max_length is not None and len(seq["input_ids"]) > self.max_length:
            return False
        return any(seq["completion_mask"])

    # -- loaders -----------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return self.layout_for("train")

    def layout_for(self, split: str) -> Layout:
        if self.padding_free:
            return "padding_free"
        return "packed" if self.packs(split) else "padded"

    def collate(self, items: list[dict], split: str = "train") -> Any:
        batch = collate_examples(items, self.pad_token_id, self.layout_for(split), self.max_length, self.pad_to_multiple_of)
        if self.image_tokens is not None and any(row_images(it) for it in items):
            batch.vision = self.image_tokens.batch_inputs(batch.input_ids, sequence_images(items, batch.num_sequences))
        return batch

    @property
    def pad_token_id(self) -> int:
        return self.padding_value if self.padding_value is not None else tokenizer_pad_id(self.tokenizer)

    def _loader(self, name: str, train: bool) -> DataLoader:
        if name not in self.datasets:
            self.setup()
        ds = self.datasets[name]
        if isinstance(ds, datasets.IterableDataset):
            return StreamLoader.over(ds, self, name, train)
        batch_size = self.loader_batch_size(train)
        if train:
            lengths = ds["length"] if self.group_by_length else [0] * len(ds)
            sampler = ShardedSampler(
                lengths, batch_size, self.shuffle, self.group_by_length, self.seed, repeat_batches=self.batch_repeats()
            )
        else:
            sampler = SequentialSampler(ds)
        return (ResumableLoader if train else DataLoader)(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=functools.partial(self.collate, split=name),
            num_workers=self.num_workers,
            drop_last=False,
        )

    def loader_batch_size(self, train: bool) -> int:
        """Examples per loader batch (prompt-only data counts completions and divides)."""
        return self.batch_size if train else self.eval_batch_size

    def batch_repeats(self) -> int:
        """How many consecutive steps see each training batch (online methods reuse rollouts)."""
        return 1

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False) if self.eval_split else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


def sequence_images(items: list[dict], num_sequences: int) -> list:
    """The images of every sequence of a collated batch, in sequence order (sequence ``s`` of
    ``E`` examples belongs to example ``s % E``: each sequence of a pair, or a KL pair, holds its
    example's prompt and so its images)."""
    images = [[load_image(v, f"batch row {i}") for v in row_images(it)] for i, it in enumerate(items)]
    return [image for s in range(num_sequences) for image in images[s % len(items)]]


TOKEN_ID_COLUMNS = [
    Column("input_ids", ("ids",)),
    Column("completion_mask", ("ids",), optional=True),
    Column("assistant_masks", ("ids",), optional=True),
]


def token_id_sequence(row: dict, index: int, label: str) -> dict[str, list[int]]:
    """One sequence of an already tokenized row (TRL's names: ``input_ids``, and optionally
    ``completion_mask`` and ``assistant_masks``, each as long as ``input_ids``)."""
    ids = list(row["input_ids"])
    seq = {"input_ids": ids, "completion_mask": list(row.get("completion_mask") or [1] * len(ids))}
    if row.get("assistant_masks") is not None:
        seq["assistant_mask"] = list(row["assistant_masks"])
    for name, key in (("completion_mask", "completion_mask"), ("assistant_masks", "assistant_mask")):
        if key in seq and len(seq[key]) != len(ids):
            raise DataFormatError(f"{label}: row {index}, column {name!r} has {len(seq[key])} values for {len(ids)} input_ids")
    return seq


def _fraction_or_name(eval_split: float | str | None) -> float | str | None:
    """``"0.1"`` (from a command line or an environment) is the fraction 0.1, not a split name."""
    if isinstance(eval_split, str):
        try:
            return float(eval_split)
        except ValueError:
            return eval_split
    return eval_split
