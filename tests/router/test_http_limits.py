"""What a client without a key can make the router hold: no body buffered before the key check, and a bounded
number of connections (--max-connections)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, cast

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message

from loraplex.router.app import create_app
from loraplex.router.lifecycle import DrainingServer
from loraplex.router.service import RouterService
from loraplex.router.settings import RouterSettings, settings_from_args
from loraplex.router.tenancy import Tenants
from tests.servers import free_port

KEY = "key-of-team-a-0123456789"
LIMIT = 1000


def _app() -> Any:
    tenants = Tenants.from_dict({"tenants": [{"name": "team-a", "keys": [KEY], "adapters": ["*"]}]})
    service = SimpleNamespace(settings=RouterSettings(max_body_bytes=LIMIT), tenants=tenants)
    return create_app(cast(RouterService, service))  # the routes only run for requests this test never lets by


async def _post(app: Any, headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, dict[str, Any], int]:
    """POST /generate with a body of ``chunks`` chunks of LIMIT bytes, streamed without a length; returns the
    status, the body and how many chunks the application read."""
    read = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"x" * LIMIT, "more_body": read < chunks}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/generate",
        "raw_path": b"/generate",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8080),
    }
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), read


def test_a_request_without_a_key_is_refused_before_its_body_is_read() -> None:
    async def run() -> None:
        app = _app()
        status, body, read = await _post(app, [], chunks=50)
        assert (status, body["error_type"], read) == (401, "unauthorized", 0)
        declared = [(b"content-length", str(50 * LIMIT).encode())]
        status, body, read = await _post(app, [(b"authorization", b"Bearer wrong"), *declared], chunks=50)
        assert (status, read) == (401, 0)
        # With a key, the body limit still holds: read up to the limit, then 413.
        status, body, read = await _post(app, [(b"authorization", f"Bearer {KEY}".encode())], chunks=50)
        assert (status, body["error_type"], read) == (413, "validation", 2)

    asyncio.run(run())


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": True})


def test_connections_past_max_connections_get_503_until_some_close() -> None:
    async def run() -> None:
        port = free_port()
        settings = RouterSettings(max_connections=3)
        service = cast(RouterService, SimpleNamespace(settings=settings, draining=False))
        config = uvicorn.Config(
            Starlette(routes=[Route("/", hello)]), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        server = DrainingServer(config, service, 1.0)
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        url = f"http://127.0.0.1:{port}/"
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            await asyncio.sleep(0.2)  # the server has accepted them
            async with httpx.AsyncClient() as client:
                refused = await client.get(url)
            assert refused.status_code == 503
            for _, writer in idle:
                writer.close()
                await writer.wait_closed()
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient() as client:
                assert (await client.get(url)).json() == {"hello": True}
        finally:
            server.should_exit = True
            await task

    asyncio.run(run())


def test_max_connections_is_a_flag_with_a_twin_and_zero_turns_it_off(monkeypatch: Any) -> None:
    assert settings_from_args([]).max_connections == RouterSettings().max_connections > 0
    monkeypatch.setenv("MAX_CONNECTIONS", "7")
    assert settings_from_args([]).max_connections == 7
    config = uvicorn.Config(Starlette(), lifespan="off")
    service = cast(RouterService, SimpleNamespace(settings=RouterSettings(max_connections=0), draining=False))
    assert DrainingServer(config, service, 1.0).config.limit_concurrency is None
