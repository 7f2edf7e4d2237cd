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
from loraplex.router.lifecycle import DrainingServer
from loraplex.router.metrics import Metrics
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
    tokenizer_dir = settings.tokenizer_dir or Path(info.model_dir)
    tokenizer = TextTokenizer(tokenizer_dir)
    metrics = Metrics()
    registry = AdapterRegistry(shards, info.max_active_adapters + info.max_cpu_adapters, metrics)
    await registry.sync()
    scheduler = Scheduler(
        shards,
        tokenizer,
        settings,
        set(info.eos_token_ids),
        metrics,
        adapter_slots=info.max_active_adapters,
        on_release=registry.release,
        on_recovered=registry.sync,  # a restarted shard forgot the adapters loaded on demand
    )
    model = ModelInfo(
        model_id=settings.model_id or info.model_id,
        dtype=info.dtype,
        device=info.device,
        num_shard=len(settings.shard_uds),
    )
    return RouterService(scheduler, tokenizer, settings, model, registry, tenants)


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
