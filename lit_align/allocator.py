"""The host allocator: keep memory that a training step frees inside the process for the next step.

glibc's ``malloc`` serves every request over 32 MB (and, by its dynamic threshold, many smaller ones) with
a fresh ``mmap`` and gives it back with ``munmap`` when the tensor dies. A training step on the CPU frees
and re-allocates the same buffers every step (activations, the LM head's and the tied embedding's
``[V, H]`` gradients), so the kernel maps, zeroes and faults in the same pages again each time: on
SmolLM2-135M, about 500 MB of page faults per SFT step (``benchmarks/README.md``). With ``mmap`` off for
``malloc`` and the heap never trimmed below 2 GB of free space, a freed buffer is reused without a fault.
This is what jemalloc or tcmalloc give PyTorch on CPU, done with glibc's own ``mallopt``.

The cost: the process's resident memory no longer shrinks after a peak, and where phases allocate buffers
of different sizes the kept memory fragments and the peak grows (GRPO's by about a tenth). The
``lit-align`` command applies it (``LIT_ALIGN_KEEP_FREED_MEMORY=0`` turns it off); in your own script call
:func:`keep_freed_memory` once at start, or set ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0`` before Python starts.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "LIT_ALIGN_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
KEPT = (0, 2**31 - 1)  # (M_MMAP_MAX, M_TRIM_THRESHOLD): no mmap per buffer, trim only past 2 GB free
GLIBC_DEFAULTS = (65536, 128 * 1024)  # a fresh mmap per large request; trim past 128 KiB free


def set_malloc(mmap_max: int, trim_threshold: int) -> bool:
    """Set glibc's ``M_MMAP_MAX`` and ``M_TRIM_THRESHOLD`` for this process (``KEPT`` or
    ``GLIBC_DEFAULTS``). Returns whether both applied: ``False`` off Linux/glibc (musl's mallopt does nothing)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, mmap_max) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (no ``mmap`` per large buffer, no trimming under
    2 GB). Returns whether it applied: ``False`` off Linux/glibc (nothing to do) or when ``$LIT_ALIGN_KEEP_FREED_MEMORY``
    is ``0``. It changes this process only, from the next allocation on; call it before training starts."""
    return os.environ.get(ENV, "1") != "0" and set_malloc(*KEPT)
