"""Hostile values against a running server: every number bounded to its wire field, non-finite sampling, JSON only."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from tests.servers import Server, start_server

# Each fits a JSON number but not the field the router sends it in (uint32, uint64, a 32-bit float), or passes
# TGI's bounds; before, a few of them failed every request in flight with them.
OUT_OF_RANGE: list[dict[str, Any]] = [
    {"top_k": 2**32},
    {"top_k": 2**31},  # TGI's top_k is an i32
    {"top_k": 2**64},
    {"top_k": 1e300},
    {"max_new_tokens": 2**32},
    {"max_new_tokens": 2**64},
    {"min_tokens": 2**32},
    {"seed": 2**64},
    {"seed": 2**70},
    {"top_n_tokens": 2**32},
    {"truncate": 2**64},
    {"best_of": 2**64},
    {"temperature": 1e39},  # infinite as a 32-bit float
    {"repetition_penalty": 1e39},
    {"repetition_penalty": 1e-38},
    {"repetition_penalty": 1e5},
    {"frequency_penalty": 1e39},
    {"top_p": 1e39},
    {"typical_p": -1e39},
]
# JSON as Python's parser takes it (NaN, Infinity); each value in place of a number.
NON_FINITE = ["NaN", "Infinity", "-Infinity"]
NUMERIC = ["temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "top_k", "seed"]
OPENAI_OUT_OF_RANGE: list[dict[str, Any]] = [
    {"seed": 2**64},
    {"max_tokens": 2**32},
    {"max_completion_tokens": 2**64},
    {"min_tokens": 2**32},
    {"logprobs": True, "top_logprobs": 2**32},
    {"temperature": 1e39},
    {"frequency_penalty": -1e39},
]


def _tgi_422(r: httpx.Response) -> None:
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation", r.text


def _openai_422(r: httpx.Response) -> None:
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation", r.text


def _raw(server: Server, path: str, body: str) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)


def _fire_bad_http(server: Server) -> None:
    """Every out-of-range value on every generate route, each answered 422."""
    for params in OUT_OF_RANGE:
        for path in ("/generate", "/generate_stream"):
            _tgi_422(httpx.post(server.url + path, json={"inputs": "x", "parameters": params}, timeout=30))
    for name in NUMERIC:
        for value in NON_FINITE:
            _tgi_422(_raw(server, "/generate", f'{{"inputs": "x", "parameters": {{"{name}": {value}}}}}'))
    for extra in OPENAI_OUT_OF_RANGE:
        body = {"prompt": "x", **extra}
        _openai_422(httpx.post(server.url + "/v1/completions", json=body, timeout=30))
        chat = {"messages": [{"role": "user", "content": "x"}], "stream": True, **extra}
        _openai_422(httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=30))
    for name in ("temperature", "top_p", "frequency_penalty", "seed", "max_tokens"):
        _openai_422(_raw(server, "/v1/completions", f'{{"prompt": "x", "{name}": NaN}}'))


def _fire_bad_grpc(stub: pb_grpc.TextGenerationStub) -> None:
    nan, inf = float("nan"), float("inf")
    for params in (
        pb.Parameters(top_k=2**32 - 1),
        pb.Parameters(top_k=2**31),
        pb.Parameters(temperature=nan),
        pb.Parameters(temperature=inf),
        pb.Parameters(top_p=nan),
        pb.Parameters(typical_p=-inf),
        pb.Parameters(do_sample=True, repetition_penalty=1e-38),
        pb.Parameters(repetition_penalty=inf),
        pb.Parameters(frequency_penalty=nan),
        pb.Parameters(max_new_tokens=2**32 - 1),
        pb.Parameters(min_tokens=2**32 - 1),
    ):
        for stream in (False, True):
            request = pb.GenerateRequest(inputs="x", parameters=params)
            with pytest.raises(grpc.RpcError) as info:
                if stream:
                    list(stub.GenerateStream(request, timeout=30))
                else:
                    stub.Generate(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (params, info.value.details())


def _good_requests(server: Server, streaming: threading.Event) -> dict[str, Callable[[], Any]]:
    """Requests long enough to be in flight while the bad ones arrive; each returns its token ids. ``streaming``
    is set once the stream's first token has arrived."""
    adapter = server.adapters[1]
    long = {"max_new_tokens": 120, "ignore_eos": True, "details": True}

    def generate(params: dict[str, Any]) -> list[int]:
        body = {"inputs": "the quick brown fox", "parameters": {**long, **params}}
        r = httpx.post(server.url + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["details"]["tokens"]]

    def streamed() -> list[int]:
        body = {"inputs": "a lazy dog", "parameters": {**long, "seed": 5, "temperature": 0.9, "top_p": 0.95}}
        ids = []
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line.removeprefix("data:"))
                    assert "error" not in event, event
                    ids.append(event["token"]["id"])
                    streaming.set()
        return ids

    return {
        "greedy-adapter": lambda: generate({"adapter_id": adapter}),
        "seeded": lambda: generate({"seed": 11, "temperature": 0.8, "top_k": 20, "repetition_penalty": 1.3}),
        "stream": streamed,
    }


def _neighbours_finish_exactly(server: Server, fire: Callable[[], None]) -> None:
    """The good requests give the same tokens with ``fire`` running beside them as alone."""
    streaming = threading.Event()
    good = _good_requests(server, streaming)
    alone = {name: run() for name, run in good.items()}
    streaming.clear()
    fired_in_flight = 0
    with ThreadPoolExecutor(len(good)) as pool:
        futures = {name: pool.submit(run) for name, run in good.items()}
        assert streaming.wait(60)  # decoding
        while not all(f.done() for f in futures.values()):
            fire()
            fired_in_flight += 1
        together = {name: f.result() for name, f in futures.items()}
    assert together == alone
    assert fired_in_flight >= 1  # the bad requests really met the good ones in flight


def test_out_of_range_and_non_finite_parameters_are_422_and_neighbours_finish(server: Server) -> None:
    _neighbours_finish_exactly(server, lambda: _fire_bad_http(server))


def test_grpc_parameters_are_bounded_and_neighbours_finish(server: Server) -> None:
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))
    _neighbours_finish_exactly(server, lambda: _fire_bad_grpc(stub))
    largest_seed = pb.Parameters(do_sample=True, seed=2**64 - 1, max_new_tokens=3, ignore_eos=True, details=True)
    ok = stub.Generate(pb.GenerateRequest(inputs="x", parameters=largest_seed), timeout=60)
    assert ok.details.generated_tokens == 3 and ok.details.seed == 2**64 - 1  # it fits its field and is served


def test_tiny_temperatures_are_served_beside_others(server: Server) -> None:
    """Below 1e-37 a temperature overflowed the logits (NaN draw, every request in flight failed)."""
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))

    def fire() -> None:
        for temperature in (1e-38, 1e-45, 5e-324):
            params = {"temperature": temperature, "max_new_tokens": 4, "seed": 3, "details": True}
            r = httpx.post(server.url + "/generate", json={"inputs": "the lazy dog", "parameters": params}, timeout=60)
            assert r.status_code == 200, r.text
            assert all(t["logprob"] is not None for t in r.json()["details"]["tokens"])
        body = {"prompt": "the lazy dog", "temperature": 1e-38, "max_tokens": 4}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        grpc_params = pb.Parameters(temperature=1e-38, do_sample=True, max_new_tokens=4)
        stub.Generate(pb.GenerateRequest(inputs="the lazy dog", parameters=grpc_params), timeout=60)

    _neighbours_finish_exactly(server, fire)


# What a web page can make a browser send cross-origin without asking first, and what curl sends with -d.
NOT_JSON = [
    ("text/plain", "text/plain;charset=UTF-8"),
    ("form", "application/x-www-form-urlencoded"),
    ("multipart", "multipart/form-data; boundary=x"),
    ("none", None),
]
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
BODIES = {
    "/": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/tokenize": {"inputs": "hi"},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize(("kind", "content_type"), NOT_JSON, ids=[k for k, _ in NOT_JSON])
def test_bodies_not_declared_json_are_415(server: Server, path: str, kind: str, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    before = _requests_served(server)
    r = httpx.post(server.url + path, content=json.dumps(BODIES[path]).encode(), headers=headers, timeout=30)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    if path.startswith("/v1/"):
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    else:
        assert r.json()["error_type"] == "unsupported_media_type" and "application/json" in error
    assert _requests_served(server) == before  # nothing was generated


@pytest.mark.parametrize("content_type", JSON_TYPES)
@pytest.mark.parametrize("path", list(BODIES))
def test_json_media_types_are_served(server: Server, path: str, content_type: str) -> None:
    r = httpx.post(
        server.url + path, content=json.dumps(BODIES[path]).encode(), headers={"content-type": content_type}, timeout=60
    )
    assert r.status_code == 200, r.text


def test_real_clients_send_json(server: Server) -> None:
    assert InferenceClient(base_url=server.url).text_generation("hi", max_new_tokens=2)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert client.completions.create(model="base", prompt="hi", max_tokens=2).choices[0].text is not None


def _requests_served(server: Server) -> float:
    total = 0.0
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("loraplex_adapter_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


ADMIN = "admin-token-hardening-1"
KEY = "key-team-0-hardening"


@pytest.fixture(scope="module")
def keyed(
    served_model: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, list[str]]]:
    model_dir, adapters = served_model
    root = tmp_path_factory.mktemp("keyed")
    keys = root / "keys.yaml"
    keys.write_text(json.dumps({"tenants": [{"name": "team-0", "keys": [KEY], "adapters": ["team-0/*"]}]}))
    subset = dict(list(adapters.items())[:6])
    server = start_server(root, model_dir, subset, "--api-keys-file", str(keys), "--admin-token", ADMIN)
    yield server, list(subset)
    server.stop()


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def test_grpc_checks_the_key_on_every_method_but_health(keyed: tuple[Server, list[str]]) -> None:
    server, _ = keyed
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))
    calls: list[Callable[..., Any]] = [
        lambda **kw: stub.Tokenize(pb.TokenizeRequest(inputs="hello"), timeout=10, **kw),
        lambda **kw: stub.Info(pb.InfoRequest(), timeout=10, **kw),
        lambda **kw: stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10, **kw),
        lambda **kw: stub.Generate(pb.GenerateRequest(inputs="hi", parameters=pb.Parameters(max_new_tokens=1)), **kw),
    ]
    for call in calls:
        for metadata in ((), _bearer("wrong-key-0000000000"), (("authorization", KEY),)):
            with pytest.raises(grpc.RpcError) as info:
                call(metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        call(metadata=_bearer(KEY))
    stub.Health(pb.HealthRequest(), timeout=10)  # probes carry no key
    http = httpx.post(server.url + "/tokenize", json={"inputs": "hello"}, timeout=10)
    assert http.status_code == 401  # the HTTP twin agrees


def test_grpc_list_adapters_with_the_admin_token_lists_all_as_http_does(keyed: tuple[Server, list[str]]) -> None:
    server, adapters = keyed
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))
    admin = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=_bearer(ADMIN), timeout=10).adapters
    assert sorted(a.id for a in admin) == sorted(adapters)
    http = httpx.get(server.url + "/adapters", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert http.status_code == 200 and sorted(a["id"] for a in http.json()["adapters"]) == sorted(adapters)
    tenant = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=_bearer(KEY), timeout=10).adapters
    assert sorted(a.id for a in tenant) == sorted(a for a in adapters if a.startswith("team-0/"))
    assert len(tenant) < len(admin)


def test_the_admin_token_is_no_tenant_key_elsewhere(keyed: tuple[Server, list[str]]) -> None:
    server, _ = keyed
    stub = pb_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(inputs="hello"), metadata=_bearer(ADMIN), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
