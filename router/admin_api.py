"""The adapter admin API over HTTP (SPEC §4: ``/adapters``, with ``/admin/adapters`` as an alias)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from loraplex.router.errors import ApiError
from loraplex.router.service import RouterService
from loraplex.router.tenancy import Tenant
from loraplex.router.views import AdapterView

# SPEC §4's paths first; the alias keeps clients of the earlier ``/admin/adapters`` working (hidden from /docs).
ADMIN_PREFIXES = ("/adapters", "/admin/adapters")


class LoadBody(BaseModel):
    id: str = Field(description="adapter id: its path under an --adapter-dirs root, or a name given at start-up")
    path: str | None = Field(
        default=None, description="not accepted: a path from the network could name files outside the roots"
    )


def adapter_json(a: AdapterView) -> dict[str, Any]:
    """One adapter's record as the admin API answers it."""
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
    """Listing follows the caller's key (a tenant sees its own adapters); loading and unloading need the admin
    token. ``router.auth`` checks both before any route here runs."""
    api = APIRouter()
    for prefix in ADMIN_PREFIXES:
        shown = prefix == ADMIN_PREFIXES[0]

        @api.get(prefix, include_in_schema=shown, summary="Adapters with their tier, bytes, rank, targets, requests")
        async def list_adapters(request: Request) -> dict[str, Any]:
            tenant: Tenant | None = getattr(request.state, "tenant", None)
            return {"adapters": [adapter_json(a) for a in await service.list_adapters(tenant)]}

        @api.post(prefix, include_in_schema=shown, summary="Load an adapter into memory now")
        async def load(body: LoadBody) -> dict[str, Any]:
            if body.path is not None:
                raise ApiError(
                    422,
                    "validation",
                    "`path` is not accepted over the network: give the adapter's id under an --adapter-dirs root "
                    "(or a name given with --lora-adapters at start-up)",
                )
            return adapter_json(await service.load_adapter(body.id))

        # ``:path``: adapter ids contain "/" (team-a/summarizer).
        @api.delete(prefix + "/{adapter_id:path}", include_in_schema=shown, summary="Unload an adapter, freeing memory")
        async def unload(adapter_id: str) -> dict[str, Any]:
            await service.unload_adapter(adapter_id)
            return {"id": adapter_id, "unloaded": True}

    return api
