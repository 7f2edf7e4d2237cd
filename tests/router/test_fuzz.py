"""Property-based fuzzing: the HTTP API from its own OpenAPI schema, the gRPC API from its messages."""

from __future__ import annotations

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
FUZZ_SETTINGS = settings(
    max_examples=CASES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


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
    for result in schema.get_all_operations():
        operation = result.ok()
        strategies.append(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        if operation.method.upper() == "POST":  # bodies that break the schema on purpose
            strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    assert len(strategies) >= 12
    seen: dict[int, int] = {}
    session = httpx.Client(base_url=fuzz_server.url, timeout=60)

    @FUZZ_SETTINGS
    @given(case=st.one_of(strategies))
    def check(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=fuzz_server.url)
        resp = session.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"), content=_body(kwargs))
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (case.method, case.path, kwargs.get("json"), resp.text[:300])

    check()
    session.close()
    print(f"\nHTTP fuzz: {sum(seen.values())} cases, status counts {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 1000
    assert seen.get(200, 0) > 50 and seen.get(422, 0) > 50  # both valid and refused requests were reached
    _settled(fuzz_server)


def _body(kwargs: dict[str, Any]) -> bytes | None:
    import json

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
