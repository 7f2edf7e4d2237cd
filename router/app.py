"""The router's HTTP application: TGI and OpenAI routes over one RouterService, errors in each API's shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loraplex import __version__
from loraplex.router.admin_api import admin_routes
from loraplex.router.auth import Authenticate, refusal
from loraplex.router.body_limit import BodyLimit
from loraplex.router.errors import ApiError
from loraplex.router.http_api import tgi_routes
from loraplex.router.openai_api import OpenAIError, openai_routes
from loraplex.router.service import RouterService


def create_app(service: RouterService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(service.run())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        code = exc.error_type if exc.error_type != "validation" else "invalid_request_error"
        body = {"error": {"message": exc.message, "type": code, "param": None, "code": exc.error_type}}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "error_type": exc.error_type}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", "invalid"))
        if request.url.path.startswith("/v1/"):
            err = {"message": message, "type": "invalid_request_error", "param": where or None, "code": "validation"}
            return JSONResponse({"error": err}, status_code=422)
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # FastAPI's answer to a body its JSON parser gave up on (nested too deeply, for one): the same
            # 422 as any other malformed JSON.
            return refusal(request.url.path, 422, "validation", "malformed JSON: the body could not be parsed")
        return JSONResponse({"error": str(exc.detail), "error_type": "http"}, status_code=exc.status_code)

    app.include_router(tgi_routes(service))
    app.include_router(openai_routes(service))
    app.include_router(admin_routes(service))
    # Starlette runs the layer added last first. The key check must come before the body buffer: otherwise
    # anyone without a key makes the router hold up to --max-body-bytes per connection before being refused.
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes)
    app.add_middleware(Authenticate, settings=service.settings, tenants=service.tenants)
    return app
