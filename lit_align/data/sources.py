"""Reading rows from a Hub id, a local directory, a file, or the embedded task; and checking them.

Every problem with the data is reported before the first step, as a
:class:`DataFormatError` that names the source, the row, the column and what was
expected, so a user can open the file and fix it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataFormatError(ValueError):
    """The data does not have the format the DataModule expects."""


@dataclass(frozen=True)
class Column:
    """One column of a format: its name, whether it may be absent, and its allowed kinds.

    ``kinds`` is a subset of ``{"text", "messages", "bool", "text_list", "bool_list", "ids", "any"}``.
    """

    name: str
    kinds: tuple[str, ...]
    optional: bool = False


KIND_DOC = {
    "text": "a string",
    "messages": 'a list of {"role": ..., "content": ...} messages',
    "bool": "a boolean (true/false)",
    "text_list": "a list of strings",
    "bool_list": "a list of booleans",
    "ids": "a list of integers (token ids, or a 0/1 mask)",
    "any": "any value",
}


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def value_kind(value) -> str | None:
    """The kind of ``value`` (see :class:`Column`), or None if it is none of them."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "bool"
    if _is_messages(value):
        return "messages"
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "text_list"
    if isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        return "bool_list"
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "ids"
    return None


def load_source(
    name_or_path: str, split: str, fmt: str, name: str | None = None, data_dir: str | None = None,
    data_files: str | list | dict | None = None, streaming: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split from ``builtin:<task>``, a data file, a local directory or a Hub id
    (``name``: the Hub dataset's configuration; ``data_dir``/``data_files``: which of its files,
    as ``datasets.load_dataset`` takes them); ``streaming``: an ``IterableDataset`` read as it is
    iterated (sources held in memory anyway, the builtin task and ``save_to_disk`` output, are wrapped)."""
    ds = _load_source(name_or_path, split, fmt, name, data_dir, data_files, streaming)
    return ds.to_iterable_dataset() if streaming and isinstance(ds, datasets.Dataset) else ds


def _load_source(name_or_path, split, fmt, name, data_dir, data_files, streaming):
    hub_args = {k: v for k, v in (("name", name), ("data_dir", data_dir), ("data_files", data_files)) if v is not None}
    from lit_align.models.builtin import is_builtin

    if is_builtin(name_or_path):
        from lit_align.data.arithmetic import arithmetic_dataset
        from lit_align.data.shapes import shapes_dataset

        if hub_args:
            raise DataFormatError(f"{name_or_path} is generated, not read: {sorted(hub_args)} apply to Hub datasets and directories")
        task = name_or_path.removeprefix("builtin:").partition("?")[0]
        tasks = {"arithmetic": arithmetic_dataset, "shapes": shapes_dataset}
        if task not in tasks:
            raise ValueError(f"unknown builtin task {task!r} in {name_or_path!r}; known tasks: {', '.join(tasks)}")
        return tasks[task](name_or_path, fmt, split)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in FILE_BUILDERS:
        if hub_args:
            raise DataFormatError(f"{name_or_path} is one file: {sorted(hub_args)} apply to Hub datasets and directories")
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {name_or_path!r} does not exist")
        if split != "train":
            raise DataFormatError(
                f"{name_or_path}: a single file holds one split, so split={split!r} cannot be read from it; "
                "use split='train' and set eval_split to a fraction (e.g. 0.1) or to another file"
            )
        builder = FILE_BUILDERS[path.suffix.lower()]
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        except Exception as err:  # datasets raises StopIteration, ArrowInvalid, ... on bad files
            raise DataFormatError(f"{name_or_path}: {_unreadable(path, builder, err)}") from err
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise DataFormatError(f"{name_or_path}: no split {split!r}; it has {sorted(saved)}")
                return saved[split]
            return saved
        return datasets.load_dataset(str(path), split=split, streaming=streaming, **hub_args)
    if path.exists():
        raise DataFormatError(
            f"{name_or_path}: unsupported file type {path.suffix!r}; expected one of {sorted(FILE_BUILDERS)}"
        )
    try:
        return datasets.load_dataset(name_or_path, split=split, streaming=streaming, **hub_args)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:  # offline, typo, or private
        raise DataFormatError(
            f"could not load dataset {name_or_path!r} (split {split!r}) from the Hugging Face Hub: {err}. "
            "Expected a Hub id, a local directory, a .jsonl/.json/.parquet/.csv file, builtin:arithmetic or builtin:shapes"
        ) from err


MIXTURE_KEYS = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction"}


def load_mixture(
    sources: list[dict], split: str | None, fmt: str, seed: int = 0, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """Several sources joined into one dataset (TRL's ``DatasetMixtureConfig.datasets``): each
    ``{path, name?, data_dir?, data_files?, split? (default: split, else 'train'), columns?, fraction?}``.
    ``columns``: a list of the columns to keep, or a mapping renaming them (``{question: prompt}``);
    ``fraction``: the share of that source's rows taken (a seeded sample)."""
    parts = []
    for i, source in enumerate(sources):
        where = f"mixture[{i}]"
        if not isinstance(source, dict) or "path" not in source:
            raise ValueError(f"{where}: expected a mapping with 'path' (and optional {sorted(MIXTURE_KEYS - {'path'})}), got {source!r}")
        unknown = sorted(set(source) - MIXTURE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected {sorted(MIXTURE_KEYS)}")
        part_split = source.get("split") or split or "train"
        ds = load_source(source["path"], part_split, fmt, source.get("name"), source.get("data_dir"), source.get("data_files"),
                         streaming)
        columns = source.get("columns")
        if columns:
            names, present = list(columns), column_names(ds)
            missing = [c for c in names if c not in present]
            if missing:
                raise DataFormatError(f"{where} ({source['path']}): no column {missing[0]!r} (found: {', '.join(present)})")
            ds = ds.select_columns(names)
            if isinstance(columns, dict):
                ds = rename_columns(ds, columns, where)
        fraction = source.get("fraction")
        if fraction is not None and streaming:
            raise ValueError(f"{where}: fraction needs the whole source, and streaming reads it as it comes; drop one of them")
        if fraction is not None:
            if not 0.0 < float(fraction) <= 1.0:
                raise ValueError(f"{where}: fraction must be in (0, 1], got {fraction}")
            ds = ds.shuffle(seed=seed).select(range(max(1, round(len(ds) * float(fraction)))))
        parts.append(ds)
    if not parts:
        raise ValueError("mixture is empty: give at least one source")
    columns = [set(column_names(p)) for p in parts]
    if any(c != columns[0] for c in columns):
        detail = "; ".join(f"mixture[{i}]: {', '.join(sorted(c))}" for i, c in enumerate(columns))
        raise DataFormatError(f"the sources of a mixture must end with the same columns (rename them with 'columns'): {detail}")
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:  # the same names with different feature types
        raise DataFormatError(f"the sources of the mixture do not join: {err}") from err


def rename_columns(ds, mapping: dict[str, str], where: str):
    """``ds`` with columns renamed by ``mapping`` (``{old: new}``); a column already holding a new
    name is replaced, an old name that is not there is an error naming ``where``."""
    present = column_names(ds)
    missing = [c for c in mapping if c not in present]
    if missing:
        raise DataFormatError(f"{where}: no column {missing[0]!r} to rename (found: {', '.join(present)})")
    ds = ds.remove_columns([new for new in mapping.values() if new in present and new not in mapping])
    return ds.rename_columns({old: new for old, new in mapping.items() if old != new})


def column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """A dataset's columns; a stream that does not know them yet shows its first row's."""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds)).keys())


def _unreadable(path: Path, builder: str, err: Exception) -> str:
    """Why a data file could not be loaded, pointing at the line where that can be found."""
    if builder == "parquet":
        return f"could not be read as parquet: {err!r}"
    lines = path.read_text(errors="replace").splitlines()
    rows = [line for line in lines if line.strip()]
    if not rows:
        return "the dataset is empty"
    if builder == "csv" and len(rows) == 1:
        return f"the dataset is empty (only a header row: {rows[0][:120]!r})"
    if builder == "json" and path.suffix.lower() == ".jsonl":
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"line {number}, column {bad.colno}: not valid JSON ({bad.msg}): {line[:120]!r}"
            if not isinstance(value, dict):
                return f"line {number}: expected a JSON object (one row per line), got {type(value).__name__}: {line[:120]!r}"
    return f"could not be read as {builder}: {err!r}"


def check_columns(ds: datasets.Dataset, columns: list[Column], source: str, owner: str) -> None:
    """Raise if a required column is missing, suggesting the closest present name."""
    present = column_names(ds)
    expected = ", ".join(c.name + ("?" if c.optional else "") for c in columns)
    for col in columns:
        if col.optional or col.name in present:
            continue
        close = difflib.get_close_matches(col.name, present, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataFormatError(
            f"{source}: missing column {col.name!r} required by {owner} "
            f"(expected columns: {expected}; found: {', '.join(present) or 'none'}).{hint}"
        )


def check_row(row: dict, index: int, columns: list[Column], source: str) -> None:
    """Raise if a value of ``row`` is not one of its column's kinds."""
    for col in columns:
        if col.name not in row or "any" in col.kinds:
            continue
        value = row[col.name]
        if value is None and col.optional:
            continue
        kind = value_kind(value)
        if kind not in col.kinds:
            want = " or ".join(KIND_DOC[k] for k in col.kinds)
            raise DataFormatError(
                f"{source}: row {index}, column {col.name!r}: expected {want}, "
                f"got {type(value).__name__} {_preview(value)}"
            )


def check_same_form(row: dict, index: int, names: list[str], source: str) -> None:
    """Columns of one row are all strings or all message lists, not a mix."""
    kinds = {n: value_kind(row[n]) for n in names if row.get(n) is not None}
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{n}: {KIND_DOC[k]}" for n, k in kinds.items())
        raise DataFormatError(
            f"{source}: row {index} mixes standard and conversational values ({detail}); "
            "use strings in every column or message lists in every column"
        )


def _preview(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
