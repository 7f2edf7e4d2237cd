"""Adapter-slot admission: FIFO among requests that need a slot, bounded overtaking, no starvation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loraplex.router.inflight import InFlightRequest
from loraplex.router.metrics import Metrics
from loraplex.router.scheduler import Scheduler
from loraplex.router.settings import RouterSettings
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
