"""The model thread: one thread runs every job in order, errors reach the caller."""

from __future__ import annotations

import threading
from concurrent import futures

import pytest

from loraplex.shard.model_thread import ModelThread


def test_jobs_from_many_threads_run_on_one_thread_in_order() -> None:
    model = ModelThread()
    seen: list[tuple[str, int]] = []
    try:
        with futures.ThreadPoolExecutor(8) as pool:
            done = list(
                pool.map(lambda i: model.call(lambda: seen.append((threading.current_thread().name, i))), range(50))
            )
        assert len(done) == 50
        assert {name for name, _ in seen} == {"model"}
        assert sorted(i for _, i in seen) == list(range(50))
        assert model.call(lambda: model.call(lambda: 7)) == 7  # a job may call again: it runs inline
    finally:
        model.stop()


def test_an_exception_reaches_the_caller_and_the_thread_keeps_serving() -> None:
    model = ModelThread()
    try:
        with pytest.raises(ValueError, match="bad batch"):
            model.call(lambda: (_ for _ in ()).throw(ValueError("bad batch")))
        assert model.call(lambda a, b: a + b, 2, b=3) == 5
    finally:
        model.stop()
