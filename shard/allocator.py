"""The shard's memory allocator policy (glibc): freed memory is kept for reuse and given back on request."""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP_BELOW = 1 << 30  # allocations under 1 GiB come from the heap
_NEVER = -1  # as a trim threshold: glibc never trims the heap on its own (mallopt(3))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): the allocator's defaults stay
        return None


def keep_freed_memory() -> bool:
    """Serve the model's allocations from one heap that glibc neither unmaps nor trims by itself.

    With glibc's defaults, large activations are mmapped and unmapped, or the heap trimmed and regrown, at
    every layer, so each forward pass faults its activations in again (pages the kernel must zero); kept,
    a batch shape faults only the first time it is seen. One arena, because a thread's own arena grows in
    64 MiB heaps, too small for a prefill's activations. No trimming at any size: a large block freed at
    the heap's top (a decode batch's LoRA stacks) would go back to the OS and fault in again at the next
    plan. The price: RSS stays at its high-water mark until ``release_freed_memory`` runs (adapter unloads
    call it), and the heap needs a few passes to settle, since torch's aligned allocations ask for
    slightly more than a block it freed and the heap grows until freed neighbours coalesce.
    Call it once, before the model is built; returns whether the policy could be applied.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) == 1 and ok
    return libc.mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1 and ok


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (the heap is never trimmed otherwise, so RSS would not drop).

    Call it outside the model lock: trimming a large heap takes a while (ctypes drops the GIL meanwhile).
    """
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
