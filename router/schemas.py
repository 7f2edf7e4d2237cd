"""JSON Schemas of the request bodies, for /openapi.json: what clients (and the fuzz tests) build on.

Types only, no ranges: a value of the right type but out of range is answered with TGI's 422 message,
and the fuzz tests need the schema to let such values through.
"""

from __future__ import annotations

from typing import Any

_STRING = {"type": "string"}
_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_STRINGS = {"type": "array", "items": _STRING}

TGI_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "adapter_id": _STRING,
        "do_sample": _BOOL,
        "max_new_tokens": _INT,
        "temperature": _NUMBER,
        "top_k": _INT,
        "top_p": _NUMBER,
        "typical_p": _NUMBER,
        "repetition_penalty": _NUMBER,
        "frequency_penalty": _NUMBER,
        "seed": _INT,
        "stop": _STRINGS,
        "return_full_text": _BOOL,
        "truncate": _INT,
        "details": _BOOL,
        "decoder_input_details": _BOOL,
        "top_n_tokens": _INT,
        "best_of": _INT,
        "watermark": _BOOL,
        "ignore_eos": _BOOL,
        "min_tokens": _INT,
        # {"type": "json", "value": <JSON Schema>} or {"type": "regex", "value": "<pattern>"}
        "grammar": {"type": "object", "properties": {"type": _STRING, "value": {}}, "required": ["type", "value"]},
    },
}

_SAMPLING = {
    "model": _STRING,
    "max_tokens": _INT,
    "max_completion_tokens": _INT,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "seed": _INT,
    "stop": {"anyOf": [_STRING, _STRINGS]},
    "frequency_penalty": _NUMBER,
    "n": _INT,
    "stream": _BOOL,
    "logprobs": _BOOL,
    "top_logprobs": _INT,
    "ignore_eos": _BOOL,
    "min_tokens": _INT,
    "response_format": {"type": "object", "properties": {"type": _STRING, "json_schema": {"type": "object"}}},
}

# Any role and part type the schema's types allow: the chat template judges roles, and a part that is not
# text is refused with a 422 (the models take text only).
_PART = {"type": "object", "properties": {"type": _STRING, "text": _STRING}, "required": ["type"]}
_MESSAGE = {
    "type": "object",
    "properties": {
        "role": _STRING,
        # null: an assistant message that made tool calls (its `tool_calls`)
        "content": {"anyOf": [_STRING, {"type": "array", "items": _PART}, {"type": "null"}]},
    },
    "required": ["role", "content"],
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


CHAT_BODY = _body(
    {
        "type": "object",
        "properties": {
            **_SAMPLING,
            "messages": {"type": "array", "items": _MESSAGE},
            "tools": {"type": "array", "items": {"type": "object"}},
            "tool_choice": {"anyOf": [_STRING, {"type": "object"}]},
        },
        "required": ["messages"],
    }
)
COMPLETION_BODY = _body(
    {"type": "object", "properties": {**_SAMPLING, "prompt": {"anyOf": [_STRING, _STRINGS]}}, "required": ["prompt"]}
)
