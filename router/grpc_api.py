"""The public gRPC service ``loraplex.v1.TextGeneration``: the HTTP API's twin, sharing RouterService."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from loraplex.common.messages import to_message
from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from loraplex.router.errors import ApiError
from loraplex.router.events import EndEvent, ErrorEvent, TokenEvent, TokenInfo
from loraplex.router.grammar import check_parameters
from loraplex.router.service import RouterService
from loraplex.router.tenancy import Tenant, is_admin
from loraplex.router.validation import GenerateParameters, ValidationError, validate_parameters
from loraplex.router.views import AdapterView, ServerInfo

log = logging.getLogger("loraplex.router")

_CODES = {
    "validation": grpc.StatusCode.INVALID_ARGUMENT,
    "adapter_not_found": grpc.StatusCode.NOT_FOUND,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "generation": grpc.StatusCode.UNAVAILABLE,
    "adapter_invalid": grpc.StatusCode.FAILED_PRECONDITION,
    "adapter_in_use": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: ApiError) -> NoReturn:
    await context.abort(_CODES.get(exc.error_type, grpc.StatusCode.INTERNAL), f"{exc.error_type}: {exc.message}")
    raise AssertionError("unreachable")


def _token(t: TokenInfo) -> pb.Token:
    out = pb.Token(id=t.id, text=t.text, special=t.special)
    if math.isfinite(t.logprob):
        out.logprob = t.logprob
    return out


def _details(end: EndEvent) -> pb.Details:
    d = pb.Details(finish_reason=end.finish_reason, generated_tokens=end.generated_tokens)
    if end.seed is not None:
        d.seed = end.seed
    d.prefill.extend(_token(t) for t in end.prefill)
    d.tokens.extend(_token(t) for t in end.tokens)
    d.top_tokens.extend(pb.TopTokens(tokens=[_token(t) for t in tops]) for tops in end.top_tokens if tops)
    return d


async def _parameters(service: RouterService, params: pb.Parameters) -> GenerateParameters:
    """The set fields as the HTTP JSON would carry them, checked by the same rules.

    Not MessageToDict: it turns a NaN or infinite float into a string, which would be refused as "not a
    number" rather than as what it is.
    """
    raw: dict[str, Any] = {}
    for field, value in params.ListFields():
        if field.name == "grammar":
            raw["grammar"] = {"type": value.type, "value": value.value}  # a JSON Schema as text: taken as on HTTP
        else:
            raw[field.name] = value if isinstance(value, str | bool | int | float) else list(value)  # `stop`
    try:
        out = validate_parameters(raw, service.settings)
        await check_parameters(service, out)
    except ValidationError as exc:
        raise ApiError(422, "validation", str(exc)) from exc
    return out


class TextGeneration(pb_grpc.TextGenerationServicer):
    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant | None:
        tenants = self.service.tenants
        if tenants is None:
            return None
        tenant = tenants.for_authorization(_authorization(context))
        if tenant is None:
            await _abort(context, ApiError(401, "unauthorized", "a valid API key is required (authorization: Bearer)"))
        return tenant

    async def _admin(self, context: grpc.aio.ServicerContext) -> None:
        if not is_admin(_authorization(context), self.service.settings.admin_token):
            await _abort(context, ApiError(401, "unauthorized", "the admin token is required"))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        tenant = await self._tenant(context)
        try:
            params = await _parameters(self.service, request.parameters)
            pending = await self.service.prepare(request.inputs, params, tenant)
            end = await self.service.result(pending)
        except ApiError as exc:
            await _abort(context, exc)
        resp = pb.GenerateResponse(generated_text=self.service.full_text(request.inputs, end, params))
        if params.details:
            resp.details.CopyFrom(_details(end))
        return resp

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        tenant = await self._tenant(context)
        try:
            params = await _parameters(self.service, request.parameters)
            pending = await self.service.prepare(request.inputs, params, tenant)
        except ApiError as exc:
            await _abort(context, exc)
        try:
            async for event in self.service.events(pending):
                if isinstance(event, TokenEvent):
                    if pending.end is not None and event.index == len(pending.tokens):
                        continue  # sent with the end
                    yield pb.StreamResponse(
                        index=event.index, token=_token(event.token), top_tokens=[_token(t) for t in event.top_tokens]
                    )
                elif isinstance(event, EndEvent):
                    last = event.tokens[-1]
                    yield pb.StreamResponse(
                        index=len(event.tokens),
                        token=_token(last),
                        generated_text=self.service.full_text(request.inputs, event, params),
                        details=_details(event),
                    )
                elif isinstance(event, ErrorEvent):
                    await _abort(context, ApiError(424, event.error_type, event.message))
        finally:
            self.service.cancel(pending)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        await self._tenant(context)
        offsets = await self.service.tokenize(request.inputs)
        return pb.TokenizeResponse(tokens=[pb.Token(id=o.id, text=o.text) for o in offsets])

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        await self._tenant(context)
        return _info(self.service.info())

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        report = await self.service.health()
        if not report.ok:
            await context.abort(grpc.StatusCode.UNAVAILABLE, report.message)
        return pb.HealthResponse()

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        # As HTTP GET /adapters: the admin token lists every adapter, a tenant's key its own.
        admin = is_admin(_authorization(context), self.service.settings.admin_token)
        tenant = None if admin else await self._tenant(context)
        return pb.ListAdaptersResponse(adapters=[_adapter(a) for a in await self.service.list_adapters(tenant)])

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        await self._admin(context)
        try:
            info = await self.service.load_adapter(request.id)
        except ApiError as exc:
            await _abort(context, exc)
        return pb.LoadAdapterResponse(adapter=_adapter(info))

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        await self._admin(context)
        try:
            await self.service.unload_adapter(request.id)
        except ApiError as exc:
            await _abort(context, exc)
        return pb.UnloadAdapterResponse()


def _adapter(a: AdapterView) -> pb.AdapterInfo:
    return to_message(pb.AdapterInfo, a)


def _info(info: ServerInfo) -> pb.InfoResponse:
    """HTTP /info's answer in the fields gRPC has (no max_batch_prefill_tokens, no router)."""
    return to_message(pb.InfoResponse, info)


class HideExceptions(grpc.aio.ServerInterceptor):
    """A method's unexpected exception reaches the client as INTERNAL "internal error", not as grpc's default
    "Unexpected <class ...>: <text>", whose text may hold local paths or internals; the log keeps it all."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def guarded_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await unary(request, context)
                except Exception as exc:
                    await _internal(context, method, exc)

            return handler._replace(unary_unary=guarded_unary)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for message in stream(request, context):
                        yield message
                except Exception as exc:
                    await _internal(context, method, exc)

            return handler._replace(unary_stream=guarded_stream)
        return handler


async def _internal(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
    if isinstance(exc, grpc.aio.AbortError):  # an answer the method chose (context.abort)
        raise exc
    log.error("gRPC %s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable")


async def serve_grpc(service: RouterService, address: str) -> grpc.aio.Server:
    # Bodies are bounded as on HTTP (--max-body-bytes), not by gRPC's 4 MiB default.
    server = grpc.aio.server(
        interceptors=[HideExceptions()],
        options=[("grpc.max_receive_message_length", service.settings.max_body_bytes)],
    )
    pb_grpc.add_TextGenerationServicer_to_server(TextGeneration(service), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server
