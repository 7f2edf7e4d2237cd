"""Admission: FIFO among adapter-slot waiters, cached prefixes first, bounded overtaking, no starvation."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from typing import Any

import pytest

from loraplex.router import admission
from loraplex.router.inflight import InFlightRequest
from loraplex.router.metrics import Metrics
from loraplex.router.prefix_estimate import PrefixEstimate
from loraplex.router.scheduler import Scheduler
from loraplex.router.settings import RouterSettings, settings_from_args
from loraplex.router.shards import ShardClients
from loraplex.router.validation import validate_parameters

SETTINGS = RouterSettings(adapter_slot_patience=2.0)


def _entry(adapter: str, waited: float = 0.0) -> InFlightRequest:
    params = validate_parameters({"adapter_id": adapter, "max_new_tokens": 4}, SETTINGS)
    entry = InFlightRequest([1, 2, 3], params, 4)
    entry.queued_at = time.monotonic() - waited
    return entry


def _scheduler(running: list[str], waiting: list[InFlightRequest]) -> Scheduler:
    # _admit is pure bookkeeping: the shard channel is never used, so it may point nowhere.
    shards = ShardClients(["unix:///nonexistent.sock"])
    scheduler = Scheduler(shards, None, SETTINGS, set(), Metrics(), adapter_slots=2)  # type: ignore[arg-type]
    for i, adapter in enumerate(running):
        scheduler.running[1000 + i] = _entry(adapter)
    for i, e in enumerate(waiting):
        e.id = i + 1
        scheduler.waiting.append(e)
    return scheduler


def _run(fn: Any) -> Any:
    async def inner() -> Any:
        return fn()

    return asyncio.run(inner())


def test_requests_for_running_adapters_overtake_a_fresh_slot_waiter() -> None:
    waiting = [_entry("c"), _entry("a"), _entry("d"), _entry("a"), _entry("")]
    scheduler = _run(lambda: _scheduler(["a", "b"], waiting))
    admitted = [e.params.adapter_id for e in list(scheduler._admit())]
    assert admitted == ["a", "a", ""]  # base rows need no slot; c and d wait for one, in order
    assert [e.params.adapter_id for e in scheduler.waiting] == ["c", "d"]


def test_nothing_overtakes_a_waiter_past_its_patience() -> None:
    waiting = [_entry("c", waited=5.0), _entry("a"), _entry("")]
    scheduler = _run(lambda: _scheduler(["a", "b"], waiting))
    assert list(scheduler._admit()) == []
    assert [e.params.adapter_id for e in scheduler.waiting] == ["c", "a", ""]


def test_the_first_free_slot_goes_to_the_oldest_waiter() -> None:
    waiting = [_entry("c", waited=5.0), _entry("d"), _entry("a")]
    scheduler = _run(lambda: _scheduler(["a"], waiting))
    admitted = [e.params.adapter_id for e in list(scheduler._admit())]
    assert admitted == ["c", "a"]  # one slot was free: c takes it, d waits for the next
    assert [e.params.adapter_id for e in scheduler.waiting] == ["d"]


def _prompted(prompt: list[int], waited: float = 0.0) -> InFlightRequest:
    entry = InFlightRequest(prompt, validate_parameters({"max_new_tokens": 4}, SETTINGS), 4)
    entry.queued_at = time.monotonic() - waited
    return entry


def test_cached_requests_overtake_only_those_that_arrived_less_than_the_patience_before_them() -> None:
    # Arrival times (seconds ago) and whether the prompt's prefix is expected cached.
    queue = {"u-early": (10.0, False), "c-late": (1.0, True), "u1": (1.0, False), "c1": (0.5, True)}
    queue |= {"u2": (0.5, False), "c2": (0.0, True), "c-outside-the-window": (0.0, True)}
    entries = {n: _prompted([1], waited=w) for n, (w, _) in queue.items()}
    name_of = {id(e): n for n, e in entries.items()}

    def order(patience: float) -> list[str]:
        out = admission.cached_first(
            deque(entries.values()), lambda e: queue[name_of[id(e)]][1], patience=patience, window=6
        )
        return [name_of[id(e)] for e in out]

    # Nothing passes u-early (it came 9 s before any cached request); the rest of the burst is reordered whole.
    assert order(2.0) == ["u-early", "c-late", "c1", "c2", "u1", "u2", "c-outside-the-window"]
    assert order(0.7) == ["u-early", "c-late", "c1", "u1", "c2", "u2", "c-outside-the-window"]  # c2 came 1 s after u1
    assert order(0.0) == list(queue)  # patience 0: arrival order


def test_a_step_takes_requests_whose_shared_prefix_is_cached_before_those_that_must_compute_theirs() -> None:
    system = [5] * 40
    shared = [[*system, i, i + 1, i + 2, i + 3] for i in (1, 2)]  # 44 tokens, 40 of them expected cached
    unique = [[100 + i] * 44 for i in range(2)]

    def admitted(patience: float) -> list[tuple[int, int]]:
        settings = dataclasses.replace(SETTINGS, cached_prefix_patience=patience, max_input_tokens=100)
        est = PrefixEstimate(4, 1024)
        est.record(est.hashes("", [*system, 0]), 40)  # the system prompt's blocks ran for an earlier request

        def step() -> dict[InFlightRequest, int]:
            shards = ShardClients(["unix:///nonexistent.sock"])
            scheduler = Scheduler(shards, None, settings, set(), Metrics(), prefix=est)  # type: ignore[arg-type]
            for i, prompt in enumerate([*unique, *shared]):
                e = _prompted(prompt)
                e.id = i + 1
                scheduler.waiting.append(e)
            return scheduler._admit(48, chunked=True)

        return [(e.id, tokens) for e, tokens in _run(step).items()]

    assert admitted(2.0) == [(3, 4), (4, 4), (1, 40)]  # both cached ones run their last 4 tokens, then a chunk
    assert admitted(0.0) == [(1, 44), (2, 4)]  # arrival order: the cached ones wait behind 88 tokens of prompt


def test_the_patience_flags_take_seconds_and_refuse_negative_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_from_args(["--cached-prefix-patience", "0.5"]).cached_prefix_patience == 0.5
    assert RouterSettings().cached_prefix_patience == 2.0
    for flag in ("--cached-prefix-patience", "--adapter-slot-patience"):
        with pytest.raises(SystemExit):
            settings_from_args([flag, "-1"])
        assert "must be 0 or positive" in capsys.readouterr().err
