"""TGI-compatible HTTP routes: /, /generate, /generate_stream, /health, /info, /metrics, /tokenize."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from loraplex.router.errors import ApiError
from loraplex.router.events import EndEvent, ErrorEvent, TokenEvent, TokenInfo
from loraplex.router.grammar import check_parameters
from loraplex.router.inflight import InFlightRequest
from loraplex.router.schemas import TGI_PARAMETERS
from loraplex.router.service import RouterService
from loraplex.router.tenancy import Tenant
from loraplex.router.validation import GenerateParameters, ValidationError, unicode_problem, validate_parameters


class _UnicodeBody(BaseModel):
    """A body whose every string is valid Unicode, checked before any field: a lone surrogate is 422."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (problem := unicode_problem(data)) is not None:
            raise PydanticCustomError("unicode", problem)
        return data


class GenerateBody(_UnicodeBody):
    inputs: str = Field(description="the prompt")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="TGI parameters, plus adapter_id and vLLM's ignore_eos and min_tokens",
        json_schema_extra=TGI_PARAMETERS,
    )
    stream: bool = False


class TokenizeBody(_UnicodeBody):
    inputs: str
    parameters: dict[str, Any] = Field(default_factory=dict)


def token_json(t: TokenInfo) -> dict[str, Any]:
    logprob = t.logprob if math.isfinite(t.logprob) else None
    return {"id": t.id, "text": t.text, "logprob": logprob, "special": t.special}


def details_json(end: EndEvent, params: GenerateParameters) -> dict[str, Any]:
    out: dict[str, Any] = {
        "finish_reason": end.finish_reason,
        "generated_tokens": end.generated_tokens,
        "seed": end.seed,
        "prefill": [
            {"id": t.id, "text": t.text, "logprob": t.logprob if math.isfinite(t.logprob) else None}
            for t in end.prefill
        ],
        "tokens": [token_json(t) for t in end.tokens],
    }
    if params.top_n_tokens:
        out["top_tokens"] = [[token_json(t) for t in tops] for tops in end.top_tokens]
    return out


async def parse_parameters(service: RouterService, raw: dict[str, Any]) -> GenerateParameters:
    """TGI's checks, then the grammar compiled as the shards will: every refusal is a 422 before any token."""
    try:
        params = validate_parameters(raw, service.settings)
        await check_parameters(service, params)
    except ValidationError as exc:
        raise ApiError(422, "validation", str(exc)) from exc
    return params


async def client_gone(request: Request) -> None:
    """Returns once the client hangs up: the body is read by now, so a disconnect is all that can arrive."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def tenant_of(request: Request) -> Tenant | None:
    """The caller's tenant, set by the app's key check (None on an open server)."""
    return getattr(request.state, "tenant", None)


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, parameters (``charset``) allowed."""
    if not content_type:
        return False
    main, _, sub = content_type.partition(";")[0].strip().lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


UNSUPPORTED_MEDIA_TYPE = "the request body must be JSON sent as `Content-Type: application/json`"


async def require_json(request: Request) -> None:
    """415 for a body that is not declared JSON, as TGI's own router answers.

    A web page can make a browser POST text/plain or a form to a server on localhost without asking it first
    (a "simple" cross-origin request); parsing such bodies as JSON would let any page drive an open server.
    Every TGI and OpenAI client sends application/json.
    """
    if not is_json_media_type(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def tgi_stream(service: RouterService, request: InFlightRequest, inputs: str) -> AsyncIterator[str]:
    params = request.params
    try:
        async for event in service.events(request):
            if isinstance(event, ErrorEvent):
                yield sse({"error": event.message, "error_type": event.error_type})
            elif isinstance(event, TokenEvent):
                if request.end is not None and event.index == len(request.tokens):
                    continue  # the end event carries the last token, with the text and details
                payload: dict[str, Any] = {
                    "index": event.index,
                    "token": token_json(event.token),
                    "top_tokens": [token_json(t) for t in event.top_tokens],
                    "generated_text": None,
                    "details": None,
                }
                yield sse(payload)
            elif isinstance(event, EndEvent):
                final = event.tokens[-1] if event.tokens else None
                yield sse(
                    {
                        "index": len(event.tokens),
                        "token": token_json(final) if final else None,
                        "top_tokens": [token_json(t) for t in event.top_tokens[-1]] if event.top_tokens else [],
                        "generated_text": service.full_text(inputs, event, params),
                        "details": {
                            "finish_reason": event.finish_reason,
                            "generated_tokens": event.generated_tokens,
                            "input_length": len(request.input_ids),
                            "seed": event.seed,
                        }
                        if params.details
                        else None,
                    }
                )
    finally:
        service.cancel(request)


def tgi_routes(service: RouterService) -> APIRouter:
    api = APIRouter()
    json_only = [Depends(require_json)]  # FastAPI runs it before the body is validated

    async def generate(body: GenerateBody, request: Request) -> dict[str, Any]:
        params = await parse_parameters(service, body.parameters)
        pending = await service.prepare(body.inputs, params, tenant_of(request))
        end = await service.result(pending, client_gone(request))
        out: dict[str, Any] = {"generated_text": service.full_text(body.inputs, end, params)}
        if params.details:
            out["details"] = details_json(end, params)
        return out

    async def stream(body: GenerateBody, tenant: Tenant | None) -> StreamingResponse:
        params = await parse_parameters(service, body.parameters)
        pending = await service.prepare(body.inputs, params, tenant)  # errors before the first token keep their status
        return StreamingResponse(tgi_stream(service, pending, body.inputs), media_type="text/event-stream")

    @api.post("/", summary="TGI compatible generate (streams when stream is true)", dependencies=json_only)
    async def compat(body: GenerateBody, request: Request) -> Any:
        if body.stream:
            return await stream(body, tenant_of(request))
        return [await generate(body, request)]

    @api.post("/generate", summary="Generate text", dependencies=json_only)
    async def generate_route(body: GenerateBody, request: Request) -> dict[str, Any]:
        return await generate(body, request)

    @api.post("/generate_stream", summary="Generate text as server-sent events", dependencies=json_only)
    async def generate_stream(body: GenerateBody, request: Request) -> StreamingResponse:
        return await stream(body, tenant_of(request))

    @api.get("/health", summary="200 when every shard answers, 503 otherwise")
    async def health() -> Response:
        report = await service.health()
        if not report.ok:
            return JSONResponse({"error": report.message, "error_type": report.error_type}, status_code=503)
        return Response(status_code=200)

    @api.get("/info", summary="Model and server limits")
    async def info() -> dict[str, Any]:
        return dataclasses.asdict(service.info())

    @api.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(await service.render_metrics(), media_type="text/plain; version=0.0.4")

    @api.post("/tokenize", summary="Tokenize inputs", dependencies=json_only)
    async def tokenize(body: TokenizeBody) -> list[dict[str, Any]]:
        offsets = await service.tokenize(body.inputs)  # in a tokenizer thread: streams go on meanwhile
        return [{"id": o.id, "text": o.text, "start": o.start, "stop": o.stop} for o in offsets]

    return api


async def request_json(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "validation", f"malformed JSON: {exc}") from exc
    except RecursionError:
        raise ApiError(422, "validation", "malformed JSON: nested too deeply") from None
