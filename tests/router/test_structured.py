"""Structured output end to end on the tiny random model: TGI ``grammar``, OpenAI ``response_format`` and ``tools``,
gRPC ``Parameters.grammar``; base and adapters, greedy and seeded, streamed and not, all in mixed batches. A random
model under a grammar must still give output that parses and validates: that is what the grammar is for."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest

from loraplex.common.sampling import MAX_GRAMMAR_BYTES
from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from tests.factories import make_adapter, tiny_served_model
from tests.servers import Server, start_server
from tests.shard.test_grammar import REGEXES, SCHEMAS

MAX_NEW = 90
SAMPLINGS: dict[str, dict[str, Any]] = {"greedy": {}, "seeded": {"do_sample": True, "temperature": 1.2, "seed": 7}}


def _models(server: Server) -> list[str | None]:
    return [None, server.adapters[0], server.adapters[1]]


def _cases(server: Server) -> list[tuple[str, str | None, str, bool]]:
    """Every schema for the base and two adapters, greedy and seeded, streamed and not (120 requests)."""
    return [
        (name, model, sampling, stream)
        for name in SCHEMAS
        for model in _models(server)
        for sampling in SAMPLINGS
        for stream in (False, True)
    ]


def _all(calls: Sequence[Callable[..., Any]]) -> list[Any]:
    """Run the calls at once: the server batches constrained requests together, adapters and the base mixed."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda call: call(), calls))


def _tgi(server: Server, prompt: str, params: dict[str, Any], stream: bool) -> tuple[str, str]:
    """(generated text, finish reason) from /generate or /generate_stream."""
    body = {"inputs": prompt, "parameters": {"details": True, **params}}
    if not stream:
        r = httpx.post(server.url + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"], r.json()["details"]["finish_reason"]
    last: dict[str, Any] = {}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                last = json.loads(line[5:])
    return last["generated_text"], last["details"]["finish_reason"]


def _valid(text: str, schema: dict[str, Any], finish: str, where: object) -> None:
    assert finish == "eos_token" or finish == "stop", (where, finish, text)  # complete, not cut at max_new_tokens
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow  # 120 requests (or a server of its own): tens of seconds
def test_tgi_grammar_json_schemas(server: Server) -> None:
    def call(name: str, model: str | None, sampling: str, stream: bool) -> Callable[[], tuple[str, str]]:
        grammar = {"type": "json", "value": SCHEMAS[name]}
        params = {"grammar": grammar, "adapter_id": model, "max_new_tokens": MAX_NEW, **SAMPLINGS[sampling]}
        return lambda: _tgi(server, f"Give me {name}", params, stream)

    cases = _cases(server)
    for case, (text, finish) in zip(cases, _all([call(*c) for c in cases]), strict=True):
        _valid(text, SCHEMAS[case[0]], finish, case)


def test_tgi_grammar_regex(server: Server) -> None:
    cases = [(p, m, s, st) for p in REGEXES for m in _models(server) for s in SAMPLINGS for st in (False, True)]
    calls = [
        lambda p=p, m=m, s=s, st=st: _tgi(
            server, "code:", {"grammar": {"type": "regex", "value": p}, "adapter_id": m, **SAMPLINGS[s]}, st
        )
        for p, m, s, st in cases
    ]
    for (pattern, *_), (text, finish) in zip(cases, _all(calls), strict=True):
        assert finish == "eos_token" and re.fullmatch(pattern, text), (pattern, text)


def test_a_mixed_batch_leaves_unconstrained_requests_as_they_are(server: Server) -> None:
    free = {"max_new_tokens": 12, "adapter_id": server.adapters[2]}
    alone = _tgi(server, "the lazy dog", free, False)
    grammar = {"type": "json", "value": SCHEMAS["nested"]}
    calls: list[Callable[..., tuple[str, str]]] = []
    for i in range(12):
        if i % 3 == 0:
            calls.append(lambda: _tgi(server, "the lazy dog", free, False))
        else:
            params = {"grammar": grammar, "adapter_id": _models(server)[i % 3], "max_new_tokens": MAX_NEW}
            calls.append(lambda params=params, st=i % 2 == 0: _tgi(server, "the lazy dog", params, st))
    results = _all(calls)
    for i, (text, finish) in enumerate(results):
        if i % 3 == 0:
            assert (text, finish) == alone
        else:
            _valid(text, SCHEMAS["nested"], finish, i)


def test_a_grammar_that_cannot_finish_ends_with_length(server: Server) -> None:
    schema = {"type": "array", "items": {"const": "abcdefghij"}, "minItems": 5}
    text, finish = _tgi(server, "x", {"grammar": {"type": "json", "value": schema}, "max_new_tokens": 6}, False)
    assert finish == "length" and text.startswith('["')
    with pytest.raises(ValueError):
        json.loads(text)


def _openai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def _chat(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str, Any]:
    """(content, finish reason, usage) of a chat completion, streamed or not."""
    if not stream:
        resp = client.chat.completions.create(**kwargs)
        return resp.choices[0].message.content or "", resp.choices[0].finish_reason, resp.usage
    text, finish, usage = "", "", None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    return text, finish, usage


@pytest.mark.slow  # 120 requests (or a server of its own): tens of seconds
def test_openai_response_format_json_schema(server: Server) -> None:
    client = _openai(server)

    def call(name: str, model: str | None, sampling: str, stream: bool) -> Callable[[], tuple[str, str, Any]]:
        extra = {"seed": 7, "temperature": 1.2} if sampling == "seeded" else {"temperature": 0}
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
        messages = [{"role": "user", "content": f"{name}?"}]
        return lambda: _chat(
            client, stream, model=model or "base", messages=messages, response_format=fmt, max_tokens=MAX_NEW, **extra
        )

    cases = _cases(server)
    for case, (text, finish, usage) in zip(cases, _all([call(*c) for c in cases]), strict=True):
        _valid(text, SCHEMAS[case[0]], finish, case)
        assert usage.prompt_tokens_details.cached_tokens >= 0


def test_openai_json_object_and_completions(server: Server) -> None:
    client = _openai(server)
    text, finish, _ = _chat(
        client,
        False,
        model="base",
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_object"},
    )
    assert finish == "length" or isinstance(json.loads(text), dict)
    schema = SCHEMAS["enums"]
    fmt = {"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}
    done = client.completions.create(
        model=server.adapters[1], prompt="x", max_tokens=40, extra_body={"response_format": fmt}
    )
    _valid(done.choices[0].text, schema, done.choices[0].finish_reason, "completions")


_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": SCHEMAS["optional"]}},
]


def _tool_calls(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str, str]:
    """(function name, arguments text, finish reason) of a forced tool call, streamed or not."""
    if not stream:
        resp = client.chat.completions.create(**kwargs)
        choice = resp.choices[0]
        assert choice.message.tool_calls and len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        return call.function.name, call.function.arguments, choice.finish_reason
    name, arguments, finish, ids = "", "", "", set()
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        assert not delta.content, delta  # a call, never text
        for call in delta.tool_calls or []:
            assert call.index == 0
            ids.add(call.id) if call.id else None
            name += (call.function.name or "") if call.function else ""
            arguments += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert len(ids) == 1
    return name, arguments, finish


@pytest.fixture(scope="module")
def long_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose model takes the longer prompts that describe tools (the tiny tokenizer's tokens are short)."""
    root = tmp_path_factory.mktemp("tools")
    base = tiny_served_model(root / "model", max_position_embeddings=2048)
    adapters = {
        f"tools/a{i}": make_adapter(base, root / f"a{i}", seed=i, r=4, target_modules="all-linear") for i in (1, 2)
    }
    srv = start_server(root, root / "model", adapters, "--max-input-tokens", "1500", "--max-total-tokens", "1700")
    yield srv
    srv.stop()


@pytest.mark.slow  # 120 requests (or a server of its own): tens of seconds
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_forced_tool_calls_parse_into_arguments(long_server: Server, stream: bool) -> None:
    server = long_server
    client = _openai(server)
    schemas: dict[str, Any] = {t["function"]["name"]: t["function"]["parameters"] for t in _TOOLS}
    cases = [
        (model, sampling, choice)
        for model in _models(server)
        for sampling in SAMPLINGS
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}})
    ]

    def call(model: str | None, sampling: str, choice: Any) -> Callable[[], tuple[str, str, str]]:
        extra = {"seed": 3, "temperature": 1.1} if sampling == "seeded" else {}
        messages = [{"role": "user", "content": "weather?"}]
        return lambda: _tool_calls(
            client, stream, model=model or "base", messages=messages, tools=_TOOLS, tool_choice=choice, **extra
        )

    for (model, sampling, choice), (name, arguments, finish) in zip(
        cases, _all([call(*c) for c in cases]), strict=True
    ):
        assert finish == "tool_calls", (model, sampling, choice)
        if isinstance(choice, dict):
            assert name == "get_time"
        jsonschema.validate(json.loads(arguments), schemas[name])


def test_tool_call_history_is_accepted(server: Server) -> None:
    client = _openai(server)
    messages: Any = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = client.chat.completions.create(model="base", messages=messages, max_tokens=4)
    assert resp.choices[0].finish_reason in ("length", "stop")


@pytest.fixture(scope="module")
def stub(server: Server) -> pb_grpc.TextGenerationStub:
    return pb_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))


def _grpc(
    stub: pb_grpc.TextGenerationStub, grammar: pb.Grammar, model: str | None, sampling: str, stream: bool
) -> tuple[str, str]:
    params = pb.Parameters(grammar=grammar, adapter_id=model or "", max_new_tokens=MAX_NEW, details=True)
    if sampling == "seeded":
        params.do_sample, params.temperature, params.seed = True, 1.2, 7
    request = pb.GenerateRequest(inputs="json:", parameters=params)
    if not stream:
        resp = stub.Generate(request, timeout=120)
        return resp.generated_text, resp.details.finish_reason
    last = list(stub.GenerateStream(request, timeout=120))[-1]
    return last.generated_text, last.details.finish_reason


@pytest.mark.slow  # 120 requests (or a server of its own): tens of seconds
def test_grpc_grammar_json_and_regex(server: Server, stub: pb_grpc.TextGenerationStub) -> None:
    cases = _cases(server)

    def call(c: tuple[str, str | None, str, bool]) -> Callable[[], tuple[str, str]]:
        return lambda: _grpc(stub, pb.Grammar(type="json", value=json.dumps(SCHEMAS[c[0]])), c[1], c[2], c[3])

    calls = [call(c) for c in cases]
    for case, (text, finish) in zip(cases, _all(calls), strict=True):
        _valid(text, SCHEMAS[case[0]], finish, case)
    text, finish = _grpc(stub, pb.Grammar(type="regex", value=REGEXES[2]), server.adapters[1], "seeded", True)
    assert finish == "eos_token" and re.fullmatch(REGEXES[2], text)


BAD_GRAMMARS: list[tuple[Any, dict[str, Any]]] = [
    ({"type": "regex", "value": "[a-"}, {}),
    ({"type": "json", "value": {"type": "frobnicate"}}, {}),
    ({"type": "json", "value": "{not json"}, {}),
    ({"type": "json", "value": [1, 2]}, {}),
    ({"type": "xml", "value": "<a/>"}, {}),
    ({"type": "json", "value": {"type": "string", "pattern": "(" * 3}}, {}),
    ({"type": "json", "value": {"enum": ["x" * 100] * (MAX_GRAMMAR_BYTES // 100)}}, {}),
    ({"type": "regex", "value": "[0-9]+"}, {"ignore_eos": True}),
    ({"type": "regex", "value": "[0-9]+"}, {"min_tokens": 2}),
    ("json", {}),
]


@pytest.mark.parametrize(("grammar", "extra"), BAD_GRAMMARS)
def test_bad_grammars_are_422_before_any_token(server: Server, grammar: Any, extra: dict[str, Any]) -> None:
    body = {"inputs": "x", "parameters": {"grammar": grammar, **extra}}
    for route in ("/generate", "/generate_stream"):
        r = httpx.post(server.url + route, json=body, timeout=30)
        assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
        assert "grammar" in r.json()["error"]


def test_bad_openai_structured_requests_are_422_in_openai_shape(server: Server) -> None:
    client = _openai(server)
    messages: Any = [{"role": "user", "content": "x"}]
    bad: list[dict[str, Any]] = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
        {"response_format": {"type": "yaml"}},
        {"tools": _TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
        {"tools": [{"type": "function"}], "tool_choice": "required"},
        {"tool_choice": "required"},
        {"tools": _TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
    ]
    for extra in bad:
        for stream in (False, True):
            with pytest.raises(openai.UnprocessableEntityError) as info:
                client.chat.completions.create(model="base", messages=messages, stream=stream, **extra)
            assert (
                info.value.status_code == 422 and isinstance(info.value.body, dict) and info.value.body.get("message")
            )


def test_bad_grpc_grammars_are_invalid_argument(stub: pb_grpc.TextGenerationStub) -> None:
    for grammar in (pb.Grammar(type="regex", value="[a-"), pb.Grammar(type="json", value="{"), pb.Grammar(type="x")):
        request = pb.GenerateRequest(inputs="x", parameters=pb.Parameters(grammar=grammar))
        for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grammar" in (info.value.details() or "")


def test_usage_reports_cached_tokens(server: Server) -> None:
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert isinstance(whole["usage"]["prompt_tokens_details"]["cached_tokens"], int)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and isinstance(usage[0]["prompt_tokens_details"]["cached_tokens"], int)


@pytest.mark.slow  # two ranks of their own
def test_tensor_parallel_ranks_agree_on_constrained_answers(
    server: Server, served_model: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """Every rank advances its own matchers by the same tokens: two ranks answer as one does."""
    model_dir, adapters = served_model
    name = server.adapters[0]
    two = start_server(tmp_path, model_dir, {name: adapters[name]}, num_shard=2)
    try:
        for model in (None, name):
            for sampling in SAMPLINGS.values():
                for grammar in ({"type": "json", "value": SCHEMAS["refs"]}, {"type": "regex", "value": REGEXES[2]}):
                    params = {"grammar": grammar, "adapter_id": model, "max_new_tokens": MAX_NEW, **sampling}
                    assert _tgi(two, "tp", params, False) == _tgi(server, "tp", params, False)
        text, finish = _tgi(two, "tp", {"grammar": {"type": "json", "value": SCHEMAS["refs"]}}, True)
        _valid(text, SCHEMAS["refs"], finish, "two ranks")
    finally:
        two.stop()
