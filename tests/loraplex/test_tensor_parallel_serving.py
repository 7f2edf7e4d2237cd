"""--num-shard 2 end to end: same answers as one shard; a rank killed mid-stream fails requests fast."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.factories import make_adapter, tiny_served_model
from tests.servers import Server, start_server

RANKS = [1, 3, 5, 16, 64]


def _setup(root: Path) -> tuple[Path, dict[str, Path]]:
    base = tiny_served_model(root / "model")
    targets: list[Any] = ["all-linear", ["q_proj", "v_proj"], ["o_proj", "down_proj"], "all-linear", ["k_proj"]]
    adapters = {
        f"r{r}": make_adapter(base, root / f"r{r}", seed=r, r=r, lora_alpha=r + 3, target_modules=t)
        for r, t in zip(RANKS, targets, strict=True)
    }
    return root / "model", adapters


async def _answers(server: Server, jobs: list[tuple[str, str | None]]) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(prompt: str, adapter: str | None) -> list[int]:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "adapter_id": adapter, "details": True}}
            r = await client.post(server.url + "/generate", json=body)
            assert r.status_code == 200, r.text
            return [t["id"] for t in r.json()["details"]["tokens"]]

        return list(await asyncio.gather(*(one(p, a) for p, a in jobs)))


def test_two_shards_answer_like_one_for_base_and_mixed_adapters(tmp_path: Path) -> None:
    """Also with the adapters loaded on demand under tensor parallelism."""
    model_dir, adapters = _setup(tmp_path)
    names: list[str | None] = [None, *adapters]
    prompts = ["the quick brown fox", "hello world", "what is the capital of France?", "json 0123"]
    jobs = [(prompts[i % 4], names[i % len(names)]) for i in range(24)]  # 12 distinct (prompt, adapter) pairs
    results = []
    for n in (1, 2):
        (tmp_path / f"tp{n}").mkdir()
        # One shard preloads the adapters; two shards load them on first request (each rank its slice).
        preload, roots = (adapters, ()) if n == 1 else ({}, ("--adapter-dirs", str(tmp_path)))
        srv = start_server(tmp_path / f"tp{n}", model_dir, preload, num_shard=n, shard_args=roots)
        try:
            results.append(asyncio.run(_answers(srv, jobs)))
        finally:
            srv.stop()
    assert results[0] == results[1]
    assert len({tuple(r) for r in results[0]}) > 8


@pytest.mark.parametrize("num_shard", [1, 2])
def test_killing_a_rank_mid_stream_errors_fast_and_health_turns_503(tmp_path: Path, num_shard: int) -> None:
    model_dir, adapters = _setup(tmp_path)
    srv = start_server(tmp_path, model_dir, adapters, num_shard=num_shard)
    try:
        rank1 = srv.procs[num_shard - 1]  # the last rank (the only one with a single shard)
        body = {"inputs": "hello world", "parameters": {"max_new_tokens": 250, "adapter_id": "r16"}}
        other = {"inputs": "the quick", "parameters": {"max_new_tokens": 250}}

        async def scenario() -> tuple[list[dict[str, Any]], httpx.Response, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                events: list[dict[str, Any]] = []
                background = asyncio.create_task(client.post(srv.url + "/generate", json=other))
                async with client.stream("POST", srv.url + "/generate_stream", json=body) as r:
                    killed_at = 0.0
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        events.append(json.loads(line[5:]))
                        if len(events) == 3:
                            os.kill(rank1.pid, signal.SIGKILL)
                            killed_at = time.monotonic()
                ended = time.monotonic() - killed_at
                return events, await background, ended

        events, background, seconds = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        assert seconds < 10
        assert events[-1].get("error_type") == "generation", events[-1]
        assert background.status_code == 424 and background.json()["error_type"] == "generation"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        r = httpx.post(srv.url + "/generate", json={"inputs": "hi"}, timeout=30)
        assert r.status_code in (424, 503), r.text  # an error, fast, not a hang
    finally:
        srv.stop()
