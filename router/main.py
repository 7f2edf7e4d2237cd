"""``loraplex-router``: connects to the shards, then serves HTTP (TGI + OpenAI) and the public gRPC API."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import grpc
import uvicorn

from loraplex.common.flags import fail
from loraplex.common.logs import setup_logging
from loraplex.router.adapters import AdapterRegistry
from loraplex.router.app import create_app
from loraplex.router.grpc_api import serve_grpc
from loraplex.router.kv_budget import KvBudget
from loraplex.router.ledger import RequestLedger
from loraplex.router.lifecycle import DrainingServer
from loraplex.router.metrics import Metrics
from loraplex.router.prefix_estimate import PrefixEstimate
from loraplex.router.scheduler import Scheduler
from loraplex.router.service import RouterService
from loraplex.router.settings import RouterSettings, settings_from_args
from loraplex.router.shards import ShardClients
from loraplex.router.tenancy import Tenants
from loraplex.router.tokenizer import TextTokenizer
from loraplex.router.views import ModelInfo

log = logging.getLogger("loraplex.router")


async def build_service(settings: RouterSettings) -> RouterService:
    """Connect to every rank, read the model's tokenizer and adapter list: the router's whole state."""
    tenants = Tenants.from_file(settings.api_keys_file) if settings.api_keys_file else None  # fail before waiting
    shards = ShardClients(settings.shard_uds)
    info = await shards.wait_ready(settings.connect_timeout)
    await shards.clear()  # batches a previous router left behind (it crashed or was killed) are orphans
    kv = await kv_budget(shards, settings)
    tokenizer_dir = settings.tokenizer_dir or Path(info.model_dir)
    tokenizer = TextTokenizer(tokenizer_dir)
    metrics = Metrics(
        adapter_ids=tenants is None or settings.metrics_adapter_labels, named_adapters=settings.metrics_top_adapters
    )
    metrics.kv_blocks.set(kv.num_blocks)
    registry = AdapterRegistry(shards, info.max_active_adapters + info.max_cpu_adapters, metrics)
    await registry.sync()
    ledger = RequestLedger(registry, settings.max_concurrent_requests_per_tenant, settings.max_adapter_loads_per_tenant)
    scheduler = Scheduler(
        shards,
        tokenizer,
        settings,
        set(info.eos_token_ids),
        metrics,
        adapter_slots=info.max_active_adapters,
        kv=kv,
        on_release=ledger.release,
        on_recovered=registry.sync,  # a restarted shard forgot the adapters loaded on demand
        prefix=PrefixEstimate(kv.block_size, kv.num_blocks) if info.prefix_caching else None,
    )
    model = ModelInfo(
        model_id=settings.model_id or info.model_id,
        dtype=info.dtype,
        device=info.device,
        num_shard=len(settings.shard_uds),
        kv_block_size=kv.block_size,
        kv_blocks=kv.num_blocks,
        prefix_caching=info.prefix_caching,
    )
    return RouterService(scheduler, tokenizer, settings, model, registry, ledger, tenants)


async def kv_budget(shards: ShardClients, settings: RouterSettings) -> KvBudget:
    """The KV blocks the router admits into: what the shards report (a one-token warm-up, cheap on a CPU),
    capped by --max-batch-total-tokens; a request of --max-total-tokens must fit alone, or it could never run."""
    warm = await shards.warmup(batch_size=1, input_length=1)
    size, shard_tokens = warm.block_size, warm.max_supported_total_tokens
    blocks = min(warm.num_blocks, settings.max_batch_total_tokens // size)
    if -(-settings.max_total_tokens // size) > blocks:
        raise ValueError(
            f"--max-total-tokens {settings.max_total_tokens} does not fit the KV cache: {blocks} blocks of {size} "
            f"tokens (the shards hold {shard_tokens} tokens, --max-batch-total-tokens allows "
            f"{settings.max_batch_total_tokens})"
        )
    if shard_tokens < settings.max_batch_total_tokens:
        log.warning(
            "the shards' KV cache is smaller than --max-batch-total-tokens; admitting into what they hold",
            extra={"max_batch_total_tokens": settings.max_batch_total_tokens, "shard_tokens": shard_tokens},
        )
    return KvBudget(size, blocks)


async def serve(settings: RouterSettings) -> None:
    try:
        service = await build_service(settings)
    except grpc.aio.AioRpcError as exc:
        fail("loraplex-router", f"shards at {', '.join(settings.shard_uds)} are not reachable: {exc.details()}")
    except (OSError, ValueError) as exc:
        fail("loraplex-router", str(exc))
    grpc_server = None
    if settings.grpc_port:
        grpc_server = await serve_grpc(service, f"{settings.hostname}:{settings.grpc_port}")
    config = uvicorn.Config(
        create_app(service), host=settings.hostname, port=settings.port, log_level="warning", lifespan="on"
    )
    server = DrainingServer(config, service, settings.drain_timeout)
    log.info("router ready", extra={"port": settings.port, "grpc_port": settings.grpc_port})
    try:
        await server.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=5)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    setup_logging(settings.json_output)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
