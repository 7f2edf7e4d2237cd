"""One thread runs all of a shard's model work, so that the process holds a single OpenMP team."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch uses (its own copy when the wheel bundles one)."""
    bundled = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    for name in (str(bundled), "libgomp.so.1"):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    return None


def serial_torch_in_this_thread() -> None:
    """Let this thread's torch ops run on one core: it then never starts an OpenMP team of its own.

    For threads that touch tensors besides the model thread (adapter readers, start-up). OpenMP's thread
    count is per calling thread, so the model thread keeps all cores.
    """
    torch.get_num_threads()  # torch sets each thread's count on its first parallel call: let it happen first
    gomp = _libgomp()
    if gomp is not None:
        gomp.omp_set_num_threads(1)


class ModelThread:
    """Runs callables one at a time on one long-lived thread; ``call`` waits for the result.

    Why: every thread that starts a parallel torch op gets its own OpenMP team. Once a process holds more
    OpenMP threads than cores, libgomp stops spinning between parallel regions and every op pays a
    futex wake-up. gRPC hands each call to whichever worker thread is free, so model work spread over
    them ran 17-20 % slower per decode step than the same work on one thread (SmolLM2, batch 64, 2 cores:
    207-221 ms against 170-186 ms; ``docs/architecture.md``).
    """

    def __init__(self, name: str = "model") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, who re-raises it
                    future.set_exception(exc)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the model thread (inline when already on it); its exception re-raised."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future[T] = Future()
        self._jobs.put((lambda: fn(*args, **kwargs), future))
        return future.result()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
