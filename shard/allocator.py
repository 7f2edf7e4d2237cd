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

    With glibc's defaults a 4,096-token prefill of SmolLM2 page-faulted 300,000-450,000 times (1.2-1.8 GB
    of pages zeroed by the kernel) because large activations were mmapped and unmapped, or the heap trimmed
    and regrown, at every layer; with this policy it faults only the first time a batch size is seen
    (prefill 6 % faster for the base model, 20 % with 32 distinct rank-16 adapters, measured on the gRPC
    worker threads that run the model). One arena, because a thread's own arena grows in 64 MiB heaps,
    too small for a prefill's activations. The price: RSS stays at its high-water mark until
    ``release_freed_memory`` runs (adapter unloads call it), and the heap needs a few passes to settle:
    torch's aligned allocations ask for slightly more than a block it freed, so the heap grows until freed
    neighbours coalesce (8-11 rounds of one 64 MiB activation in tests/shard/test_allocator.py).
    Trimming is off altogether, not merely above some size: with a 1 GiB threshold, a decode batch of 64
    rank-16 all-projection adapters (1.25 GB of LoRA stacks) freed at the heap's top went back to the OS and
    was faulted in again at the next build, 150,000-200,000 faults and ~1 s on the model thread each time
    (an in-process bfloat16 SmolLM2 pass of that workload: 12.3-12.9 s with the threshold, 10.5-11.5 without).
    Call it once, before the model is built.
    Returns whether the policy could be applied.
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
