"""Adapters loaded on demand from disk: a Zipf workload over 1,000 of them, memory bounded by the tiers."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from loraplex.shard.lora.roots import AdapterRoots
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import build_runner
from tests.factories import tiny_served_model, write_raw_adapter
from tests.servers import Server, start_server

NUM_ADAPTERS = 1000
TARGETS = [("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "down_proj"), ("k_proj", "up_proj")]
PROMPTS = ["the quick brown fox", "hello world", "what is the capital of France?", "answer in json"]
ADMIN = "admin-secret-0002"


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match[1])


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match
    return int(match[1]) * 1024


@pytest.fixture(scope="module")
def zipf_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    top = tmp_path_factory.mktemp("zipf")
    model_dir = top / "model"
    tiny_served_model(model_dir)
    root = top / "adapters"
    for i in range(NUM_ADAPTERS):
        write_raw_adapter(
            root / "pool" / f"a{i:04d}", model_dir, rank=[1, 2, 4, 8][i % 4], targets=TARGETS[i % 4], seed=i
        )
    server = start_server(
        top,
        model_dir,
        {},
        "--max-concurrent-requests",
        "600",
        shard_args=("--adapter-dirs", str(root), "--max-active-adapters", "8", "--max-cpu-adapters", "8"),
    )
    yield dict(server=server, root=root, model_dir=model_dir)
    server.stop()


async def _run_workload(server: Server, jobs: list[tuple[str, str]], concurrency: int) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(adapter: str, prompt: str) -> dict[str, Any]:
            params = {"adapter_id": adapter, "max_new_tokens": 6, "details": True, "decoder_input_details": True}
            async with gate:
                started = time.monotonic()
                resp = await client.post(server.url + "/generate", json={"inputs": prompt, "parameters": params})
                elapsed = time.monotonic() - started
            return {"status": resp.status_code, "body": resp.json(), "adapter": adapter, "seconds": elapsed}

        return await asyncio.gather(*(one(a, p) for a, p in jobs))


@pytest.mark.slow
def test_zipf_workload_over_1000_adapters_equals_solo_runs(zipf_world: dict[str, Any]) -> None:
    server = zipf_world["server"]
    rng = random.Random(7)
    weights = [1.0 / (k + 1) for k in range(NUM_ADAPTERS)]
    picks = rng.choices(range(NUM_ADAPTERS), weights=weights, k=520)
    jobs = [(f"pool/a{k:04d}", PROMPTS[i % len(PROMPTS)]) for i, k in enumerate(picks)]
    results = asyncio.run(_run_workload(server, jobs, concurrency=64))
    failed = [r for r in results if r["status"] != 200]
    assert not failed, failed[:3]

    # The oracle: each adapter alone, in this process, through the same model code, no batching, no tiers.
    runner = build_runner(zipf_world["model_dir"], kv_blocks=64, block_size=8)
    store = AdapterStore(runner.model.config, dtype=torch.float32, roots=AdapterRoots([zipf_world["root"]]))
    solo: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for r in results:
        details = r["body"]["details"]
        prompt = tuple(t["id"] for t in details["prefill"])
        key = (r["adapter"], prompt)
        if key not in solo:
            adapter = store.load(r["adapter"])
            solo[key] = runner.generate_greedy([(list(prompt), adapter)], 6)[0]
            store.unload(r["adapter"])
        got = [t["id"] for t in details["tokens"]]
        assert got == solo[key][: len(got)], r["adapter"]
        assert details["finish_reason"] == "eos_token" or len(got) == 6
    distinct = len({a for a, _ in jobs})
    assert distinct > 8 * 4  # many more adapters than device slots, so tiers really turned over

    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    longest = _metric(metrics, "loraplex_queue_wait_longest_seconds")
    slowest = max(r["seconds"] for r in results)
    loads = _metric(metrics, "loraplex_adapter_loads_total")
    print(f"\nzipf: {loads:.0f} loads for {distinct} distinct adapters ({loads / distinct:.2f} per adapter)")
    assert distinct <= loads <= 2 * distinct  # LRU over what is idle: little reloading, no thrash
    print(
        f"\nzipf: {len(jobs)} requests over {distinct} adapters, longest queue wait {longest:.2f} s, "
        f"slowest request (adapter load + queue + generation) {slowest:.2f} s"
    )
    assert longest < 60.0
    assert _metric(metrics, "loraplex_running_requests") == 0
    assert len(re.findall(r'^loraplex_adapter_tier\{adapter="pool/', metrics, re.M)) <= 16  # host + device limits


@pytest.fixture(scope="module")
def memory_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    top = tmp_path_factory.mktemp("memory")
    model_dir = top / "model"
    tiny_served_model(model_dir, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    root = top / "adapters"
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for i in range(40):
        write_raw_adapter(root / f"m{i:02d}", model_dir, rank=64, targets=every, seed=i, std=0.05)
    write_raw_adapter(root / "warm", model_dir, rank=64, targets=every, seed=99, std=0.05)
    server = start_server(
        top,
        model_dir,
        {},
        "--admin-token",
        ADMIN,
        shard_args=("--adapter-dirs", str(root), "--max-active-adapters", "2", "--max-cpu-adapters", "2"),
    )
    yield dict(server=server, root=root)
    server.stop()


def _answer(server: Server, adapter: str | None) -> list[int]:
    params: dict[str, Any] = {"max_new_tokens": 8, "details": True}
    if adapter:
        params["adapter_id"] = adapter
    resp = httpx.post(server.url + "/generate", json={"inputs": "hello world", "parameters": params}, timeout=60)
    assert resp.status_code == 200, resp.text
    return [t["id"] for t in resp.json()["details"]["tokens"]]


@pytest.mark.slow
def test_host_memory_stays_within_the_tier_limits_and_unload_frees_it(memory_world: dict[str, Any]) -> None:
    server = memory_world["server"]
    pid = server.procs[0].pid  # rank 0's shard process
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for _ in range(3):
        _answer(server, None)  # warm the base path first: its buffers are not the adapters' doing
    # ... and the adapter path (loader threads, LoRA buffers), with an adapter that leaves afterwards
    _answer(server, "warm")
    assert httpx.delete(server.url + "/adapters/warm", headers=admin, timeout=30).status_code == 200
    before = _rss_bytes(pid)
    answers = {f"m{i:02d}": _answer(server, f"m{i:02d}") for i in range(40)}
    after = _rss_bytes(pid)
    listing = httpx.get(server.url + "/adapters", headers=admin, timeout=30).json()["adapters"]
    loaded = [a for a in listing if a["tier"] in ("host", "device")]
    adapter_bytes = max(a["bytes"] for a in listing)
    allowed = 4 * adapter_bytes  # --max-active-adapters 2 + --max-cpu-adapters 2
    growth = after - before
    print(
        f"\nmemory: adapter {adapter_bytes / 2**20:.1f} MiB, 40 requested, {len(loaded)} loaded; "
        f"RSS growth {growth / 2**20:.1f} MiB, allowed {allowed / 2**20:.1f} MiB, "
        f"all 40 would be {40 * adapter_bytes / 2**20:.1f} MiB"
    )
    assert len(loaded) <= 4
    assert growth <= 1.5 * allowed

    freed_bytes = sum(a["bytes"] for a in loaded)
    for a in loaded:
        assert httpx.delete(server.url + f"/adapters/{a['id']}", headers=admin, timeout=30).status_code == 200
    unloaded = _rss_bytes(pid)
    fell = (after - unloaded) / 2**20
    print(f"unload: {len(loaded)} adapters of {freed_bytes / 2**20:.1f} MiB, RSS fell {fell:.1f} MiB")
    assert after - unloaded >= 0.5 * freed_bytes
    listing = httpx.get(server.url + "/adapters", headers=admin, timeout=30).json()["adapters"]
    assert all(a["tier"] == "disk" for a in listing)
    for name in [a["id"] for a in loaded][:2]:
        assert _answer(server, name) == answers[name]  # a reload serves exactly what it served before
