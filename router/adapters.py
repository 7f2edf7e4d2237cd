"""The router's view of adapter residency: loads on first use off the request path, evicts by LRU.

Policy (the shards only execute it):
- An adapter a request names is loaded into the shards' host memory before the request is queued; the
  request's HTTP/gRPC call waits for that load, every other request keeps being served meanwhile, and
  concurrent requests for the same adapter share one load.
- The shards enforce the limits (``--max-active-adapters`` + ``--max-cpu-adapters`` adapters, and the byte
  budgets ``--max-cpu-adapter-bytes`` / ``--max-device-adapter-bytes``) and refuse a load past them with
  RESOURCE_EXHAUSTED, only after the id resolved under their roots and the adapter passed every check that
  reads no tensor. Then, and only then, the least recently used adapter that no queued or running request
  needs is unloaded and the load asked again: an id that does not exist (a tenant may name any id its globs
  allow) or a broken adapter never evicts anyone. When every loaded adapter is needed, the load waits
  until one is not: running requests always finish, so the wait is bounded by the longest generation in
  flight; loads never evict what is in use (no thrash).
- Which loaded adapters sit on the device is decided at admission (see ``Scheduler``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import grpc

from loraplex.router.errors import ApiError, adapter_not_found
from loraplex.router.metrics import Metrics
from loraplex.router.shards import ShardClients
from loraplex.router.views import AdapterView

log = logging.getLogger("loraplex.router")


class AdapterRegistry:
    """Loaded adapters (LRU order), in-flight requests per adapter, and the loads in progress."""

    def __init__(self, shards: ShardClients, capacity: int, metrics: Metrics, parallel_loads: int = 2) -> None:
        self.shards = shards
        self.capacity = max(1, capacity)  # for information: the shards enforce their limits (counts and bytes)
        self.metrics = metrics
        self.loaded: dict[str, float] = {}  # id -> last use
        self.refs: Counter[str] = Counter()
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._loading: set[str] = set()
        self._room = asyncio.Event()
        self._parallel = asyncio.Semaphore(parallel_loads)

    async def sync(self) -> None:
        """Take over what the shards hold (at start-up, after a router restart, or after a shard restart,
        which forgets the adapters loaded on demand)."""
        now = time.monotonic()
        held = [a.id for a in await self.shards.list_adapters() if a.tier in ("host", "device")]
        self.loaded = {adapter_id: self.loaded.get(adapter_id, now) for adapter_id in held}

    @property
    def pending_loads(self) -> int:
        return len(self._loads)

    def acquire(self, adapter_id: str) -> None:
        """A request needs ``adapter_id`` until ``release``: it will not be unloaded meanwhile."""
        self.refs[adapter_id] += 1

    def release(self, adapter_id: str) -> None:
        self.refs[adapter_id] -= 1
        if self.refs[adapter_id] <= 0:
            del self.refs[adapter_id]
            self._room.set()

    async def ensure(self, adapter_id: str) -> None:
        """Return once ``adapter_id`` is loaded on every shard; raise ApiError if it cannot be."""
        if adapter_id in self.loaded:
            self.loaded[adapter_id] = time.monotonic()
            return
        task = self._loads.get(adapter_id)
        if task is None:
            task = self._loads[adapter_id] = asyncio.create_task(self._load(adapter_id))
        # Shielded: a client that leaves does not abort a load that others may be waiting for.
        await asyncio.shield(task)

    async def _load(self, adapter_id: str) -> None:
        try:
            async with self._parallel:
                self._loading.add(adapter_id)
                started = time.perf_counter()
                try:
                    info = await self._load_making_room(adapter_id)
                finally:
                    self._loading.discard(adapter_id)
                self.loaded[adapter_id] = time.monotonic()
                self.metrics.adapter_loads.inc()
                self.metrics.adapter_load_seconds.labels(adapter_id).set(time.perf_counter() - started)
                log.info("adapter loaded", extra={"adapter": adapter_id, "bytes": info.bytes, "rank": info.rank})
        except grpc.aio.AioRpcError as exc:
            raise _load_error(adapter_id, exc) from None
        finally:
            self._loads.pop(adapter_id, None)
            self._room.set()  # a load waiting for room looks again: what this one loaded may be idle already

    async def _load_making_room(self, adapter_id: str) -> AdapterView:
        """Ask the shards to load; only when they answer that it exists, is valid and does not fit
        (RESOURCE_EXHAUSTED: count or byte limits, which only they measure) is an idle adapter unloaded,
        and the load asked again. So an id that does not exist, or a broken adapter, never evicts anyone."""
        while True:
            try:
                return await self.shards.load_adapter(adapter_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refusal = exc
            if not await self._evict_one():
                held = any(a in self.loaded for a in self.refs)
                if not held and len(self._loading) <= 1:  # nothing loaded will ever become idle: waiting cannot help
                    raise refusal
                self._room.clear()
                await self._room.wait()

    async def _evict_one(self) -> bool:
        """Unload the least recently used adapter no request needs; False when every loaded one is needed."""
        idle = [a for a in self.loaded if self.refs[a] <= 0 and a not in self._loading]
        if not idle:
            return False
        victim = min(idle, key=self.loaded.__getitem__)
        del self.loaded[victim]
        self.metrics.adapter_evictions.inc()
        try:
            await self.shards.unload_adapter(victim)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                self.loaded[victim] = time.monotonic()
                raise
        return True

    async def unload(self, adapter_id: str) -> None:
        """Free ``adapter_id`` on every shard (the admin API); refused while a request needs it."""
        if self.refs[adapter_id] > 0 or adapter_id in self._loads:
            raise ApiError(409, "adapter_in_use", f"adapter {adapter_id!r} is used by requests in flight")
        try:
            await self.shards.unload_adapter(adapter_id)
        except grpc.aio.AioRpcError as exc:
            raise _load_error(adapter_id, exc) from None
        self.loaded.pop(adapter_id, None)
        self._room.set()


def _load_error(adapter_id: str, exc: grpc.aio.AioRpcError) -> ApiError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return adapter_not_found(adapter_id)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return ApiError(409, "adapter_in_use", f"adapter {adapter_id!r} is used by requests in flight")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(422, "adapter_invalid", f"adapter {adapter_id!r} cannot be served: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, "overloaded", f"adapter {adapter_id!r} cannot be loaded now: {details}")
    return ApiError(424, "generation", f"loading adapter {adapter_id!r} failed: {code.name} {details}")
