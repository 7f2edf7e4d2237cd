"""Bad requests get TGI's 4xx errors in TGI's shape (OpenAI's on /v1), and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from loraplex.router.settings import RouterSettings
from loraplex.router.validation import MIN_TEMPERATURE, ValidationError, validate_parameters
from tests.servers import Server

BAD_PARAMETERS: list[tuple[dict[str, Any], str]] = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 5000}, "must be <= 300"),
    ({"top_p": 1.0}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"typical_p": 1.5}, "typical_p"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"truncate": 0}, "truncate"),
    ({"truncate": 10_000}, "truncate"),
    ({"top_n_tokens": 50}, "top_n_tokens"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"details": "yes"}, "details"),
    ({"stop": 5}, "stop"),
    ({"best_of": 2}, "best_of"),
    ({"seed": -1}, "seed"),
]


def _is_tgi_validation(r: httpx.Response, words: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation" and words in body["error"], body


@pytest.mark.parametrize(("params", "words"), BAD_PARAMETERS, ids=[w for _, w in BAD_PARAMETERS])
@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
def test_bad_parameters_are_422(server: Server, route: str, params: dict[str, Any], words: str) -> None:
    r = httpx.post(server.url + route, json={"inputs": "hello", "parameters": params}, timeout=30)
    _is_tgi_validation(r, words)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": "", "parameters": {}}, "cannot be empty"),
        ({"inputs": "the quick brown fox " * 80}, "must have less than 200 tokens"),
        ({"inputs": 42}, "inputs"),
        ({"parameters": {}}, "inputs"),
        ([1, 2, 3], ""),
        ({"inputs": "hi", "parameters": "fast"}, "parameters"),
    ],
)
def test_bad_bodies_are_422(server: Server, body: Any, words: str) -> None:
    _is_tgi_validation(httpx.post(server.url + "/generate", json=body, timeout=30), words)


def test_truncate_keeps_the_last_tokens(server: Server) -> None:
    long = "the quick brown fox " * 80
    r = httpx.post(
        server.url + "/generate", json={"inputs": long, "parameters": {"truncate": 20, "max_new_tokens": 2}}, timeout=30
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"])
def test_malformed_json_is_4xx_never_5xx(server: Server, route: str) -> None:
    for raw in (b"{not json", b"", b"\xff\xfe", b'{"inputs": "a"' + b"[" * 10000):
        r = httpx.post(server.url + route, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= r.status_code < 500, (route, raw[:20], r.status_code, r.text)


def test_unknown_adapter_is_404_on_every_http_route(server: Server) -> None:
    for route in ("/generate", "/generate_stream", "/"):
        r = httpx.post(server.url + route, json={"inputs": "hi", "parameters": {"adapter_id": "ghost"}}, timeout=30)
        assert r.status_code == 404 and r.json()["error_type"] == "adapter_not_found", r.text
    for route, body in (
        ("/v1/chat/completions", {"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "ghost", "prompt": "hi"}),
        ("/v1/completions", {"model": "../../etc/passwd", "prompt": "hi"}),
    ):
        r = httpx.post(server.url + route, json=body, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found", r.text


def test_openai_validation_errors_use_openai_shape(server: Server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 0}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "stream": "false"}, timeout=30)
    assert r.status_code == 422 and "stream" in r.json()["error"]["message"]


def test_server_keeps_serving_after_the_bad_requests(server: Server) -> None:
    r = httpx.post(server.url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert r.status_code == 200 and httpx.get(server.url + "/health", timeout=5).status_code == 200


# A JSON body may spell a lone surrogate; Python keeps it in a str that no tokenizer or UTF-8 encoder takes.
SURROGATE = "a\\ud800b"
TGI_SURROGATES = [
    ("/generate", f'{{"inputs": "{SURROGATE}"}}'),
    ("/generate_stream", f'{{"inputs": "{SURROGATE}"}}'),
    ("/", f'{{"inputs": "{SURROGATE}"}}'),
    ("/", f'{{"inputs": "{SURROGATE}", "stream": true}}'),
    ("/tokenize", f'{{"inputs": "{SURROGATE}"}}'),
    ("/generate", f'{{"inputs": "hi", "parameters": {{"stop": ["{SURROGATE}"]}}}}'),
    ("/generate_stream", f'{{"inputs": "hi", "parameters": {{"adapter_id": "{SURROGATE}"}}}}'),
    ("/generate", f'{{"inputs": "hi", "parameters": {{"{SURROGATE}": 1}}}}'),
]
OPENAI_SURROGATES = [
    ("/v1/completions", f'{{"prompt": "{SURROGATE}"}}'),
    ("/v1/completions", f'{{"prompt": ["{SURROGATE}"]}}'),
    ("/v1/completions", '{"prompt": "hi", "stop": "\\udfff"}'),
    ("/v1/completions", f'{{"prompt": "hi", "model": "{SURROGATE}"}}'),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}'),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "{SURROGATE}", "content": "hi"}}]}}'),
    (
        "/v1/chat/completions",
        f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{SURROGATE}"}}]}}]}}',
    ),
]


def _post_raw(server: Server, route: str, raw: str, stream: bool) -> httpx.Response:
    if stream and route.startswith("/v1/"):
        raw = raw[:-1] + ', "stream": true}'
    return httpx.post(
        server.url + route, content=raw.encode(), headers={"content-type": "application/json"}, timeout=30
    )


@pytest.mark.parametrize(("route", "raw"), TGI_SURROGATES)
def test_lone_surrogates_are_422_in_tgis_shape(server: Server, route: str, raw: str) -> None:
    _is_tgi_validation(_post_raw(server, route, raw, False), "not valid Unicode")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("route", "raw"), OPENAI_SURROGATES)
def test_lone_surrogates_are_422_in_openais_shape(server: Server, route: str, raw: str, stream: bool) -> None:
    r = _post_raw(server, route, raw, stream)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "not valid Unicode" in error["message"] and error["type"] == "invalid_request_error", error


BAD_MESSAGES: list[tuple[Any, str]] = [
    ([{"role": 7, "content": "Hi"}], "messages[0].role"),
    ([{"role": None, "content": "Hi"}], "messages[0].role"),
    ([{"content": "Hi"}], "messages[0].role"),
    ([{"role": "user", "content": 7}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": {"text": "Hi"}}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": ["Hi"]}], "messages[1].content[0]"),
    (
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}],
            }
        ],
        "takes text only",
    ),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "takes text only"),
    ([{"role": "user", "content": [{"text": "Hi"}]}], "takes text only"),
    ([{"role": "user", "content": [{"type": "text", "text": 7}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([], "non-empty list"),
    (["Hi"], "non-empty list"),
    ({"role": "user", "content": "Hi"}, "non-empty list"),
    ("Hi", "non-empty list"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("messages", "words"), BAD_MESSAGES, ids=[str(i) for i in range(len(BAD_MESSAGES))])
def test_malformed_chat_messages_are_422_before_the_template(
    server: Server, messages: Any, words: str, stream: bool
) -> None:
    body = {"messages": messages, "max_tokens": 2, "stream": stream}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize("stream", [False, True])
def test_text_content_parts_are_joined_like_a_string(server: Server, stream: bool) -> None:
    def answer(content: Any) -> str:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": stream}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if not stream:
            return str(r.json()["choices"][0]["message"]["content"])
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    parts = [{"type": "text", "text": "what is "}, {"type": "text", "text": "the capital?"}]
    assert answer(parts) == answer("what is the capital?")


@pytest.mark.parametrize(
    ("params", "ok"),
    [
        ({"top_k": 2**31 - 1}, True),  # TGI's i32
        ({"top_k": 2**31}, False),
        ({"max_new_tokens": 2**32 - 1}, True),  # refused later by the length check, not by its field
        ({"max_new_tokens": 2**32}, False),
        ({"min_tokens": 2**32}, False),
        ({"seed": 2**64 - 1}, True),
        ({"seed": 2**64}, False),
        ({"temperature": 3.4e38}, True),
        ({"temperature": 3.5e38}, False),  # infinite as a 32-bit float
        ({"repetition_penalty": 1e-4}, True),
        ({"repetition_penalty": 9e-5}, False),
        ({"repetition_penalty": 1e4}, True),
        ({"repetition_penalty": 1.1e4}, False),
        ({"top_p": float("nan")}, False),
        ({"top_k": float("inf")}, False),
        ({"seed": float("nan")}, False),
    ],
)
def test_numbers_are_bounded_to_their_wire_fields(params: dict[str, Any], ok: bool) -> None:
    settings = RouterSettings()
    if ok:
        validate_parameters(params, settings)
    else:
        with pytest.raises(ValidationError, match=next(iter(params))):
            validate_parameters(params, settings)


def test_tiny_temperatures_are_raised_to_the_minimum() -> None:
    for tiny in (1e-38, 5e-324, 1e-5):
        assert validate_parameters({"temperature": tiny}, RouterSettings()).temperature == MIN_TEMPERATURE
    assert validate_parameters({"temperature": 0.3}, RouterSettings()).temperature == 0.3
    with pytest.raises(ValidationError, match="strictly positive"):
        validate_parameters({"temperature": 0.0}, RouterSettings())
