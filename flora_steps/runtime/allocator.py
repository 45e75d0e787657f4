"""How the C library's ``malloc`` serves PyTorch's CPU tensors (``compute.allocator``).

glibc's ``malloc`` maps every block above its *mmap threshold* (at most 32 MiB) from the
kernel afresh, unless freed memory at its heap's top happens to hold it, and a fresh
block's pages are faulted in on first touch. At DeiT-B's batch of 16, every MLP's
3,072-wide hidden layer (38.7 MB) is such a block: depending on the heap's state, which
differs from process to process, a forward pass pays about 227,000 page faults or none
(`bench/allocator.py`). The cost is the same in the dense and in a compressed model, so
it falls on the compressed one's speedup, and it makes a latency table's timings and a
model's disagree when they happen in different states.

``use_allocator("heap")`` tells ``malloc`` to serve every block from its heap and keep
up to ``KEPT_BYTES`` of freed memory there for the next allocation, which is what jemalloc
and tcmalloc (PyTorch's CPU performance tuning guide recommends them) do. Outside a
stage, the same setting is ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=1073741824``. glibc 2.36 hands a freed block back to an
aligned request (torch's are 64-byte aligned) only once about a dozen of its size are
free, so the first forward passes (the warm-up) still fault. Where the C library is not
glibc (macOS, musl) nothing changes and the allocator in use is ``system``. CUDA tensors
have PyTorch's own caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Literal

Allocator = Literal["heap", "system"]

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: glibc's initial mmap and trim thresholds and its limit on mapped blocks.
GLIBC_THRESHOLD, GLIBC_MMAP_MAX = 128 * 1024, 65536
#: Freed memory at the heap's top that ``malloc`` keeps rather than returning it to the kernel.
KEPT_BYTES = 1 << 30

_in_use: Allocator = "system"  # mirrors the C library's own process-wide state


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (the only one with ``mallopt``), else ``None``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def use_allocator(kind: Allocator) -> Allocator:
    """Set ``malloc`` for this process from now on and return the allocator in effect: ``heap`` (every block from
    the heap, freed memory kept for reuse) or ``system`` (glibc's defaults). Back to ``system`` after ``heap``,
    glibc's initial thresholds return but not their dynamic adjustment, which any ``mallopt`` turns off."""
    global _in_use
    libc = glibc()
    if libc is None or kind == _in_use:
        return _in_use
    if kind == "heap":
        applied = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES)
    else:
        applied = (
            libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
            and libc.mallopt(M_MMAP_THRESHOLD, GLIBC_THRESHOLD)
            and libc.mallopt(M_TRIM_THRESHOLD, GLIBC_THRESHOLD)
        )
    if applied:
        _in_use = kind
    return _in_use


def allocator_in_use() -> Allocator:
    """The allocator ``use_allocator`` last put in effect in this process (``system`` until then)."""
    return _in_use
