"""/metrics of a running server under a mixed workload: each protocol metric's type, range and labels, the LoRA
lists against the admin API, KV utilization up under load and back to 0, the Helm picker's names served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import Server, start_server

TOP = 4  # --metrics-top-adapters
SLOTS = 3  # --max-active-adapters
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(served_model: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir, adapters = served_model
    server = start_server(
        tmp_path_factory.mktemp("metrics"),
        model_dir,
        adapters,
        "--metrics-top-adapters",
        str(TOP),
        shard_args=("--max-active-adapters", str(SLOTS)),
    )
    yield server
    server.stop()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str) -> float:
    (sample,) = fams[name].samples
    return float(sample.value)


def split(ids: str) -> set[str]:
    return set(ids.split(",")) if ids else set()


async def _workload(server: Server, adapters: list[str]) -> None:
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(i: int) -> None:
            adapter = adapters[i % len(adapters)] if i % 5 else None  # every fifth on the base model
            params = {"max_new_tokens": 48 + i % 16, "adapter_id": adapter}
            if i % 2:
                body = {"model": adapter or "base", "prompt": "count to ten " * (1 + i % 4), "max_tokens": 40}
                r = await client.post(server.url + "/v1/completions", json=body)
            else:
                r = await client.post(
                    server.url + "/generate", json={"inputs": "hello world " * 3, "parameters": params}
                )
            assert r.status_code == 200, r.text

        await asyncio.gather(*(one(i) for i in range(36)))


def _kv_usage(text: str) -> float:
    return value(families(text), "vllm:kv_cache_usage_perc")


async def _observe(server: Server, done: asyncio.Event, seen: list[dict[str, Any]]) -> None:
    """Scrapes while the workload runs, each between two reads of the admin API's adapter list."""
    async with httpx.AsyncClient(timeout=60) as client:
        while not done.is_set():
            before = (await client.get(server.url + "/adapters")).json()["adapters"]
            text = (await client.get(server.url + "/metrics")).text
            after = (await client.get(server.url + "/adapters")).json()["adapters"]
            seen.append({"before": before, "metrics": text, "after": after, "at": time.time()})
            await asyncio.sleep(0.05)


@pytest.mark.slow
def test_protocol_metrics_during_a_mixed_workload(live: Server) -> None:
    adapters = live.adapters[:7]

    seen: list[dict[str, Any]] = []

    async def run() -> None:
        done = asyncio.Event()
        watcher = asyncio.ensure_future(_observe(live, done, seen))
        try:
            await _workload(live, adapters)
            # The KV gauge is read from the shards at most once a second, and one round can finish between
            # two reads on a fast machine: the load goes on, round after round, until a read falls inside it.
            deadline = time.monotonic() + 60
            while not any(_kv_usage(s["metrics"]) > 0 for s in seen) and time.monotonic() < deadline:
                await _workload(live, adapters)
        finally:
            done.set()
        await watcher

    asyncio.run(run())
    assert len(seen) >= 5
    info = httpx.get(live.url + "/info", timeout=10).json()
    usage, running_seen, waiting_seen = [], set(), set()
    for s in seen:
        fams = families(s["metrics"])
        for name in ("vllm:num_requests_waiting", "loraplex_queue_size", "vllm:num_requests_running"):
            assert fams[name].type == "gauge"
            assert value(fams, name) >= 0 and value(fams, name).is_integer(), name
        assert value(fams, "vllm:num_requests_running") <= 256  # --max-batch-size
        for name in ("vllm:kv_cache_usage_perc", "loraplex_kv_cache_usage_perc"):
            assert fams[name].type == "gauge" and 0 <= value(fams, name) <= 1, name
        usage.append(value(fams, "vllm:kv_cache_usage_perc"))
        for name in ("vllm:lora_requests_info", "loraplex_lora_requests_info"):
            (lora,) = fams[name].samples  # one series: the reading of now
            assert fams[name].type == "gauge" and abs(lora.value - s["at"]) < 30
            assert lora.labels["max_lora"] == str(SLOTS)
        held_before = {a["id"] for a in s["before"] if a["tier"] in ("host", "device")}
        held_after = {a["id"] for a in s["after"] if a["tier"] in ("host", "device")}
        busy = {a["id"] for a in s["before"] + s["after"] if a["in_flight"] > 0}
        running, waiting = split(lora.labels["running_lora_adapters"]), split(lora.labels["waiting_lora_adapters"])
        # Nothing is unloaded here (room for all), so what the admin API lists as held only grows.
        assert held_before <= running <= held_after
        assert waiting <= busy  # adapters with requests waiting: in flight by the admin API's count
        running_seen |= running
        waiting_seen |= waiting
        for name in ("vllm:cache_config_info", "loraplex_cache_config_info"):
            (cache,) = fams[name].samples
            assert cache.value == 1
            assert cache.labels["block_size"] == str(info["kv_block_size"]) == "8"
            assert cache.labels["num_gpu_blocks"] == str(info["kv_blocks"])
            assert cache.labels["enable_prefix_caching"] == str(info["prefix_caching"])
        for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "loraplex_prefix_cache_hit_tokens"):
            assert fams[name].type == "counter" and fams[name].samples[0].value >= 0
    assert set(adapters) <= running_seen and waiting_seen  # every adapter held; some waited
    assert max(usage) > 0  # utilization rose with the load

    # ... and returns to 0 once the load is gone, with nothing waiting or running.
    deadline = time.monotonic() + 20
    while True:
        fams = families(httpx.get(live.url + "/metrics", timeout=10).text)
        idle = [value(fams, n) for n in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running")]
        if idle == [0, 0]:
            break
        assert time.monotonic() < deadline, idle
        time.sleep(0.3)
    assert value(fams, "vllm:num_requests_waiting") == 0
    (lora,) = fams["vllm:lora_requests_info"].samples
    assert lora.labels["waiting_lora_adapters"] == ""
    listed = httpx.get(live.url + "/adapters", timeout=10).json()["adapters"]
    assert split(lora.labels["running_lora_adapters"]) == {a["id"] for a in listed if a["tier"] in ("host", "device")}

    # Per-adapter series stay within --metrics-top-adapters: 7 adapters used, 4 named, the rest "other".
    labels = {s.labels["adapter"] for f in fams.values() for s in f.samples if "adapter" in s.labels}
    assert len(labels - {"base", "other"}) <= TOP and {"base", "other"} <= labels


@pytest.mark.slow
def test_the_charts_picker_reads_metrics_this_server_serves(live: Server) -> None:
    values = yaml.safe_load((ROOT / "helm" / "loraplex" / "values.yaml").read_text())
    names = values["inferencePool"]["endpointPicker"]["metrics"]
    fams = families(httpx.get(live.url + "/metrics", timeout=10).text)
    for key, name in names.items():
        assert name in fams and fams[name].type == "gauge", key


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[str]]]:
    """5,000 adapters on disk, loaded on demand by a server that names at most TOP of them in /metrics."""
    from tests.factories import tiny_served_model, write_raw_adapter

    top = tmp_path_factory.mktemp("many")
    model_dir = top / "model"
    tiny_served_model(model_dir)
    ids = [f"pool/a{i:04d}" for i in range(5000)]
    for i, adapter in enumerate(ids):
        write_raw_adapter(top / "adapters" / adapter, model_dir, rank=1, targets=("q_proj",), seed=i)
    server = start_server(
        top,
        model_dir,
        {},
        "--metrics-top-adapters",
        str(TOP),
        "--max-concurrent-requests",
        "256",
        shard_args=("--adapter-dirs", str(top / "adapters"), "--max-active-adapters", "8", "--max-cpu-adapters", "64"),
    )
    yield server, ids
    server.stop()


@pytest.mark.slow
def test_5000_adapters_requested_once_each_on_a_running_server(many: tuple[Server, list[str]]) -> None:
    server, ids = many

    async def run() -> None:
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(adapter: str) -> None:
                async with gate:
                    params = {"adapter_id": adapter, "max_new_tokens": 1}
                    r = await client.post(server.url + "/generate", json={"inputs": "hi", "parameters": params})
                assert r.status_code == 200, r.text

            await asyncio.gather(*(one(a) for a in ids))

    asyncio.run(run())
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert len(text.encode()) < 1_000_000
    fams = families(text)
    labels = {s.labels["adapter"] for f in fams.values() for s in f.samples if "adapter" in s.labels}
    assert len(labels - {"other"}) <= TOP and "other" in labels
    requests = fams["loraplex_adapter_requests"].samples
    assert sum(s.value for s in requests if s.name.endswith("_total")) == len(ids)  # ties never demote
    (lora,) = fams["vllm:lora_requests_info"].samples
    assert len(split(lora.labels["running_lora_adapters"])) <= 8 + 64  # what the tiers hold
