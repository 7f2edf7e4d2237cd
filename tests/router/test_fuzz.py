"""Property-based fuzzing: the HTTP API from its own OpenAPI schema and from hostile bodies (lone surrogates,
chat messages of every shape), the gRPC API from its messages. No request may get a 5xx."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from tests.servers import Server, start_server

CASES = 1100
HOSTILE_CASES = 500
FUZZ_SETTINGS = settings(
    max_examples=CASES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
ADMIN_TOKEN = "fuzz-admin-token"  # the admin routes are fuzzed past the token check, not just refused by it


@pytest.fixture(scope="module")
def fuzz_server(
    served_model: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    model_dir, adapters = served_model
    # Short limits keep each generated request cheap; every limit is still exercised from both sides.
    srv = start_server(
        tmp_path_factory.mktemp("fuzz"),
        model_dir,
        dict(list(adapters.items())[:4]),
        "--max-input-tokens",
        "24",
        "--max-total-tokens",
        "40",
        "--max-body-bytes",
        "65536",
        "--admin-token",
        ADMIN_TOKEN,
    )
    yield srv
    srv.stop()


def _settled(server: Server) -> None:
    """Healthy, and soon nothing left running and no KV block held, once the fuzzing stops."""
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        gauges = {name: _gauge(metrics, name) for name in ("loraplex_running_requests", "loraplex_kv_blocks_used")}
        if not any(gauges.values()):
            return
        assert time.monotonic() < deadline, gauges
        time.sleep(0.2)


def _gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", metrics, re.M)
    assert match, name
    return float(match[1])


def test_http_api_fuzzed_from_its_openapi_schema(fuzz_server: Server) -> None:
    raw = httpx.get(fuzz_server.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    strategies = []
    routes = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        routes.add((operation.method.upper(), operation.path))
        strategies.append(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        if operation.method.upper() in ("POST", "DELETE"):  # requests that break the schema on purpose
            strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    # Every route the schema documents is fuzzed (streaming ones included).
    assert routes == {(m.upper(), path) for path, item in raw["paths"].items() for m in item}, routes
    assert {("POST", "/generate_stream"), ("POST", "/v1/chat/completions"), ("POST", "/adapters")} <= routes
    seen: dict[int, int] = {}
    session = httpx.Client(base_url=fuzz_server.url, timeout=60)

    @FUZZ_SETTINGS
    @given(case=st.one_of(strategies))
    def check(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=fuzz_server.url)
        headers = {**(kwargs.get("headers") or {})}
        if case.path.startswith("/adapters"):
            headers["authorization"] = f"Bearer {ADMIN_TOKEN}"
        if "json" in kwargs and not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "application/json"  # as httpx's json= does: undeclared bodies are 415
        resp = session.request(kwargs["method"], kwargs["url"], headers=headers, content=_body(kwargs))
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        _check_answer(case.path, resp, (case.method, kwargs.get("json")))

    started = time.monotonic()
    check()
    session.close()
    print(f"\nHTTP schema fuzz: {sum(seen.values())} cases in {time.monotonic() - started:.1f} s, {_counts(seen)}")
    assert sum(seen.values()) >= 1000
    assert seen.get(200, 0) > 50 and seen.get(422, 0) > 50  # both valid and refused requests were reached
    _settled(fuzz_server)


def _counts(seen: dict[int, int]) -> str:
    return f"status counts {dict(sorted(seen.items()))}"


def _check_answer(path: str, resp: httpx.Response, what: object) -> None:
    """No 5xx; errors in the shape of the route's API; a stream that started never carries a server failure."""
    assert resp.status_code < 500, (path, what, resp.status_code, resp.text[:300])
    if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
        error = resp.json()
        if path.startswith("/v1/"):
            assert isinstance(error.get("error"), dict) and isinstance(error["error"].get("message"), str), error
        else:
            assert isinstance(error.get("error"), str) and isinstance(error.get("error_type"), str), error
    if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"error_type": "generation"' not in resp.text, (path, what, resp.text[-300:])


# Strings as a JSON body can spell them: lone surrogates ("\ud800") included, which st.text() never draws.
_SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udbff", "ok\ud83d"])
_TEXT = st.one_of(st.text(max_size=16), st.text(st.characters(exclude_categories=()), max_size=8), _SURROGATES)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 50) | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", ""]), _JSON)
_PART = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.sampled_from(["text", "image_url", "input_audio", "file"]), _JSON),
        "text": st.one_of(_TEXT, _JSON),
        "image_url": st.fixed_dictionaries({"url": _TEXT}),
    },
)
_CONTENT = st.one_of(_TEXT, st.lists(st.one_of(_PART, _JSON), max_size=3), _JSON)
_MESSAGE = st.one_of(st.fixed_dictionaries({}, optional={"role": _ROLE, "content": _CONTENT, "name": _JSON}), _JSON)
# Short answers keep the cases cheap; ignore_eos and min_tokens make them run to their length.
_CONTROLS = {
    "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=3), _JSON),
    "seed": st.one_of(st.integers(0, 2**64), _JSON),
    "ignore_eos": st.one_of(st.booleans(), _JSON),
    "min_tokens": st.one_of(st.integers(-1, 6), _JSON),
}
_TGI_BODY = st.fixed_dictionaries(
    {"inputs": st.one_of(_TEXT, _JSON)},
    optional={
        "parameters": st.one_of(
            st.fixed_dictionaries(
                {"max_new_tokens": st.integers(1, 6)},
                optional={**_CONTROLS, "adapter_id": st.one_of(st.sampled_from(["team-0/adapter-0", "nope"]), _TEXT),
                          "details": st.booleans(), "top_n_tokens": st.integers(0, 3)},
            ),
            _JSON,
        ),
        "stream": st.one_of(st.booleans(), _JSON),
    },
)  # fmt: skip
_OPENAI_COMMON = {**_CONTROLS, "model": st.one_of(st.sampled_from(["", "base", "team-0/adapter-0"]), _TEXT),
                  "stream": st.booleans(), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3)}  # fmt: skip
_CHAT_BODY = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 6)},
    optional={**_OPENAI_COMMON, "messages": st.one_of(st.lists(_MESSAGE, min_size=1, max_size=3), _JSON)},
)
_COMPLETION_BODY = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 6)},
    optional={**_OPENAI_COMMON, "prompt": st.one_of(_TEXT, st.lists(_TEXT, max_size=2), _JSON)},
)
_HOSTILE = st.one_of(
    st.tuples(st.sampled_from(["/generate", "/generate_stream", "/", "/tokenize"]), _TGI_BODY),
    st.tuples(st.just("/v1/chat/completions"), _CHAT_BODY),
    st.tuples(st.just("/v1/completions"), _COMPLETION_BODY),
    st.tuples(st.sampled_from(["/adapters", "/admin/adapters"]), st.fixed_dictionaries({"id": _TEXT})),
    st.tuples(st.sampled_from(["/generate", "/v1/chat/completions", "/v1/completions", "/tokenize"]), _JSON),
)


def test_http_api_fuzzed_with_hostile_bodies(fuzz_server: Server) -> None:
    """Bodies the schema cannot describe: lone surrogates anywhere, chat messages and content parts of any
    shape, vLLM's controls of any type; every POST route, streaming ones included."""
    seen: dict[int, int] = {}
    session = httpx.Client(base_url=fuzz_server.url, timeout=60)
    headers = {"content-type": "application/json", "authorization": f"Bearer {ADMIN_TOKEN}"}

    @settings(FUZZ_SETTINGS, max_examples=HOSTILE_CASES)
    @given(request=_HOSTILE)
    def check(request: tuple[str, Any]) -> None:
        path, body = request
        raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as its \u escape
        resp = session.post(path, content=raw, headers=headers)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        _check_answer(path, resp, raw[:300])

    started = time.monotonic()
    check()
    session.close()
    print(f"\nHTTP hostile fuzz: {sum(seen.values())} cases in {time.monotonic() - started:.1f} s, {_counts(seen)}")
    assert sum(seen.values()) >= HOSTILE_CASES
    assert seen.get(200, 0) > 10 and seen.get(422, 0) > 100  # most are refused, but well-formed ones are served
    _settled(fuzz_server)


def _body(kwargs: dict[str, Any]) -> bytes | None:
    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data")
    return data.encode() if isinstance(data, str) else data


_FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
_U32 = st.integers(0, 2**32 - 1)
_PARAMETERS = st.fixed_dictionaries(
    {},
    optional={
        "adapter_id": st.one_of(st.sampled_from(["", "team-0/adapter-0", "team-1/adapter-1", "nope"]), st.text()),
        "do_sample": st.booleans(),
        "max_new_tokens": _U32,
        "temperature": _FLOATS,
        "top_k": _U32,
        "top_p": _FLOATS,
        "typical_p": _FLOATS,
        "repetition_penalty": _FLOATS,
        "frequency_penalty": _FLOATS,
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(max_size=8), max_size=6),
        "return_full_text": st.booleans(),
        "truncate": _U32,
        "details": st.booleans(),
        "top_n_tokens": _U32,
        "decoder_input_details": st.booleans(),
        "ignore_eos": st.booleans(),
        "min_tokens": _U32,
    },
)


def test_grpc_api_fuzzed_from_its_messages(fuzz_server: Server) -> None:
    counts: dict[str, int] = {}
    with grpc.insecure_channel(fuzz_server.grpc_address) as channel:
        stub = pb_grpc.TextGenerationStub(channel)

        @FUZZ_SETTINGS
        @given(inputs=st.text(max_size=200), params=_PARAMETERS, call=st.sampled_from(["unary", "stream", "tokenize"]))
        def check(inputs: str, params: dict[str, Any], call: str) -> None:
            request = pb.GenerateRequest(inputs=inputs, parameters=pb.Parameters(**params))
            try:
                if call == "unary":
                    stub.Generate(request, timeout=60)
                elif call == "stream":
                    for _ in stub.GenerateStream(request, timeout=60):
                        pass
                else:
                    stub.Tokenize(pb.TokenizeRequest(inputs=inputs), timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc.details()
                if code == "UNAVAILABLE":
                    print("UNAVAILABLE", exc.details(), repr(inputs), params, call)
            counts[code] = counts.get(code, 0) + 1

        check()
    print(f"\ngRPC fuzz: {sum(counts.values())} cases, status counts {dict(sorted(counts.items()))}")
    assert sum(counts.values()) >= 1000
    assert counts.get("OK", 0) > 50 and counts.get("INVALID_ARGUMENT", 0) > 50
    _settled(fuzz_server)


def test_oversized_and_deeply_nested_bodies_are_refused(fuzz_server: Server) -> None:
    url = fuzz_server.url
    huge = httpx.post(url + "/generate", content=b'{"inputs": "' + b"a" * 200_000 + b'"}', timeout=30)
    assert huge.status_code == 413 and huge.json()["error_type"] == "validation"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while the body streams in
        yield b'{"inputs": "'
        for _ in range(100):
            yield b"a" * 4096
        yield b'"}'

    streamed = httpx.post(url + "/v1/completions", content=chunks(), timeout=30)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "too_large"
    nested = b"[" * 30_000 + b"]" * 30_000
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        resp = httpx.post(url + path, content=nested, headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == 422, (path, resp.status_code, resp.text[:200])
    long_prompt = httpx.post(url + "/generate", json={"inputs": "hello " * 5000}, timeout=30)
    assert long_prompt.status_code == 422 and "input" in long_prompt.json()["error"]
    _settled(fuzz_server)
