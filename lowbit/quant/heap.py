"""Keeping a layer-by-layer job's resident memory at one layer's worth.

Why: glibc raises its mmap threshold each time a large block is freed, so after the first layer
the multi-MB weight and activation tensors come from the brk heap, and freed heap pages stay
resident: RSS then creeps up with the number of layers processed. Pinning the threshold keeps
big tensors in their own mappings (returned to the OS on free) and `malloc_trim` returns what
the heap holds free. Both are no-ops where glibc is not the allocator.

Pinning is process-wide and permanent: glibc has no call that gives the dynamic threshold back.
So only an entry point that owns its process pins it (`lowbit quantize`, the benchmark scripts
that quantize); the library's quantize() never does, and an application that imports it keeps
its allocator as it configured it. `release_freed_memory` changes no setting and is called per layer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for the rest of the process (entry points only, see above)."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
