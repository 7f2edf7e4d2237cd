"""One request's or one tenant's trouble stays its own: a request the shards' message cannot hold, a batch the
shard refuses, tokenization off the batching loop, throttled shard reads for /metrics, per-tenant limits."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.router.adapters import AdapterRegistry
from loraplex.router.errors import ApiError
from loraplex.router.events import EndEvent, ErrorEvent, TokenEvent
from loraplex.router.inflight import InFlightRequest
from loraplex.router.kv_budget import KvBudget
from loraplex.router.ledger import RequestLedger
from loraplex.router.metrics import Metrics
from loraplex.router.scheduler import Scheduler
from loraplex.router.service import RouterService
from loraplex.router.settings import RouterSettings
from loraplex.router.shards import adapter_view
from loraplex.router.tenancy import Tenant
from loraplex.router.validation import GenerateParameters, validate_parameters
from loraplex.router.views import ModelInfo
from tests.router.test_preemption import BookkeepingShard, solo

SETTINGS = RouterSettings(max_input_tokens=24, max_total_tokens=40, max_batch_total_tokens=4096)
MODEL = ModelInfo("m", "float32", "cpu", 1)
TEAM_A, TEAM_B = Tenant("team-a", ("*",)), Tenant("team-b", ("*",))


class _Tokenizer:
    """Prompts are digits (token id = digit + 1); records the threads that encode, tokenize and template."""

    def __init__(self, delay: float = 0.0) -> None:
        self.special_ids: set[int] = set()
        self.delay = delay
        self.threads: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.get_ident())
        time.sleep(self.delay)  # a long prompt: the time a real tokenizer would take, holding its thread
        return [int(c) + 1 for c in text]

    def offsets(self, text: str) -> list[Any]:
        return [SimpleNamespace(id=i) for i in self.encode(text)]

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        self.threads.append(threading.get_ident())
        return "".join(m["content"] for m in messages)

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))

    def token_text(self, token_id: int) -> str:
        return str(token_id)


def _ledger(registry: Any, settings: RouterSettings) -> RequestLedger:
    return RequestLedger(registry, settings.max_concurrent_requests_per_tenant, settings.max_adapter_loads_per_tenant)


def _world(shard: Any, tokenizer: _Tokenizer | None = None) -> tuple[Scheduler, RouterService, AdapterRegistry]:
    """The real scheduler, service and adapter registry (adapters "a" and "b" loaded) around ``shard``."""
    metrics, tokenizer = Metrics(), tokenizer or _Tokenizer()
    registry = AdapterRegistry(shard, 8, metrics)
    registry.loaded = {"a": 0.0, "b": 0.0}
    ledger = _ledger(registry, SETTINGS)
    scheduler = Scheduler(shard, tokenizer, SETTINGS, set(), metrics, kv=KvBudget(4, 64), on_release=ledger.release)  # type: ignore[arg-type]
    service = RouterService(scheduler, tokenizer, SETTINGS, MODEL, registry, ledger)  # type: ignore[arg-type]
    return scheduler, service, registry


def _params(max_new: int, adapter: str = "", **raw: Any) -> GenerateParameters:
    return validate_parameters({"max_new_tokens": max_new, "adapter_id": adapter, **raw}, SETTINGS)


async def _drain(request: InFlightRequest) -> tuple[list[int], EndEvent | ErrorEvent]:
    ids: list[int] = []
    while True:
        event = await asyncio.wait_for(request.events.get(), 10)
        if isinstance(event, TokenEvent):
            ids.append(event.token.id)
        if isinstance(event, EndEvent | ErrorEvent):
            return ids, event


def _settled(scheduler: Scheduler, service: RouterService, registry: AdapterRegistry) -> None:
    assert not scheduler.waiting and not scheduler.running and not scheduler.members
    assert not registry.refs  # every adapter reference taken at admission was given back
    assert not service._ledger.requests


def test_a_request_the_shard_message_cannot_hold_fails_alone() -> None:
    """top_k 2^32 passes no validator now, but whatever field overflows, only its request may fail."""
    shard = BookkeepingShard(4, 64)
    scheduler, service, registry = _world(shard)

    async def run() -> None:
        jobs = [("123", 6, "a"), ("4567", 5, "a"), ("89", 7, "b"), ("31", 4, "")]
        good = [await service.prepare(p, _params(n, adapter), TEAM_A) for p, n, adapter in jobs[:2]]
        # Overflows uint32 in pb.SamplingParameters: protobuf raises while the batch is built.
        bad_params = dataclasses.replace(_params(5, "a"), top_k=2**32)
        bad = await service.prepare("555", bad_params, TEAM_A)
        good += [await service.prepare(p, _params(n, adapter), TEAM_A) for p, n, adapter in jobs[2:]]
        assert registry.refs == {"a": 3, "b": 1}
        loop = asyncio.ensure_future(scheduler.run())  # all five are admitted in one batch
        results = [await _drain(r) for r in good]
        _, failed = await _drain(bad)
        assert isinstance(failed, ErrorEvent) and failed.error_type == "generation"
        for (prompt, n, _), (ids, end) in zip(jobs, results, strict=True):
            assert isinstance(end, EndEvent) and end.finish_reason == "length"
            assert ids == solo([int(c) + 1 for c in prompt], n)  # exactly what each would get alone
        await asyncio.sleep(0.05)
        _settled(scheduler, service, registry)
        assert shard.free == 64 and not shard.batches
        again = await service.prepare("12", _params(3, "a"), TEAM_A)  # the loop is alive and serving
        assert isinstance((await _drain(again))[1], EndEvent)
        loop.cancel()

    asyncio.run(run())


class _RefusingShard(BookkeepingShard):
    """Refuses a prefill that holds a request whose prompt starts with token ``poison`` (code ``code``); its
    decode steps take a while, as a real shard's do."""

    def __init__(self, code: grpc.StatusCode, poison: int) -> None:
        super().__init__(4, 64)
        self.code, self.poison = code, poison

    def _check(self, batch: pb.Batch | None) -> None:
        if batch is not None and any(r.input_ids[0] == self.poison for r in batch.requests):
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused")

    async def prefill(self, batch: pb.Batch) -> pb.PrefillResponse:
        self._check(batch)
        return await super().prefill(batch)

    async def decode(
        self, batches: Sequence[pb.CachedBatch], new_batch: pb.Batch | None = None, chunks: dict[int, int] | None = None
    ) -> pb.DecodeResponse:
        await asyncio.sleep(0.01)  # a real step's time: the first request still runs when the next one comes
        self._check(new_batch)  # a step with new requests is refused before anything changes
        return await super().decode(batches, new_batch, chunks)


def test_a_batch_the_shard_refuses_fails_that_batch_only() -> None:
    shard = _RefusingShard(grpc.StatusCode.INTERNAL, poison=10)
    scheduler, service, registry = _world(shard)

    async def run() -> None:
        loop = asyncio.ensure_future(scheduler.run())
        first = await service.prepare("1234", _params(12, "a"), TEAM_A)
        await asyncio.wait_for(first.events.get(), 10)  # running: the refused batch is another one
        refused = await service.prepare("9", _params(4, "b"), TEAM_B)
        ids, end = await _drain(first)
        assert isinstance(end, EndEvent) and ids == solo([2, 3, 4, 5], 12)[1:]
        assert isinstance((await _drain(refused))[1], ErrorEvent)
        await asyncio.sleep(0.05)
        _settled(scheduler, service, registry)
        loop.cancel()

    asyncio.run(run())


def test_a_shard_fault_fails_everyone_and_leaves_nothing_behind() -> None:
    shard = _RefusingShard(grpc.StatusCode.UNAVAILABLE, poison=10)
    scheduler, service, registry = _world(shard)

    async def run() -> None:
        loop = asyncio.ensure_future(scheduler.run())
        first = await service.prepare("1234", _params(30, "a"), TEAM_A)
        await asyncio.wait_for(first.events.get(), 10)
        doomed = await service.prepare("9", _params(4, "b"), TEAM_B)
        for r in (first, doomed):
            assert isinstance((await _drain(r))[1], ErrorEvent)
        _settled(scheduler, service, registry)
        loop.cancel()

    asyncio.run(run())


def test_tokenization_and_templates_run_off_the_batching_loop() -> None:
    tokenizer = _Tokenizer(delay=0.5)
    _, service, _ = _world(BookkeepingShard(4, 64), tokenizer)

    async def run() -> None:
        loop_thread = threading.get_ident()
        gaps: list[float] = []

        async def ticker() -> None:  # stands for a stream being served: it must keep its pace
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        tick = asyncio.ensure_future(ticker())
        assert [o.id for o in await service.tokenize("12")] == [2, 3]
        await service.prepare("12", _params(2), None)
        assert await service.chat_prompt([{"role": "user", "content": "hi"}]) == "hi"
        tick.cancel()
        assert len(tokenizer.threads) == 3 and loop_thread not in tokenizer.threads
        assert max(gaps) < 0.25, max(gaps)  # each tokenization took 0.5 s, in its own thread

    asyncio.run(run())


class _CountingShards:
    def __init__(self) -> None:
        self.health_calls = self.list_calls = 0

    async def health(self, timeout: float) -> pb.HealthResponse:
        self.health_calls += 1
        await asyncio.sleep(0.01)
        return pb.HealthResponse(kv_blocks_used=3)

    async def list_adapters(self) -> list[Any]:
        self.list_calls += 1
        await asyncio.sleep(0.01)
        return [adapter_view(pb.AdapterInfo(id="team-a/secret", tier="host", rank=4))]


@pytest.mark.parametrize("ids_shown", [False, True])
def test_metrics_scrapes_read_the_shards_once_per_interval_and_name_adapters_only_if_allowed(ids_shown: bool) -> None:
    shards = _CountingShards()
    metrics = Metrics(adapter_ids=ids_shown)
    scheduler = SimpleNamespace(shards=shards, metrics=metrics, in_flight=0, healthy=True)
    registry = SimpleNamespace(refs={}, loaded={})
    service = RouterService(scheduler, None, SETTINGS, MODEL, registry, _ledger(registry, SETTINGS))  # type: ignore[arg-type]
    metrics.adapter_requests.labels("team-a/secret").inc()
    metrics.adapter_tokens.labels("team-a/secret").inc(5)
    metrics.adapter_load_seconds.labels("team-a/secret").set(0.5)
    metrics.adapter_requests.labels("base").inc()

    async def run() -> str:
        burst = await asyncio.gather(*(service.render_metrics() for _ in range(50)))
        assert shards.list_calls == 1 and shards.health_calls == 1  # a burst: one read of each
        registry.loaded["team-a/other"] = 0.0  # the router loaded an adapter: the next scrape reads tiers again
        await asyncio.gather(*(service.render_metrics() for _ in range(50)))
        assert shards.list_calls == 2 and shards.health_calls == 1
        return burst[-1].decode()

    text = asyncio.run(run())
    assert "loraplex_kv_blocks_used 3.0" in text and 'loraplex_adapters_loaded{tier="host"} 1.0' in text
    assert 'loraplex_adapter_requests_total{adapter="base"} 1.0' in text
    assert ("team-a/secret" in text) is ids_shown
    if not ids_shown:
        assert 'loraplex_adapter_requests_total{adapter="adapter"} 1.0' in text
        assert 'loraplex_adapter_tokens_total{adapter="adapter"} 5.0' in text
        assert "loraplex_adapter_tier{" not in text


class _SlowLoads:
    """Shards whose adapter loads wait for ``gate``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def load_adapter(self, adapter_id: str) -> Any:
        await self.gate.wait()
        return adapter_view(pb.AdapterInfo(id=adapter_id, tier="host", rank=4))


def test_adapter_loads_and_requests_are_limited_per_tenant() -> None:
    settings = dataclasses.replace(SETTINGS, max_adapter_loads_per_tenant=1, max_concurrent_requests_per_tenant=2)
    shards = _SlowLoads()
    metrics = Metrics()
    registry = AdapterRegistry(shards, 8, metrics)  # type: ignore[arg-type]
    ledger = _ledger(registry, settings)
    scheduler = Scheduler(shards, _Tokenizer(), settings, set(), metrics, on_release=ledger.release)  # type: ignore[arg-type]
    service = RouterService(scheduler, scheduler.tokenizer, settings, MODEL, registry, ledger)  # type: ignore[arg-type]

    async def run() -> None:
        a_load = asyncio.ensure_future(service.prepare("1", _params(2, "x"), TEAM_A))
        b_load = asyncio.ensure_future(service.prepare("1", _params(2, "z"), TEAM_B))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as refused:  # team-a waits for one load already
            await service.prepare("1", _params(2, "y"), TEAM_A)
        assert (refused.value.status, refused.value.error_type) == (429, "overloaded")
        assert not a_load.done() and not b_load.done()  # team-b's load is not held up by team-a's limit
        shards.gate.set()
        await asyncio.gather(a_load, b_load)
        # team-a holds one request; a second is allowed, a third is over --max-concurrent-requests-per-tenant.
        await service.prepare("1", _params(2, "x"), TEAM_A)
        with pytest.raises(ApiError) as over:
            await service.prepare("1", _params(2), TEAM_A)
        assert over.value.status == 429
        await service.prepare("1", _params(2), TEAM_B)  # team-b has room
        assert service._ledger.requests == {"team-a": 2, "team-b": 2}
        for r in scheduler.waiting:  # they end without reaching the shards: each is released
            scheduler._finish(r, None)
        assert not service._ledger.requests and not registry.refs

    asyncio.run(run())
