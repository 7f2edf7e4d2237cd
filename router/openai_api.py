"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions (both streaming), /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from loraplex.router.errors import ApiError
from loraplex.router.events import EndEvent, ErrorEvent, TokenEvent
from loraplex.router.http_api import UNSUPPORTED_MEDIA_TYPE, client_gone, is_json_media_type, request_json, tenant_of
from loraplex.router.inflight import InFlightRequest
from loraplex.router.schemas import CHAT_BODY, COMPLETION_BODY
from loraplex.router.service import RouterService
from loraplex.router.tokenizer import TemplateFailure
from loraplex.router.validation import ValidationError, chat_messages, unicode_problem, validate_parameters

# "tgi" is what TGI clients send; "dummy" is what huggingface_hub's InferenceClient sends when it was built
# from a server URL (older releases sent the URL itself, which is also accepted).
BASE_ALIASES = ("", "base", "tgi", "dummy")
_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


class OpenAIError(ApiError):
    """Answered in OpenAI's error shape instead of TGI's."""


def resolve_model(service: RouterService, model: Any) -> str:
    """The adapter a ``model`` field names ("" for the base); unknown names are 404 later, never the base."""
    if model is None:
        return ""
    if not isinstance(model, str):
        raise OpenAIError(422, "validation", "`model` must be a string")
    if model in BASE_ALIASES or model == service.model_id or model.startswith(("http://", "https://")):
        return ""
    return model


def _params(service: RouterService, body: dict[str, Any], adapter: str) -> Any:
    raw: dict[str, Any] = {
        "adapter_id": adapter,
        "max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
        "stop": body.get("stop"),
        "frequency_penalty": body.get("frequency_penalty"),
        "ignore_eos": body.get("ignore_eos"),  # vLLM's extensions, which benchmark clients send
        "min_tokens": body.get("min_tokens"),
        "details": True,
    }
    # OpenAI allows temperature 0 (greedy) and top_p 1 (no filter); TGI's ranges exclude both.
    if raw["temperature"] == 0:
        raw["temperature"] = None
    if raw["top_p"] == 1:
        raw["top_p"] = None
    if body.get("n", 1) not in (1, None):
        raise OpenAIError(422, "validation", "`n` must be 1")
    top_logprobs = body.get("top_logprobs")
    if body.get("logprobs") and top_logprobs:
        raw["top_n_tokens"] = top_logprobs
    try:
        return validate_parameters(raw, service.settings)
    except ValidationError as exc:
        raise OpenAIError(422, "validation", str(exc)) from exc


def _usage(request: InFlightRequest, end: EndEvent) -> dict[str, int]:
    prompt = len(request.input_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": end.generated_tokens,
        "total_tokens": prompt + end.generated_tokens,
    }


async def _stream(service: RouterService, pending: InFlightRequest, model: str, kind: str) -> AsyncIterator[str]:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None, usage: dict[str, int] | None = None) -> str:
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {} if text is None else {"content": text}}
            if text is not None and not sent_role:
                choice["delta"]["role"] = "assistant"
        else:
            choice = {"index": 0, "text": text or ""}
        choice["finish_reason"] = finish
        choice["logprobs"] = None
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if usage:
            out["usage"] = usage
        return f"data: {json.dumps(out)}\n\n"

    sent_role = False
    try:
        async for event in service.events(pending):
            if isinstance(event, TokenEvent):
                if event.token.special:
                    continue
                yield chunk(event.token.text, None)
                sent_role = True
            elif isinstance(event, EndEvent):
                yield chunk(None, _FINISH[event.finish_reason], _usage(pending, event))
            elif isinstance(event, ErrorEvent):
                yield f"data: {json.dumps({'error': event.message, 'error_type': event.error_type})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        service.cancel(pending)


def openai_routes(service: RouterService) -> APIRouter:
    api = APIRouter()

    async def run(request: Request, body: dict[str, Any], prompt: str, kind: str) -> Any:
        model = body.get("model")
        adapter = resolve_model(service, model)
        params = _params(service, body, adapter)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):  # "false" is truthy: never guess what was meant
            raise OpenAIError(422, "validation", "`stream` must be a boolean")
        try:
            pending = await service.prepare(prompt, params, tenant_of(request))
        except ApiError as exc:
            raise OpenAIError(exc.status, exc.error_type, exc.message) from exc
        name = model if isinstance(model, str) and model else service.model_id
        if stream:
            return StreamingResponse(_stream(service, pending, name, kind), media_type="text/event-stream")
        try:
            end = await service.result(pending, client_gone(request))
        except ApiError as exc:
            raise OpenAIError(exc.status, exc.error_type, exc.message) from exc
        text = end.generated_text
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=_FINISH[end.finish_reason], logprobs=None)
        return {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": [choice],
            "usage": _usage(pending, end),
        }

    @api.post(
        "/v1/chat/completions", summary="OpenAI chat completions; `model` names the adapter", openapi_extra=CHAT_BODY
    )
    async def chat(request: Request) -> Any:
        body = await _body(request)
        try:
            messages = chat_messages(body.get("messages"))
        except ValidationError as exc:
            raise OpenAIError(422, "validation", str(exc)) from exc
        try:  # the template's own refusals ("roles must alternate") are the caller's to fix: 422, its words
            prompt = await service.chat_prompt(messages)
        except TemplateFailure as exc:
            raise OpenAIError(422, "validation", str(exc)) from exc
        return await run(request, body, prompt, "chat")

    @api.post("/v1/completions", summary="OpenAI completions; `model` names the adapter", openapi_extra=COMPLETION_BODY)
    async def completions(request: Request) -> Any:
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise OpenAIError(422, "validation", "`prompt` must be a string")
        return await run(request, body, prompt, "completion")

    @api.get("/v1/models", summary="The base model and every adapter the caller may use")
    async def models(request: Request) -> dict[str, Any]:
        created = int(time.time())
        tenant = tenant_of(request)
        base = [service.model_id] if tenant is None or tenant.base else []
        names = [*base, *(a.id for a in await service.list_adapters(tenant))]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "loraplex"} for n in names],
        }

    return api


async def _body(request: Request) -> dict[str, Any]:
    if not is_json_media_type(request.headers.get("content-type")):  # see http_api.require_json
        raise OpenAIError(415, "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE)
    try:
        body = await request_json(request)
    except ApiError as exc:
        raise OpenAIError(exc.status, exc.error_type, exc.message) from exc
    if not isinstance(body, dict):
        raise OpenAIError(422, "validation", "the request body must be a JSON object")
    if (problem := unicode_problem(body)) is not None:
        raise OpenAIError(422, "validation", problem)
    return body
