"""What every public API shares: request preparation (validation, tokenization, adapter check) and results."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from loraplex.common.adapter_ids import adapter_id_problem
from loraplex.proto.shard.v1 import shard_pb2 as shard_pb
from loraplex.router.adapters import AdapterRegistry
from loraplex.router.errors import ApiError, adapter_not_found
from loraplex.router.scheduler import EndEvent, Entry, ErrorEvent, Event, Overloaded, Scheduler
from loraplex.router.settings import RouterSettings
from loraplex.router.tenancy import Tenant, Tenants
from loraplex.router.tokenizer import TextTokenizer
from loraplex.router.validation import GenerateParameters, ValidationError, check_lengths


@dataclass
class ServerInfo:
    model_id: str
    model_dir: str
    dtype: str
    device: str
    num_shard: int


class RouterService:
    """Turns validated requests into scheduler entries and scheduler events into results."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: TextTokenizer,
        settings: RouterSettings,
        info: ServerInfo,
        registry: AdapterRegistry,
        tenants: Tenants | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.settings = settings
        self.info = info
        self.registry = registry
        self.tenants = tenants
        self.draining = False  # set on SIGTERM: new work is refused, in-flight work finishes
        scheduler.on_finish = self._finished
        scheduler.on_recovered = registry.sync

    @property
    def busy(self) -> bool:
        return self.scheduler.in_flight + self.registry.pending_loads > 0

    def _finished(self, entry: Entry) -> None:
        if entry.params.adapter_id:
            self.registry.release(entry.params.adapter_id)

    def check_adapter(self, adapter_id: str, tenant: Tenant | None) -> None:
        """Refuse what this caller may not use: a forbidden adapter looks exactly like a missing one."""
        if not adapter_id:
            if tenant is not None and not tenant.base:
                raise ApiError(403, "forbidden", "this API key may not use the base model; name an adapter")
            return
        if adapter_id_problem(adapter_id) is not None or (tenant is not None and not tenant.allows(adapter_id)):
            raise adapter_not_found(adapter_id)

    async def visible_adapters(self, tenant: Tenant | None) -> list[shard_pb.AdapterInfo]:
        """Every adapter the shards can serve (any tier) that this caller may use."""
        adapters = await self.scheduler.shards.list_adapters()
        return [a for a in adapters if tenant is None or tenant.allows(a.id)]

    async def prepare(self, inputs: object, params: GenerateParameters, tenant: Tenant | None = None) -> Entry:
        """Validate, tokenize, load the adapter if needed, queue; raises ApiError before anything is generated."""
        if self.draining:
            raise ApiError(503, "unavailable", "the server is shutting down; retry on another replica")
        if not isinstance(inputs, str):
            raise ApiError(422, "validation", "`inputs` must be a string")
        if not inputs:
            raise ApiError(422, "validation", "`inputs` cannot be empty")
        self.check_adapter(params.adapter_id, tenant)
        ids = self.tokenizer.encode(inputs)
        if params.truncate is not None:
            ids = ids[-params.truncate :]
        try:
            max_new = check_lengths(len(ids), params, self.settings)
        except ValidationError as exc:
            raise ApiError(422, "validation", str(exc)) from exc
        if self.scheduler.in_flight + self.registry.pending_loads >= self.settings.max_concurrent_requests:
            raise ApiError(429, "overloaded", "Model is overloaded")
        adapter = params.adapter_id
        if adapter:
            self.registry.acquire(adapter)  # from now until the request ends, the adapter stays loaded
            try:
                await self.registry.ensure(adapter)
            except BaseException:
                self.registry.release(adapter)
                raise
        entry = Entry(ids, params, max_new)
        try:
            self.scheduler.submit(entry)
        except Overloaded as exc:
            if adapter:
                self.registry.release(adapter)
            raise ApiError(429, "overloaded", str(exc)) from exc
        self.scheduler.metrics.adapter_requests.labels(adapter or "base").inc()
        return entry

    async def load_adapter(self, adapter_id: str) -> shard_pb.AdapterInfo:
        """Admin load: the same path as a first request, then the adapter's record."""
        self.check_adapter(adapter_id, None)
        await self.registry.ensure(adapter_id)
        return await self.adapter_info(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> None:
        self.check_adapter(adapter_id, None)
        await self.registry.unload(adapter_id)

    async def adapter_info(self, adapter_id: str) -> shard_pb.AdapterInfo:
        for a in await self.scheduler.shards.list_adapters():
            if a.id == adapter_id:
                return a
        raise adapter_not_found(adapter_id)

    async def events(self, entry: Entry) -> AsyncIterator[Event]:
        """The entry's events until its end; leaving early (client gone) cancels the request."""
        try:
            while True:
                event = await entry.events.get()
                yield event
                if isinstance(event, EndEvent | ErrorEvent):
                    return
        finally:
            self.scheduler.cancel(entry)

    async def result(self, entry: Entry, gone: Awaitable[None] | None = None) -> EndEvent:
        """The entry's end. ``gone`` completes when the client hangs up: the request is cancelled then,
        freeing its batch slot and KV blocks, rather than generated to the end for nobody."""
        if gone is None:
            return await self._result(entry)
        task = asyncio.ensure_future(self._result(entry))
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

    async def _result(self, entry: Entry) -> EndEvent:
        async for event in self.events(entry):
            if isinstance(event, ErrorEvent):
                raise ApiError(404 if event.error_type == "adapter_not_found" else 424, event.error_type, event.message)
            if isinstance(event, EndEvent):
                return event
        raise ApiError(424, "generation", "generation ended without a result")

    def full_text(self, inputs: str, end: EndEvent, params: GenerateParameters) -> str:
        return inputs + end.generated_text if params.return_full_text else end.generated_text
