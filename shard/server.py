"""The shard's gRPC servicer: translates protobuf to ``ShardEngine`` calls and errors to status codes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from loraplex.common.messages import from_message, to_message
from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.proto.shard.v1 import shard_pb2_grpc as pb_grpc
from loraplex.shard.engine import BatchError, Generation, NewRequest, ShardEngine, StepError
from loraplex.shard.kv_cache import KVCacheFull
from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.store import AdapterRecord
from loraplex.shard.sampling import SamplingParams

_ADAPTER_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "in_use": grpc.StatusCode.FAILED_PRECONDITION,
}


@contextmanager
def _status(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except AdapterError as exc:
        code = _ADAPTER_CODES.get(exc.kind, grpc.StatusCode.INVALID_ARGUMENT)
        context.abort(code, f"{exc.kind}: {exc}")
    except StepError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except BatchError as exc:
        context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    except KVCacheFull as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _generation(g: Generation) -> pb.Generation:
    out = pb.Generation(
        request_id=g.request_id,
        token=pb.Token(id=g.choice.token_id, logprob=g.choice.logprob),
        cached_tokens=g.cached_tokens,
    )
    out.top_tokens.extend(pb.Token(id=i, logprob=lp) for i, lp in g.choice.top_tokens)
    if g.prefill:
        out.prefill_tokens.extend(pb.Token(id=i, logprob=lp) for i, lp in g.prefill)
    return out


# Knobs a valid request never sets to 0, where proto3's 0 is "unset": a value that is not positive and finite
# means the knob's neutral default.
_RATIOS = ("temperature", "top_p", "typical_p", "repetition_penalty")


def _sampling(s: pb.SamplingParameters) -> SamplingParams:
    neutral = SamplingParams()
    unset = {n: getattr(neutral, n) for n in _RATIOS if not (getattr(s, n) > 0 and math.isfinite(getattr(s, n)))}
    return from_message(SamplingParams, s, **unset)


def _new_requests(batch: pb.Batch) -> list[NewRequest]:
    return [
        NewRequest(
            r.id,
            list(r.input_ids),
            r.adapter_id,
            _sampling(r.sampling),
            r.top_n_tokens,
            r.prefill_logprobs,
            r.generated_tokens,
            r.prefill_chunk,
        )
        for r in batch.requests
    ]


def adapter_info(rec: AdapterRecord) -> pb.AdapterInfo:
    return to_message(pb.AdapterInfo, rec, id=rec.adapter_id)


class EngineServicer(pb_grpc.ShardServicer):
    """The gRPC face of a ``ShardEngine``, thin: every method is conversion around one engine call."""

    def __init__(self, engine: ShardEngine, info: pb.InfoResponse) -> None:
        self.engine = engine
        self.info = info

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return self.info

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        used, free, batches, requests = self.engine.stats()
        queried, hit, cached = self.engine.prefix_stats()
        return pb.HealthResponse(
            kv_blocks_used=used,
            kv_blocks_free=free,
            cached_batches=batches,
            cached_requests=requests,
            prefix_queried_tokens=queried,
            prefix_hit_tokens=hit,
            prefix_cached_blocks=cached,
        )

    def Warmup(self, request: pb.WarmupRequest, context: grpc.ServicerContext) -> pb.WarmupResponse:
        with _status(context):
            blocks = self.engine.warmup(request.batch_size, request.input_length)
        size = self.engine.runner.cache.block_size
        return pb.WarmupResponse(block_size=size, num_blocks=blocks, max_supported_total_tokens=blocks * size)

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrefillResponse:
        reqs = _new_requests(request.batch)
        with _status(context):
            gens = self.engine.prefill(request.batch.id, reqs)
        ids = [r.request_id for r in reqs]
        return pb.PrefillResponse(
            generations=[_generation(g) for g in gens], batch=pb.CachedBatch(id=request.batch.id, request_ids=ids)
        )

    def Decode(self, request: pb.DecodeRequest, context: grpc.ServicerContext) -> pb.DecodeResponse:
        # A new_batch without requests is no new batch (a router may always set the field).
        joining = request.HasField("new_batch") and len(request.new_batch.requests) > 0
        new = (request.new_batch.id, _new_requests(request.new_batch)) if joining else None
        with _status(context):
            batch_id, gens = self.engine.step([b.id for b in request.batches], new, dict(request.chunks))
        return pb.DecodeResponse(
            generations=[_generation(g) for g in gens],
            batch=pb.CachedBatch(id=batch_id, request_ids=self.engine.members(batch_id)),
        )

    def FilterBatch(self, request: pb.FilterBatchRequest, context: grpc.ServicerContext) -> pb.FilterBatchResponse:
        with _status(context):
            kept = self.engine.filter(request.batch_id, list(request.request_ids))
        return pb.FilterBatchResponse(batch=pb.CachedBatch(id=request.batch_id, request_ids=kept))

    def ClearCache(self, request: pb.ClearCacheRequest, context: grpc.ServicerContext) -> pb.ClearCacheResponse:
        self.engine.clear(request.batch_id if request.HasField("batch_id") else None)
        return pb.ClearCacheResponse()

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> pb.LoadAdapterResponse:
        store = self.engine.store
        with _status(context):  # in pieces on the model thread, between steps: batches keep running meanwhile
            store.load(request.id)
        return pb.LoadAdapterResponse(adapter=adapter_info(store.record(request.id)))

    def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        with _status(context):
            self.engine.unload_adapter(request.id)
        return pb.UnloadAdapterResponse()

    def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[adapter_info(r) for r in self.engine.store.records()])


def serve(servicer: EngineServicer, address: str, **options: Any) -> grpc.Server:
    """Start a gRPC server on ``address`` (``unix:///path`` or ``host:port``) and return it."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    pb_grpc.add_ShardServicer_to_server(servicer, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server
