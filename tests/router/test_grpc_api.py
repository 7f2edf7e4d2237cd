"""The public gRPC API through stubs generated from proto/, over a real channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from loraplex.router.grpc_api import HideExceptions
from tests.servers import Server


@pytest.fixture()
def stub(server: Server) -> pb_grpc.TextGenerationStub:
    return pb_grpc.TextGenerationStub(grpc.insecure_channel(server.grpc_address))


def test_generate_and_stream_match_http(server: Server, stub: pb_grpc.TextGenerationStub) -> None:
    adapter = server.adapters[3]
    params = pb.Parameters(adapter_id=adapter, max_new_tokens=7, details=True)
    resp = stub.Generate(pb.GenerateRequest(inputs="the lazy dog", parameters=params), timeout=60)
    http = httpx.post(
        server.url + "/generate",
        json={"inputs": "the lazy dog", "parameters": {"adapter_id": adapter, "max_new_tokens": 7, "details": True}},
        timeout=60,
    ).json()
    assert resp.generated_text == http["generated_text"]
    assert [t.id for t in resp.details.tokens] == [t["id"] for t in http["details"]["tokens"]]
    assert resp.details.generated_tokens == len(resp.details.tokens)

    stream = list(stub.GenerateStream(pb.GenerateRequest(inputs="the lazy dog", parameters=params), timeout=60))
    assert [m.token.id for m in stream] == [t.id for t in resp.details.tokens]
    assert [m.index for m in stream] == list(range(1, len(stream) + 1))
    assert stream[-1].HasField("generated_text") and stream[-1].generated_text == resp.generated_text
    assert not any(m.HasField("generated_text") for m in stream[:-1])


def test_tokenize_info_health_list_adapters(server: Server, stub: pb_grpc.TextGenerationStub) -> None:
    toks = stub.Tokenize(pb.TokenizeRequest(inputs="hello world"), timeout=10).tokens
    http = httpx.post(server.url + "/tokenize", json={"inputs": "hello world"}, timeout=10).json()
    assert [t.id for t in toks] == [t["id"] for t in http] and "".join(t.text for t in toks) == "hello world"
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert info.max_total_tokens == 300 and info.max_input_tokens == 200 and info.num_shard == 1
    stub.Health(pb.HealthRequest(), timeout=10)
    for adapter_id in server.adapters:  # a request puts each adapter on the device, whatever ran before
        params = pb.Parameters(adapter_id=adapter_id, max_new_tokens=1)
        stub.Generate(pb.GenerateRequest(inputs="hello", parameters=params), timeout=60)
    adapters = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters
    assert sorted(a.id for a in adapters) == sorted(server.adapters)
    by_id = {a.id: a for a in adapters}
    assert by_id[server.adapters[2]].targets == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert {a.rank for a in adapters} == {1, 4, 8, 16} and all(a.bytes > 0 and a.tier == "device" for a in adapters)


def test_grpc_errors_have_status_codes(server: Server, stub: pb_grpc.TextGenerationStub) -> None:
    cases = [
        (pb.Parameters(adapter_id="nope"), "hi", grpc.StatusCode.NOT_FOUND),
        (pb.Parameters(temperature=-1), "hi", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Parameters(max_new_tokens=0), "hi", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Parameters(top_p=1.0), "hi", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Parameters(max_new_tokens=5), "", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.Parameters(stop=["a", "b", "c", "d", "e"]), "hi", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for params, inputs, code in cases:
        for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as info:
                call(pb.GenerateRequest(inputs=inputs, parameters=params), timeout=30)
            assert info.value.code() == code, (params, info.value.details())
    ok = stub.Generate(pb.GenerateRequest(inputs="hi", parameters=pb.Parameters(max_new_tokens=2)), timeout=30)
    http = httpx.post(server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert ok.generated_text == http.json()["generated_text"]  # the server still serves after the errors
    assert not ok.HasField("details")  # details were not asked for


class _Failing(pb_grpc.TextGenerationServicer):
    """Methods that fail the way a bug would, with text that must not reach the client."""

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        raise OSError(2, "No such file or directory", "/srv/secret-root/team-a/adapter")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        yield pb.StreamResponse(index=1)
        raise KeyError("/srv/secret-root/x")

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "validation: a chosen answer")
        raise AssertionError("unreachable")


def test_unexpected_exceptions_reach_grpc_clients_as_internal_without_their_text() -> None:
    async def main() -> None:
        server = grpc.aio.server(interceptors=[HideExceptions()])
        pb_grpc.add_TextGenerationServicer_to_server(_Failing(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TextGenerationStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Info(pb.InfoRequest(), timeout=10)
                assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for message in stub.GenerateStream(pb.GenerateRequest(inputs="x"), timeout=10):
                        got.append(message.index)
                assert got == [1]
                assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")
                with pytest.raises(grpc.aio.AioRpcError) as info:  # an abort keeps its code and words
                    await stub.Tokenize(pb.TokenizeRequest(inputs="x"), timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == "validation: a chosen answer"
        finally:
            await server.stop(None)

    asyncio.run(main())
