"""Streaming clients for a loraplex server (TGI-style HTTP SSE and the public gRPC API), timing every token."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from loraplex.bench.workload import BenchRequest


@dataclass
class RequestResult:
    """One request as the client saw it; times are ``time.perf_counter()`` seconds."""

    index: int
    adapter: str | None
    sent: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    done: float = 0.0
    finish_reason: str = ""
    error: str = ""

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]


class Client(Protocol):
    async def stream(self, request: BenchRequest) -> RequestResult: ...

    async def close(self) -> None: ...


class HttpClient:
    """``POST /generate_stream`` (SSE), greedy, with details for the finish reason."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)

    async def stream(self, request: BenchRequest) -> RequestResult:
        params: dict[str, Any] = {"max_new_tokens": request.max_new_tokens, "details": True}
        if request.adapter is not None:
            params["adapter_id"] = request.adapter
        result = RequestResult(request.index, request.adapter, time.perf_counter())
        body = {"inputs": request.prompt.text, "parameters": params}
        try:
            async with self.http.stream("POST", self.url + "/generate_stream", json=body) as resp:
                if resp.status_code != 200:
                    result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                    return result
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        result.error = f"{event.get('error_type')}: {event['error']}"
                        break
                    if event.get("token") is not None:
                        result.token_times.append(time.perf_counter())
                        result.token_ids.append(int(event["token"]["id"]))
                    if event.get("details"):
                        result.finish_reason = str(event["details"].get("finish_reason", ""))
        except httpx.HTTPError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            result.done = time.perf_counter()
        return result

    async def close(self) -> None:
        await self.http.aclose()


class GrpcClient:
    """``loraplex.v1.TextGeneration/GenerateStream``."""

    def __init__(self, address: str, api_key: str = "", timeout: float = 600.0) -> None:
        from loraplex.proto.v1 import generate_pb2, generate_pb2_grpc

        self.pb = generate_pb2
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = generate_pb2_grpc.TextGenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    async def stream(self, request: BenchRequest) -> RequestResult:
        params = self.pb.Parameters(max_new_tokens=request.max_new_tokens, details=True)
        if request.adapter is not None:
            params.adapter_id = request.adapter
        result = RequestResult(request.index, request.adapter, time.perf_counter())
        message = self.pb.GenerateRequest(inputs=request.prompt.text, parameters=params)
        try:
            call = self.stub.GenerateStream(message, metadata=self.metadata, timeout=self.timeout)
            async for event in call:
                if event.HasField("token"):
                    result.token_times.append(time.perf_counter())
                    result.token_ids.append(event.token.id)
                if event.HasField("details"):
                    result.finish_reason = event.details.finish_reason
        except grpc.aio.AioRpcError as exc:
            result.error = f"{exc.code().name}: {exc.details()}"
        finally:
            result.done = time.perf_counter()
        return result

    async def close(self) -> None:
        await self.channel.close()


def scrape_metrics(url: str) -> dict[str, float]:
    """The server's ``/metrics`` as ``{"name{label=value,…}": value}`` (counters, gauges, histogram parts)."""
    text = httpx.get(url.rstrip("/") + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out
