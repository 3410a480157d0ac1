"""The weight handshake of ``lit-align serve`` (both sides): the parameter fingerprint that tells
a server's model from another, the bucket plan, and :class:`WeightChannel`, a two-process group
apart from any default (DDP) group. The protocol is described in :mod:`lit_align.rollout.server`."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

DEFAULT_BUCKET_BYTES = 1 << 30


def parameter_fingerprint(named_shapes: Iterable[tuple[str, Sequence[int]]]) -> dict[str, Any]:
    """A digest of parameter names and shapes, with their counts: equal on both sides when the
    trainer's policy is the server's model."""
    items = sorted((name, [int(s) for s in shape]) for name, shape in named_shapes)
    digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "num_parameters": len(items), "num_values": sum(math.prod(s) for _, s in items)}


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def plan_buckets(dtypes: Sequence[str], shapes: Sequence[Sequence[int]], bucket_bytes: int) -> list[tuple[str, list[int]]]:
    """Tensor indices grouped by dtype (in order of first appearance), each group cut into buckets
    of at most ``bucket_bytes`` (a larger tensor travels alone): one broadcast per bucket."""
    groups: dict[str, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        groups.setdefault(dtype, []).append(i)
    buckets: list[tuple[str, list[int]]] = []
    for dtype, indices in groups.items():
        size = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        current: list[int] = []
        used = 0
        for i in indices:
            nbytes = math.prod(shapes[i]) * size
            if current and used + nbytes > bucket_bytes:
                buckets.append((dtype, current))
                current, used = [], 0
            current.append(i)
            used += nbytes
        if current:
            buckets.append((dtype, current))
    return buckets


class WeightChannel:
    """The two-process group of the weight handshake: the trainer's rank 0 (rank 0, the sender) and
    the server (rank 1, hosting the store). Made in two steps so the server can answer the HTTP
    request once its store listens and join the group in a thread."""

    def __init__(self, store_host: str, port: int, rank: int, backend: str, timeout: float) -> None:
        from torch import distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown weight-sync backend {backend!r}: expected 'gloo' or 'nccl'")
        self.rank, self.backend, self.timeout = rank, backend, timedelta(seconds=timeout)
        self.store = dist.TCPStore(store_host, port, 2, is_master=rank == 1, timeout=self.timeout, wait_for_workers=False)
        self.group: Any = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def join(self, device_host: str) -> None:
        """Blocks until both sides have joined (at most ``timeout``)."""
        from torch import distributed as dist

        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.group = dist.ProcessGroupNCCL(self.store, self.rank, 2, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = self.timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=device_host)]
            self.group = dist.ProcessGroupGloo(self.store, self.rank, 2, options)

    def broadcast(self, tensor: Tensor) -> None:
        """Rank 0's ``tensor`` into rank 1's (in place)."""
        from torch import distributed as dist

        if self.group is None:
            raise RuntimeError("the weight-sync group is closed")
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        self.group.broadcast([tensor], options).wait(self.timeout)

    def close(self) -> None:
        group, self.group, self.store = self.group, None, None
        if group is not None and self.backend == "nccl" and hasattr(group, "shutdown"):
            group.shutdown()
