"""The adapter admin API over HTTP (``/admin/adapters``), for holders of the admin token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from loraplex.router.service import RouterService
from loraplex.router.views import AdapterView


class LoadBody(BaseModel):
    id: str = Field(description="adapter id: its path under an --adapter-dirs root, or a name given at start-up")


def adapter_json(a: AdapterView) -> dict[str, Any]:
    return {
        "id": a.id,
        "tier": a.tier,
        "bytes": a.bytes,
        "rank": a.rank,
        "targets": list(a.targets),
        "requests": a.requests,
        "load_seconds": round(a.load_seconds, 4),
        "in_flight": a.in_flight,
    }


def admin_routes(service: RouterService) -> APIRouter:
    """Every route here is behind the admin-token check in the app (see ``router.app``)."""
    api = APIRouter(prefix="/admin")

    @api.get("/adapters", summary="Every adapter with its tier, bytes, rank, targets and requests served")
    async def list_adapters() -> dict[str, Any]:
        return {"adapters": [adapter_json(a) for a in await service.list_adapters()]}

    @api.post("/adapters", summary="Load an adapter into memory now")
    async def load(body: LoadBody) -> dict[str, Any]:
        return adapter_json(await service.load_adapter(body.id))

    @api.delete("/adapters/{adapter_id:path}", summary="Unload an adapter, freeing host and device memory")
    async def unload(adapter_id: str, request: Request) -> dict[str, Any]:
        await service.unload_adapter(adapter_id)
        return {"id": adapter_id, "unloaded": True}

    return api
