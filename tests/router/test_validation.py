"""Bad requests get TGI's 4xx errors in TGI's shape (OpenAI's on /v1), and the server keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

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


def test_server_keeps_serving_after_the_bad_requests(server: Server) -> None:
    r = httpx.post(server.url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert r.status_code == 200 and httpx.get(server.url + "/health", timeout=5).status_code == 200
