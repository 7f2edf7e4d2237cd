"""One thread runs all of a shard's model work, so that the process holds a single OpenMP team."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class ModelThread:
    """Runs callables one at a time on one long-lived thread; ``call`` waits for the result.

    Why: every thread that starts a parallel torch op gets its own OpenMP team. Once a process holds more
    OpenMP threads than cores, libgomp stops spinning between parallel regions and every op pays a
    futex wake-up. gRPC hands each call to whichever worker thread is free, so model work spread over
    them ran 17-20 % slower per decode step than the same work on one thread (SmolLM2, batch 64, 2 cores:
    207-221 ms against 170-186 ms; ``docs/architecture.md``). Adapter loads run their pieces here too
    (``between_steps``), so no other thread ever starts a parallel torch op.

    ``lock`` is the model lock: work that changes or reads the engine's batches holds it (``ShardEngine``).

    ``device``: on CUDA the thread makes it its current device before any job, so that everything that
    defaults to the current device (torch's current stream, which the LoRA kernels launch on; NCCL; new
    generators) is this rank's GPU and not GPU 0.
    """

    def __init__(self, name: str = "model", device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        broken: BaseException | None = None
        if self.device.type == "cuda":
            try:
                torch.cuda.set_device(self.device)  # per thread: the rank's GPU for every job that follows
            except BaseException as exc:  # every job then fails with it, rather than run on the wrong GPU
                broken = exc
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if future.set_running_or_notify_cancel():
                if broken is not None:
                    future.set_exception(RuntimeError(f"the model thread cannot use {self.device}: {broken}"))
                    continue
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

    def between_steps(self, piece: Callable[[], T]) -> T:
        """Run one piece of an adapter load here, under the model lock: it then fits between two forward
        steps with all cores, and never starts a second OpenMP team elsewhere (an ``AdapterStore``'s pace)."""

        def locked() -> T:
            with self.lock:
                return piece()

        return self.call(locked)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
