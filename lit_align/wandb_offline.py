"""Read an offline W&B run back (wandb has no Python reader for offline runs).

``read_run("runs/sft/wandb/offline-run-*/run-*.wandb")`` gives the logged history rows (one dict
of metric name -> value per ``log`` call) and the run config; ``metric_series`` the values of one
metric in order. The configs log offline, and the tests and ``benchmarks/run_configs.py`` read
their runs back with this.

A ``run-*.wandb`` file is a 7-byte header, then LevelDB-log framing: 32 KiB blocks of
fragments, each with a 7-byte header (crc32 ``<I``, length ``<H``, type ``B``: 1 full,
2 first, 3 middle, 4 last). Each record is a ``wandb_internal_pb2.Record``.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024


def records(path: Path):
    """The ``Record`` protos of an offline run file, in order."""
    data = Path(path).read_bytes()
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_run(path: Path) -> tuple[list[dict], dict]:
    """The logged history rows and the run config of an offline run file."""
    history, config = [], {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config


def metric_series(history: list[dict], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every history row that logged ``name`` (the step is Lightning's
    ``trainer/global_step`` when logged, else the row index)."""
    return [(int(row.get("trainer/global_step", i)), float(row[name])) for i, row in enumerate(history) if name in row]
