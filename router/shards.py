"""gRPC clients of every shard rank; each call fans out to all ranks and rank 0's answer is used."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from loraplex.common.messages import from_message
from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.proto.shard.v1 import shard_pb2_grpc as pb_grpc
from loraplex.router.views import AdapterView


class ShardClients:
    """All ranks of one tensor-parallel model; the router talks to them as one."""

    def __init__(self, addresses: Sequence[str]) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self.addresses = tuple(addresses)
        self.channels = [grpc.aio.insecure_channel(a, options=options) for a in addresses]
        self.stubs = [pb_grpc.ShardStub(c) for c in self.channels]

    async def _all(self, call: Callable[[pb_grpc.ShardStub], Any]) -> Any:
        results = await asyncio.gather(*(call(s) for s in self.stubs))
        return results[0]

    async def health(self, timeout: float = 5.0) -> pb.HealthResponse:
        return await self._all(lambda s: s.Health(pb.HealthRequest(), timeout=timeout))

    async def warmup(self, batch_size: int, input_length: int) -> pb.WarmupResponse:
        """Every rank's KV capacity; the smallest is what the router may fill (ranks should agree)."""
        req = pb.WarmupRequest(batch_size=batch_size, input_length=input_length)
        answers = await asyncio.gather(*(s.Warmup(req) for s in self.stubs))
        if len({a.block_size for a in answers}) > 1:
            raise ValueError(f"the shards disagree on the KV block size: {sorted({a.block_size for a in answers})}")
        return min(answers, key=lambda a: a.num_blocks)

    async def prefill(self, batch: pb.Batch) -> pb.PrefillResponse:
        return await self._all(lambda s: s.Prefill(pb.PrefillRequest(batch=batch)))

    async def decode(
        self,
        batches: Sequence[pb.CachedBatch],
        new_batch: pb.Batch | None = None,
        chunks: dict[int, int] | None = None,
    ) -> pb.DecodeResponse:
        """One step: every cached request's next token or prompt chunk (``chunks``), and ``new_batch`` joining."""
        req = pb.DecodeRequest(batches=list(batches), new_batch=new_batch, chunks=chunks or {})
        return await self._all(lambda s: s.Decode(req))

    async def filter(self, batch_id: int, keep: Sequence[int]) -> pb.FilterBatchResponse:
        return await self._all(lambda s: s.FilterBatch(pb.FilterBatchRequest(batch_id=batch_id, request_ids=keep)))

    async def clear(self, batch_id: int | None = None) -> None:
        req = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(batch_id=batch_id)
        await self._all(lambda s: s.ClearCache(req))

    async def list_adapters(self) -> list[AdapterView]:
        resp = await self.stubs[0].ListAdapters(pb.ListAdaptersRequest(), timeout=10)
        return [adapter_view(a) for a in resp.adapters]

    async def load_adapter(self, adapter_id: str) -> AdapterView:
        resp = await self._all(lambda s: s.LoadAdapter(pb.LoadAdapterRequest(id=adapter_id)))
        return adapter_view(resp.adapter)

    async def unload_adapter(self, adapter_id: str) -> None:
        await self._all(lambda s: s.UnloadAdapter(pb.UnloadAdapterRequest(id=adapter_id)))

    async def wait_ready(self, timeout: float) -> pb.InfoResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:  # a shard serves only once its model is loaded: every rank answering Info means ready
                infos = await asyncio.gather(*(s.Info(pb.InfoRequest(), timeout=2.0) for s in self.stubs))
                break
            except grpc.aio.AioRpcError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for position, (address, info) in enumerate(zip(self.addresses, infos, strict=True)):
            # Shards started without their ranks would each hold the whole model and answer alike: the
            # output looks right while nothing is split. Refuse that set-up instead.
            if info.rank != position or info.world_size != len(self.addresses):
                raise ValueError(
                    f"the shard at {address} is rank {info.rank} of {info.world_size}, but it is listed as "
                    f"rank {position} of {len(self.addresses)} (start each shard with --rank and --num-shard, "
                    "rank 0 first in --shard-uds)"
                )
        return infos[0]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


def adapter_view(a: pb.AdapterInfo) -> AdapterView:
    """The shard's record as a router type, so that no shard message reaches the APIs."""
    return from_message(AdapterView, a, targets=tuple(a.targets))
