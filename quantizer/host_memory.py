"""This process's host memory: resident and peak sizes (for reports and the planner's check), and handing the
allocator's free heap back to the OS between passes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
from typing import Callable


def peak_rss_mb() -> float:
    """The most this process has had resident so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """This process's resident memory now, MB (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return the free pages inside malloc's heaps to the OS. Tensors below malloc's mmap threshold (which grows to
    32 MB) live in its heaps; once freed, their pages stay resident until a trim, and a long layer's passes leave
    them fragmented: a streamed DeepSeek-V3 MoE layer grew by ≈ 0.1 GB of free heap per chunk of experts
    (bench/rehearsal_671b.py), enough for Ray's memory monitor to kill the stage in the layer's last chunks."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
