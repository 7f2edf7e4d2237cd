"""The router's residency registry: it evicts only once the shards say an adapter exists and does not fit."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from loraplex.router.adapters import AdapterRegistry
from loraplex.router.errors import ApiError
from loraplex.router.metrics import Metrics


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeShards:
    """A shard that enforces its own limit, as the real one does (existence and validity first)."""

    def __init__(self, exists: set[str], limit: int) -> None:
        self.exists, self.limit = exists, limit
        self.loaded: list[str] = []
        self.unloads: list[str] = []

    async def load_adapter(self, adapter_id: str) -> Any:
        await asyncio.sleep(0)
        if adapter_id not in self.exists:
            raise _error(grpc.StatusCode.NOT_FOUND, f"not_found: adapter {adapter_id!r} not found")
        if adapter_id == "broken":
            raise _error(grpc.StatusCode.INVALID_ARGUMENT, "corrupt: truncated")
        if adapter_id not in self.loaded:
            if len(self.loaded) >= self.limit:
                raise _error(grpc.StatusCode.RESOURCE_EXHAUSTED, "capacity: full")
            self.loaded.append(adapter_id)
        return SimpleNamespace(bytes=1, rank=4)

    async def unload_adapter(self, adapter_id: str) -> None:
        self.loaded.remove(adapter_id)
        self.unloads.append(adapter_id)


def _registry(shards: FakeShards) -> AdapterRegistry:
    return AdapterRegistry(shards, 2, Metrics())  # type: ignore[arg-type]


def test_missing_and_broken_adapters_evict_nobody() -> None:
    async def scenario() -> None:
        shards = FakeShards({"a", "b", "c", "broken"}, limit=2)
        registry = _registry(shards)
        await registry.ensure("a")
        await registry.ensure("b")
        for adapter in [f"missing-{i}" for i in range(50)] + ["broken"]:
            with pytest.raises(ApiError) as info:
                await registry.ensure(adapter)
            assert info.value.status in (404, 422)
        assert shards.unloads == [] and shards.loaded == ["a", "b"]
        await registry.ensure("c")  # a real one that does not fit: the least recently used idle one goes
        assert shards.unloads == ["a"] and sorted(registry.loaded) == ["b", "c"]

    asyncio.run(scenario())


def test_a_load_waits_while_every_loaded_adapter_is_in_use() -> None:
    async def scenario() -> None:
        shards = FakeShards({"a", "b", "c"}, limit=2)
        registry = _registry(shards)
        for adapter in ("a", "b"):
            registry.acquire(adapter)
            await registry.ensure(adapter)
        registry.acquire("c")
        waiting = asyncio.create_task(registry.ensure("c"))
        await asyncio.sleep(0.05)
        assert not waiting.done() and shards.unloads == []  # in use: never evicted
        registry.release("b")
        await asyncio.wait_for(waiting, 5)
        assert shards.unloads == ["b"] and sorted(shards.loaded) == ["a", "c"]

    asyncio.run(scenario())
