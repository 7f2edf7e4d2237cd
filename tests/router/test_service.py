"""RouterService answers info, health and adapter lists once; HTTP and gRPC only translate its answers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from loraplex.proto.shard.v1 import shard_pb2
from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.router.admin_api import adapter_json
from loraplex.router.grpc_api import TextGeneration
from loraplex.router.http_api import tgi_routes
from loraplex.router.ledger import RequestLedger
from loraplex.router.service import RouterService
from loraplex.router.settings import RouterSettings
from loraplex.router.shards import adapter_view
from loraplex.router.tenancy import Tenant
from loraplex.router.views import ModelInfo

SAMPLE = shard_pb2.AdapterInfo(
    id="team/a", rank=8, targets=["q_proj", "v_proj"], bytes=1234, tier="host", requests=3, load_seconds=0.25
)


class _Shards:
    """The two shard calls the service's answers need; ``up`` False makes health fail as a dead rank would."""

    def __init__(self, up: bool = True) -> None:
        self.up = up

    async def health(self, timeout: float) -> shard_pb2.HealthResponse:
        if not self.up:
            raise ConnectionError("rank 0 is gone")
        return shard_pb2.HealthResponse(kv_blocks_used=7)

    async def list_adapters(self) -> list[Any]:
        other = shard_pb2.AdapterInfo(id="team/b", rank=4, targets=["q_proj"], bytes=10, tier="disk")
        return [adapter_view(SAMPLE), adapter_view(other)]


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


def _service(up: bool = True, healthy: bool = True, draining: bool = False) -> RouterService:
    # Info, health and adapter lists read only these parts of the scheduler and the registry.
    scheduler = SimpleNamespace(shards=_Shards(up), healthy=healthy, in_flight=0)
    registry = SimpleNamespace(refs=Counter({"team/a": 2}))
    settings = RouterSettings(max_input_tokens=200, max_total_tokens=300)
    ledger = RequestLedger(registry, 0, 0)  # type: ignore[arg-type]
    service = RouterService(scheduler, None, settings, ModelInfo("m", "float32", "cpu", 2), registry, ledger)  # type: ignore[arg-type]
    if draining:
        service.drain()
    return service


def _http(service: RouterService) -> TestClient:
    app = FastAPI()  # no lifespan: nothing here needs the batching loop
    app.include_router(tgi_routes(service))
    return TestClient(app)


def test_http_and_grpc_info_are_one_server_info() -> None:
    service = _service()
    info = dataclasses.asdict(service.info())
    assert _http(service).get("/info").json() == info
    answer = asyncio.run(TextGeneration(service).Info(pb.InfoRequest(), _Context()))
    fields = [f.name for f in answer.DESCRIPTOR.fields]
    assert set(fields) <= set(info)  # gRPC has a subset of the fields, never one of its own
    assert {name: getattr(answer, name) for name in fields} == {name: info[name] for name in fields}
    assert info["max_total_tokens"] == 300 and info["num_shard"] == 2 and info["router"] == "loraplex"


@pytest.mark.parametrize(
    ("state", "error_type", "message"),
    [
        ({}, None, None),
        ({"up": False}, "unhealthy", "shards unavailable"),
        ({"healthy": False}, "unhealthy", "shards unavailable"),
        ({"draining": True}, "unavailable", "shutting down"),
    ],
)
def test_http_and_grpc_health_are_one_answer(state: dict[str, bool], error_type: str | None, message: str) -> None:
    service = _service(**state)
    resp = _http(service).get("/health")
    grpc_call = TextGeneration(service).Health(pb.HealthRequest(), _Context())
    if error_type is None:
        assert resp.status_code == 200
        assert asyncio.run(grpc_call) == pb.HealthResponse()
        return
    assert resp.status_code == 503 and resp.json() == {"error": message, "error_type": error_type}
    with pytest.raises(_Aborted) as aborted:
        asyncio.run(grpc_call)
    assert aborted.value.code == grpc.StatusCode.UNAVAILABLE and aborted.value.details == message


def test_adapters_leave_the_service_as_router_types() -> None:
    service = _service()
    (mine,) = asyncio.run(service.list_adapters(Tenant("t", ("team/a",))))
    assert mine.in_flight == 2  # the registry's count of requests that need it
    assert [a.id for a in asyncio.run(service.list_adapters())] == ["team/a", "team/b"]
    as_json = adapter_json(mine)
    assert as_json["targets"] == ["q_proj", "v_proj"] and as_json["in_flight"] == 2 and as_json["bytes"] == 1234
    listed = asyncio.run(TextGeneration(service).ListAdapters(pb.ListAdaptersRequest(), _Context()))
    # What the shard said, field for field, as the public message (the two share their wire format).
    assert listed.adapters[0] == pb.AdapterInfo.FromString(SAMPLE.SerializeToString())
