"""The router's façade: everything the public APIs ask of the router, answered in router types."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tokenizers import Tokenizer

from loraplex import __version__
from loraplex.common.adapter_ids import adapter_id_problem
from loraplex.router.adapters import AdapterRegistry
from loraplex.router.errors import ApiError, adapter_not_found
from loraplex.router.events import EndEvent, ErrorEvent, Event
from loraplex.router.inflight import InFlightRequest, Overloaded
from loraplex.router.ledger import RequestLedger
from loraplex.router.scheduler import Scheduler
from loraplex.router.settings import RouterSettings
from loraplex.router.tenancy import Tenant, Tenants
from loraplex.router.tokenizer import Offsets, TextTokenizer
from loraplex.router.validation import GenerateParameters, ValidationError, check_lengths
from loraplex.router.views import AdapterView, Health, ModelInfo, ServerInfo

T = TypeVar("T")

# /metrics is open: however often it is scraped, the shards are asked at most this often.
KV_READ_INTERVAL_S = 1.0  # Health, for the KV blocks in use
ADAPTER_READ_INTERVAL_S = 10.0  # ListAdapters, which walks the adapter roots, for the tiers
TOKENIZER_THREADS = 2  # tokenization and chat templates run here, never on the batching loop


class RouterService:
    """The router's façade: the one object the HTTP (TGI, OpenAI, admin) and gRPC APIs call.

    It validates, tokenizes and admits requests, hands back their events and results, and answers
    info, health, metrics and adapter questions, always in router types (``loraplex.router.events``,
    ``loraplex.router.views``): each API only translates them to its own wire format. What lies
    behind it (scheduler, adapter registry, shard clients) is not the APIs' business.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: TextTokenizer,
        settings: RouterSettings,
        model: ModelInfo,
        registry: AdapterRegistry,
        ledger: RequestLedger,
        tenants: Tenants | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self.settings = settings
        self.model = model
        self._registry = registry
        self.tenants = tenants
        self.draining = False
        self._ledger = ledger  # the scheduler releases into it (see build_service)
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="loraplex-tokenizer")
        self._metrics_lock = asyncio.Lock()
        self._kv_read_at = self._adapters_read_at = -float("inf")
        self._adapters_read_for: set[str] = set()  # what the router had loaded at the last ListAdapters

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def vocabulary(self) -> Tokenizer:
        """The model's ``tokenizers`` tokenizer: grammars are compiled against it (``router/grammar.py``)."""
        return self._tokenizer.tokenizer

    @property
    def in_flight(self) -> int:
        return self._scheduler.in_flight

    @property
    def busy(self) -> bool:
        return self._scheduler.in_flight + self._registry.pending_loads > 0

    def drain(self) -> None:
        """From now on (SIGTERM) new work is refused and /health is 503; in-flight work finishes."""
        self.draining = True

    async def run(self) -> None:
        """The batching loop; runs for the life of the server."""
        m, model = self._scheduler.metrics, self.model
        m.adapter_names.limit = self.settings.metrics_top_adapters
        m.cache_configured(model.kv_block_size, model.kv_blocks, model.prefix_caching)
        await self._scheduler.run()

    def info(self) -> ServerInfo:
        s, m = self.settings, self.model
        return ServerInfo(
            model_id=self.model.model_id,
            model_dtype=self.model.dtype,
            model_device_type=self.model.device,
            max_input_tokens=s.max_input_tokens,
            max_total_tokens=s.max_total_tokens,
            max_concurrent_requests=s.max_concurrent_requests,
            max_stop_sequences=s.max_stop_sequences,
            max_best_of=1,
            max_batch_total_tokens=m.kv_blocks * m.kv_block_size or s.max_batch_total_tokens,
            max_batch_prefill_tokens=s.max_batch_prefill_tokens,
            num_shard=self.model.num_shard,
            router="loraplex",
            version=__version__,
            kv_block_size=m.kv_block_size,
            kv_blocks=m.kv_blocks,
            prefix_caching=m.prefix_caching,
        )

    async def health(self) -> Health:
        """Ready when every shard answers, the last batch step left them clean, and no drain has begun."""
        try:
            await self._scheduler.shards.health(timeout=2.0)
        except Exception:  # whatever keeps a shard from answering, the router cannot serve
            return Health(False, "unhealthy", "shards unavailable")
        if not self._scheduler.healthy:
            return Health(False, "unhealthy", "shards unavailable")
        if self.draining:
            return Health(False, "unavailable", "shutting down")
        return Health(True)

    async def render_metrics(self) -> bytes:
        """Prometheus text, with the shards' KV use and adapter tiers as last read: at most every
        KV_READ_INTERVAL_S and ADAPTER_READ_INTERVAL_S, or once the router loaded or unloaded an adapter
        since (which a scrape cannot cause), so a burst of scrapes costs the shards one read. What the router
        itself knows (queue, batch, adapters held and awaited) is read at every scrape."""
        m = self._scheduler.metrics
        async with self._metrics_lock:  # concurrent scrapes wait for one read rather than each making one
            with contextlib.suppress(Exception):  # metrics stay readable whatever a stand-in scheduler lacks
                self._router_gauges()
            try:
                if time.monotonic() - self._kv_read_at >= KV_READ_INTERVAL_S:
                    self._kv_read_at = time.monotonic()
                    health = await self._scheduler.shards.health(timeout=2.0)
                    self._shard_gauges(health)
                held = set(self._registry.loaded)
                if (
                    time.monotonic() - self._adapters_read_at >= ADAPTER_READ_INTERVAL_S
                    or held != self._adapters_read_for
                ):
                    self._adapters_read_at, self._adapters_read_for = time.monotonic(), held
                    loaded = [a for a in await self._scheduler.shards.list_adapters() if a.tier in ("host", "device")]
                    m.adapter_tier.clear()
                    if m.adapter_ids:
                        for a in loaded:
                            if a.id in m.adapter_names.named:  # bounded like every per-adapter series
                                m.adapter_tier.labels(a.id, a.tier).set(1)
                    for tier in ("host", "device"):
                        m.adapters_loaded.labels(tier).set(sum(a.tier == tier for a in loaded))
            except Exception:
                pass  # metrics stay readable when shards are down
        return m.render()

    def _shard_gauges(self, health: Any) -> None:
        """KV use (as the count and as the fraction of the shards' blocks) and the prefix cache's counters."""
        m = self._scheduler.metrics
        m.kv_blocks_used.set(health.kv_blocks_used)
        blocks = health.kv_blocks_used + health.kv_blocks_free
        m.kv_usage.set(health.kv_blocks_used / blocks if blocks else 0.0)
        m.prefix_queries.update(health.prefix_queried_tokens)
        m.prefix_hits.update(health.prefix_hit_tokens)
        m.prefix_cached_blocks.set(health.prefix_cached_blocks)

    def _router_gauges(self) -> None:
        """The queue, the batch and the LoRA info gauge, as they are now (docs/metrics.md).

        ``running_lora_adapters``: the adapters this replica holds in memory (device or host, most recently
        used first); a request for one starts without reading its files. ``waiting_lora_adapters``: adapters
        of requests waiting, for their load from disk or in the queue. A gateway's LoRA-affinity picker sends
        an adapter's requests where it is listed, so it is loaded on one replica, not on every one."""
        scheduler, registry, m = self._scheduler, self._registry, self._scheduler.metrics
        m.requests_waiting.set(len(scheduler.waiting))
        m.requests_running.set(len(scheduler.running))
        loaded = registry.loaded
        running = sorted(loaded, key=loaded.__getitem__, reverse=True)
        waiting = dict.fromkeys(a for a in registry.refs if a not in loaded)  # being loaded (ordered, unique)
        waiting.update(dict.fromkeys(e.params.adapter_id for e in scheduler.waiting if e.params.adapter_id))
        m.lora_state(min(scheduler.adapter_slots, registry.capacity), running, waiting)

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """``work`` in a tokenizer thread: a long prompt or template never stalls the streams being served."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, work, *args)

    async def tokenize(self, text: str) -> list[Offsets]:
        return await self._off_loop(self._tokenizer.offsets, text)

    async def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The base model's chat template applied; raises TemplateFailure when it refuses the messages."""
        return await self._off_loop(self._tokenizer.apply_chat_template, messages)

    def check_adapter(self, adapter_id: str, tenant: Tenant | None) -> None:
        """Refuse what this caller may not use: a forbidden adapter looks exactly like a missing one."""
        if not adapter_id:
            if tenant is not None and not tenant.base:
                raise ApiError(403, "forbidden", "this API key may not use the base model; name an adapter")
            return
        if adapter_id_problem(adapter_id) is not None or (tenant is not None and not tenant.allows(adapter_id)):
            raise adapter_not_found(adapter_id)

    async def list_adapters(self, tenant: Tenant | None = None) -> list[AdapterView]:
        """Every adapter the shards can serve (any tier) that this caller may use (all of them for None)."""
        adapters = await self._scheduler.shards.list_adapters()
        refs = self._registry.refs
        return [
            dataclasses.replace(a, in_flight=refs.get(a.id, 0))
            for a in adapters
            if tenant is None or tenant.allows(a.id)
        ]

    async def prepare(
        self, inputs: object, params: GenerateParameters, tenant: Tenant | None = None
    ) -> InFlightRequest:
        """Validate, tokenize, load the adapter if needed, queue; raises ApiError before anything is generated."""
        if self.draining:
            raise ApiError(503, "unavailable", "the server is shutting down; retry on another replica")
        if not isinstance(inputs, str):
            raise ApiError(422, "validation", "`inputs` must be a string")
        if not inputs:
            raise ApiError(422, "validation", "`inputs` cannot be empty")
        self.check_adapter(params.adapter_id, tenant)
        name = tenant.name if tenant is not None else ""
        self._ledger.enter(name)  # counted from now: others may pass the check while this one tokenizes
        try:
            request = await self._queue(inputs, params, name)
        except BaseException:
            self._ledger.leave(name)
            raise
        metrics = self._scheduler.metrics
        metrics.adapter_names.requested(params.adapter_id or "base")  # before labelling: it may name the adapter
        metrics.adapter_requests.labels(params.adapter_id or "base").inc()
        return request

    async def _queue(self, inputs: str, params: GenerateParameters, tenant: str) -> InFlightRequest:
        """Tokenize, check lengths and load, acquire the adapter, submit; the scheduler owns the request then."""
        ids = await self._off_loop(self._tokenizer.encode, inputs)
        if params.truncate is not None:
            ids = ids[-params.truncate :]
        try:
            max_new = check_lengths(len(ids), params, self.settings)
        except ValidationError as exc:
            raise ApiError(422, "validation", str(exc)) from exc
        if self._scheduler.in_flight + self._registry.pending_loads >= self.settings.max_concurrent_requests:
            raise ApiError(429, "overloaded", "Model is overloaded")
        adapter = params.adapter_id
        if adapter:
            self._registry.acquire(adapter)  # from now until the request ends, the adapter stays loaded
            try:
                await self._ledger.load(adapter, tenant)
            except BaseException:
                self._registry.release(adapter)
                raise
        request = InFlightRequest(ids, params, max_new, tenant=tenant)
        try:
            self._scheduler.submit(request)
        except Overloaded as exc:
            if adapter:
                self._registry.release(adapter)
            raise ApiError(429, "overloaded", str(exc)) from exc
        return request

    async def load_adapter(self, adapter_id: str) -> AdapterView:
        """Admin load: the same path as a first request, then the adapter's record."""
        self.check_adapter(adapter_id, None)
        await self._registry.ensure(adapter_id)
        return await self.adapter_info(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> None:
        self.check_adapter(adapter_id, None)
        await self._registry.unload(adapter_id)

    async def adapter_info(self, adapter_id: str) -> AdapterView:
        for a in await self.list_adapters():
            if a.id == adapter_id:
                return a
        raise adapter_not_found(adapter_id)

    def cancel(self, request: InFlightRequest) -> None:
        """The client is gone: the request frees its batch slot and KV blocks at the next step."""
        self._scheduler.cancel(request)

    async def events(self, request: InFlightRequest) -> AsyncIterator[Event]:
        """The request's events until its end; leaving early (client gone) cancels the request."""
        try:
            while True:
                event = await request.events.get()
                yield event
                if isinstance(event, EndEvent | ErrorEvent):
                    return
        finally:
            self._scheduler.cancel(request)

    async def result(self, request: InFlightRequest, gone: Awaitable[None] | None = None) -> EndEvent:
        """The request's end. ``gone`` completes when the client hangs up: the request is cancelled then,
        freeing its batch slot and KV blocks, rather than generated to the end for nobody."""
        if gone is None:
            return await self._result(request)
        task = asyncio.ensure_future(self._result(request))
        watcher = asyncio.ensure_future(gone)
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise ApiError(499, "cancelled", "the client closed the connection")
        return task.result()

    async def _result(self, request: InFlightRequest) -> EndEvent:
        async for event in self.events(request):
            if isinstance(event, ErrorEvent):
                raise ApiError(404 if event.error_type == "adapter_not_found" else 424, event.error_type, event.message)
            if isinstance(event, EndEvent):
                return event
        raise ApiError(424, "generation", "generation ended without a result")

    def full_text(self, inputs: str, end: EndEvent, params: GenerateParameters) -> str:
        return inputs + end.generated_text if params.return_full_text else end.generated_text
