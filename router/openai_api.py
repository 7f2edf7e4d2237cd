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
from loraplex.router.grammar import (
    ToolCallStream,
    ToolChoice,
    check_parameters,
    response_format_grammar,
    split_tool_call,
    tool_call_id,
    tool_choice,
)
from loraplex.router.http_api import UNSUPPORTED_MEDIA_TYPE, client_gone, is_json_media_type, request_json, tenant_of
from loraplex.router.inflight import InFlightRequest
from loraplex.router.schemas import CHAT_BODY, COMPLETION_BODY
from loraplex.router.service import RouterService
from loraplex.router.tokenizer import TemplateFailure
from loraplex.router.validation import (
    GenerateParameters,
    ValidationError,
    chat_messages,
    unicode_problem,
    validate_parameters,
)

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


def _grammar(body: dict[str, Any], kind: str) -> tuple[dict[str, str] | None, ToolChoice | None]:
    """TGI's ``grammar`` for the body's ``response_format`` or forced tool call, and that tool choice."""
    tools = tool_choice(body.get("tools"), body.get("tool_choice")) if kind == "chat" else None
    if kind != "chat" and (body.get("tools") is not None or body.get("tool_choice") is not None):
        raise ValidationError("`tools` are for /v1/chat/completions")
    grammar_type, grammar = response_format_grammar(body.get("response_format"))
    if tools is not None:
        if grammar_type:
            raise ValidationError("`response_format` cannot be combined with a forced `tool_choice`")
        grammar_type, grammar = "json", tools.grammar
    return ({"type": grammar_type, "value": grammar} if grammar_type else None), tools


async def _params(
    service: RouterService, body: dict[str, Any], adapter: str, kind: str
) -> tuple[GenerateParameters, ToolChoice | None]:
    try:
        grammar, tools = _grammar(body, kind)
    except ValidationError as exc:
        raise OpenAIError(422, "validation", str(exc)) from exc
    raw: dict[str, Any] = {
        "grammar": grammar,
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
        params = validate_parameters(raw, service.settings)
        await check_parameters(service, params)
    except ValidationError as exc:
        raise OpenAIError(422, "validation", str(exc)) from exc
    return params, tools


def _usage(request: InFlightRequest, end: EndEvent) -> dict[str, Any]:
    prompt = len(request.input_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": end.generated_tokens,
        "total_tokens": prompt + end.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": end.cached_tokens},
    }


def _tool_message(text: str, finish: str) -> tuple[dict[str, Any], str]:
    """The assistant message of a forced tool call, and its finish reason; a call cut short by max_tokens is
    left as text ("length"): it cannot be parsed into arguments."""
    call = split_tool_call(text) if finish == "stop" else None
    if call is None:
        return {"role": "assistant", "content": text}, finish
    name, arguments = call
    calls = [{"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}]
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


def tool_prompt(messages: list[dict[str, str]], body: dict[str, Any], tools: ToolChoice) -> list[dict[str, str]]:
    """The messages with the forced tools described in the system message, as TGI does: the grammar fixes the
    shape of the answer, this tells the model what the functions are for."""
    offered = [t["function"] for t in body["tools"] if t["function"]["name"] in tools.names]
    text = (
        "Answer with a call to one of these functions, as a JSON object "
        '{"name": <function name>, "arguments": <its arguments>}:\n' + json.dumps(offered, ensure_ascii=False)
    )
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


async def _stream(
    service: RouterService, pending: InFlightRequest, model: str, kind: str, tools: ToolChoice | None = None
) -> AsyncIterator[str]:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(
        text: str | None, finish: str | None, usage: dict[str, Any] | None = None, delta: dict[str, Any] | None = None
    ) -> str:
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": delta or ({} if text is None else {"content": text})}
            if (text is not None or delta) and not sent_role:
                choice["delta"]["role"] = "assistant"
        else:
            choice = {"index": 0, "text": text or ""}
        choice["finish_reason"] = finish
        choice["logprobs"] = None
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if usage:
            out["usage"] = usage
        return f"data: {json.dumps(out)}\n\n"

    def arguments(piece: str) -> str:
        return chunk(None, None, delta={"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})

    sent_role = False
    call = ToolCallStream() if tools is not None else None
    try:
        async for event in service.events(pending):
            if isinstance(event, TokenEvent):
                if event.token.special:
                    continue
                if call is None:
                    yield chunk(event.token.text, None)
                    sent_role = True
                    continue
                name, piece = call.feed(event.token.text)
                if name is not None:
                    head = {"index": 0, "id": tool_call_id(), "type": "function"}
                    yield chunk(
                        None, None, delta={"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]}
                    )
                    sent_role = True
                if piece:
                    yield arguments(piece)
            elif isinstance(event, EndEvent):
                finish = _FINISH[event.finish_reason]
                if call is not None:
                    if call.name is None:  # cut short before the name: what there is, as text
                        yield chunk(call.text, None)
                        sent_role = True
                    elif rest := call.finish():
                        yield arguments(rest)
                    if finish == "stop" and call.name is not None:
                        finish = "tool_calls"
                yield chunk(None, finish, _usage(pending, event))
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
        params, tools = await _params(service, body, adapter, kind)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):  # "false" is truthy: never guess what was meant
            raise OpenAIError(422, "validation", "`stream` must be a boolean")
        try:
            pending = await service.prepare(prompt, params, tenant_of(request))
        except ApiError as exc:
            raise OpenAIError(exc.status, exc.error_type, exc.message) from exc
        name = model if isinstance(model, str) and model else service.model_id
        if stream:
            return StreamingResponse(_stream(service, pending, name, kind, tools), media_type="text/event-stream")
        try:
            end = await service.result(pending, client_gone(request))
        except ApiError as exc:
            raise OpenAIError(exc.status, exc.error_type, exc.message) from exc
        text, finish = end.generated_text, _FINISH[end.finish_reason]
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tools is not None:
                message, finish = _tool_message(text, finish)
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=finish, logprobs=None)
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
            tools = tool_choice(body.get("tools"), body.get("tool_choice"))
        except ValidationError as exc:
            raise OpenAIError(422, "validation", str(exc)) from exc
        if tools is not None:
            messages = tool_prompt(messages, body, tools)
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
