"""The router's key check as a plain ASGI layer: who gets through, the refusals' shapes, streams left alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from loraplex.router.auth import Authenticate, is_admin_path
from loraplex.router.settings import RouterSettings
from loraplex.router.tenancy import Tenants

KEY = "key-of-team-a-0123456789"
ADMIN = "admin-token-0123456789"
# SPEC §4's path and the alias the router keeps for earlier clients.
ADMIN_PATHS = ("/adapters", "/admin/adapters")


async def whoami(request: Request) -> JSONResponse:
    tenant = getattr(request.state, "tenant", None)
    return JSONResponse({"tenant": tenant.name if tenant else None})


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"data:{i}\n\n".encode()

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _client(tenants: Tenants | None, admin_token: str = "") -> httpx.AsyncClient:
    routes = [Route(p, whoami) for p in ("/generate", "/v1/models", "/health", "/metrics")]
    admin = [Route(p, whoami, methods=["GET", "POST"]) for p in ADMIN_PATHS]
    admin += [Route(p + "/{adapter_id:path}", whoami, methods=["DELETE"]) for p in ADMIN_PATHS]
    inner = Starlette(routes=[*routes, *admin, Route("/generate_stream", stream)])
    app = Authenticate(inner, RouterSettings(admin_token=admin_token), tenants)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")


def _tenants() -> Tenants:
    return Tenants.from_dict({"tenants": [{"name": "team-a", "keys": [KEY], "adapters": ["team-a/*"]}]})


def test_keys_admit_their_tenant_and_refuse_everyone_else() -> None:
    async def run() -> None:
        async with _client(_tenants()) as c:
            ok = await c.get("/generate", headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200 and ok.json() == {"tenant": "team-a"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
                r = await c.get("/generate", headers=headers)
                assert r.status_code == 401
                assert r.json() == {
                    "error": "a valid API key is required (Authorization: Bearer)",
                    "error_type": "unauthorized",
                }
            # Two Authorization headers: the first one counts, as with Starlette's request.headers.
            first_good = await c.get("/generate", headers=[("Authorization", f"Bearer {KEY}"), ("Authorization", "x")])
            first_bad = await c.get("/generate", headers=[("Authorization", "x"), ("Authorization", f"Bearer {KEY}")])
            assert (first_good.status_code, first_bad.status_code) == (200, 401)
            openai = await c.get("/v1/models")
            assert openai.status_code == 401 and openai.json()["error"]["type"] == "unauthorized"
            for probe in ("/health", "/metrics"):  # probes and scrapers carry no key
                r = await c.get(probe)
                assert r.status_code == 200 and r.json() == {"tenant": None}

    asyncio.run(run())


def test_open_server_lets_everyone_in_without_a_tenant() -> None:
    async def run() -> None:
        async with _client(None) as c:
            r = await c.get("/generate")
            assert r.status_code == 200 and r.json() == {"tenant": None}

    asyncio.run(run())


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_admin_paths_need_the_admin_token_and_are_off_without_one(path: str) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    key = {"Authorization": f"Bearer {KEY}"}

    async def run() -> None:
        async with _client(None) as c:
            for off in (await c.post(path, headers=admin), await c.delete(path + "/team-a/x", headers=admin)):
                assert off.status_code == 403 and off.json()["error_type"] == "forbidden"
            # An open server lists to everyone, as its /v1/models does.
            assert (await c.get(path)).json() == {"tenant": None}
        async with _client(_tenants(), admin_token=ADMIN) as c:
            assert (await c.get(path, headers=admin)).json() == {"tenant": None}  # the admin sees every adapter
            assert (await c.post(path, headers=admin)).status_code == 200
            assert (await c.delete(path + "/team-a/x", headers=admin)).status_code == 200
            # SPEC §4: a tenant key may list (the service then shows its own adapters only), never load or unload.
            assert (await c.get(path, headers=key)).json() == {"tenant": "team-a"}
            for refused in (await c.post(path, headers=key), await c.delete(path + "/team-a/x", headers=key)):
                assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                assert (await c.get(path, headers=headers)).status_code == 401
            # The admin token is no tenant's key.
            assert (await c.get("/generate", headers=admin)).status_code == 401

    asyncio.run(run())


def test_admin_guard_takes_whole_path_segments_only() -> None:
    assert is_admin_path("/adapters") and is_admin_path("/adapters/team-a/x") and is_admin_path("/admin/adapters")
    assert not is_admin_path("/adapters-x") and not is_admin_path("/administrator")


def test_streamed_bodies_pass_through_whole() -> None:
    async def run() -> None:
        async with _client(_tenants()) as c:
            r = await c.get("/generate_stream", headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200
            assert r.text == "".join(f"data:{i}\n\n" for i in range(5))
            assert r.headers["content-type"].startswith("text/event-stream")

    asyncio.run(run())
