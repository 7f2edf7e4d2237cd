"""Soak: 2,000+ requests at 64 concurrency over HTTP, OpenAI and gRPC, with streams, cancels and disconnects."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loraplex.proto.v1 import generate_pb2 as pb
from loraplex.proto.v1 import generate_pb2_grpc as pb_grpc
from tests.servers import Server, start_server

PROMPTS = ["the quick brown fox", "hello world", "what is the capital of France?", "answer in json"]
TOKENS = 8
KINDS = {"tgi": 35, "tgi_stream": 15, "openai": 15, "grpc": 15, "cancel_stream": 12, "disconnect": 8}


@pytest.fixture(scope="module")
def soak_server(
    served_model: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    model_dir, adapters = served_model
    srv = start_server(tmp_path_factory.mktemp("soak"), model_dir, adapters)
    yield srv
    srv.stop()


def _rss(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match
    return int(match[1]) * 1024


def _gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", metrics, re.M)
    assert match, name
    return float(match[1])


class Soak:
    """Runs one job of each kind against the server and classifies how it ended."""

    def __init__(self, server: Server, solo: dict[tuple[str, str], str]) -> None:
        self.server = server
        self.solo = solo
        self.outcomes: Counter[str] = Counter()
        self.mismatches: list[tuple[str, str, str, str]] = []

    def _check(self, kind: str, adapter: str, prompt: str, text: str) -> None:
        if text == self.solo[(adapter, prompt)]:
            self.outcomes["answered"] += 1
        else:
            self.mismatches.append((kind, adapter, prompt, text))

    async def run(self, jobs: list[tuple[str, str, str]], concurrency: int) -> None:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=self.server.url, timeout=120) as client:
            channel = grpc.aio.insecure_channel(self.server.grpc_address)
            stub = pb_grpc.TextGenerationStub(channel)

            async def one(kind: str, adapter: str, prompt: str) -> None:
                async with gate:
                    try:
                        await self._job(client, stub, kind, adapter, prompt)
                    except (httpx.HTTPError, grpc.aio.AioRpcError) as exc:
                        self.outcomes[f"error:{type(exc).__name__}"] += 1

            await asyncio.gather(*(one(*job) for job in jobs))
            await channel.close()

    async def _job(self, client: httpx.AsyncClient, stub: Any, kind: str, adapter: str, prompt: str) -> None:
        params: dict[str, Any] = {"max_new_tokens": TOKENS}
        if adapter:
            params["adapter_id"] = adapter
        body = {"inputs": prompt, "parameters": params}
        if kind == "tgi":
            resp = await client.post("/generate", json=body)
            self._http_outcome(
                kind, adapter, prompt, resp, resp.json().get("generated_text") if resp.is_success else None
            )
        elif kind in ("tgi_stream", "cancel_stream"):
            text, events = "", 0
            async with client.stream("POST", "/generate_stream", json=body) as resp:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    events += 1
                    if kind == "cancel_stream" and events == 2:
                        self.outcomes["cancelled"] += 1
                        return  # leaving the block closes the connection mid-stream
                    event = httpx.Response(200, content=line.removeprefix("data:")).json()
                    if "error" in event:
                        self.outcomes["error:stream"] += 1
                        return
                    if event.get("generated_text") is not None:
                        text = event["generated_text"]
            self._check(kind, adapter, prompt, text)  # a cancel_stream that ended before its 2nd token too
        elif kind == "openai":
            request = {"model": adapter or "base", "prompt": prompt, "max_tokens": TOKENS}
            resp = await client.post("/v1/completions", json=request)
            text = resp.json()["choices"][0]["text"] if resp.is_success else None
            self._http_outcome(kind, adapter, prompt, resp, text)
        elif kind == "grpc":
            parameters = pb.Parameters(adapter_id=adapter, max_new_tokens=TOKENS)
            reply = await stub.Generate(pb.GenerateRequest(inputs=prompt, parameters=parameters), timeout=120)
            self._check(kind, adapter, prompt, reply.generated_text)
        else:  # disconnect: a client that gives up before the answer
            try:
                await client.post("/generate", json=body, timeout=0.005)
                self.outcomes["answered_before_disconnect"] += 1
            except httpx.TimeoutException:
                self.outcomes["disconnected"] += 1

    def _http_outcome(self, kind: str, adapter: str, prompt: str, resp: httpx.Response, text: str | None) -> None:
        if text is None:
            self.outcomes[f"error:{resp.status_code}"] += 1
        else:
            self._check(kind, adapter, prompt, text)


@pytest.mark.slow
def test_soak_loses_nothing_and_leaks_nothing(soak_server: Server) -> None:
    server = soak_server
    adapters = ["", *server.adapters]
    solo = {}
    for adapter in adapters:  # the oracle: each combination alone on an idle server
        for prompt in PROMPTS:
            params = {"max_new_tokens": TOKENS, **({"adapter_id": adapter} if adapter else {})}
            resp = httpx.post(server.url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=60)
            solo[(adapter, prompt)] = resp.json()["generated_text"]
    rng = random.Random(11)
    kinds = [k for k, w in KINDS.items() for _ in range(w)]

    def jobs(n: int) -> list[tuple[str, str, str]]:
        return [(rng.choice(kinds), rng.choice(adapters), rng.choice(PROMPTS)) for _ in range(n)]

    warm = Soak(server, solo)
    asyncio.run(warm.run(jobs(300), concurrency=64))
    time.sleep(1)
    rss_warm = {name: _rss(p.pid) for name, p in (("router", server.router), ("shard", server.shards[0]))}

    soak = Soak(server, solo)
    started = time.monotonic()
    work = jobs(2100)
    asyncio.run(soak.run(work, concurrency=64))
    elapsed = time.monotonic() - started

    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        if _gauge(metrics, "loraplex_running_requests") == 0 and _gauge(metrics, "loraplex_kv_blocks_used") == 0:
            break
        assert time.monotonic() < deadline, "requests or KV blocks still held after the soak"
        time.sleep(0.2)
    time.sleep(1)
    rss_after = {name: _rss(p.pid) for name, p in (("router", server.router), ("shard", server.shards[0]))}
    print(
        f"\nsoak: {len(work)} requests in {elapsed:.1f} s at 64 concurrency; outcomes {dict(soak.outcomes)}; "
        + ", ".join(f"{n} RSS {rss_warm[n] / 2**20:.0f} -> {rss_after[n] / 2**20:.0f} MiB" for n in rss_warm)
    )
    assert not soak.mismatches, soak.mismatches[:5]
    assert not [k for k in soak.outcomes if k.startswith("error")], soak.outcomes
    assert sum(soak.outcomes.values()) == len(work)  # every request ended one way or another
    assert soak.outcomes["answered"] >= 0.7 * len(work) and soak.outcomes["cancelled"] > 100
    assert soak.outcomes["disconnected"] > 50
    for name in rss_warm:
        assert rss_after[name] <= 1.10 * rss_warm[name], (name, rss_warm[name], rss_after[name])
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
