"""Three replicas behind a client that routes round-robin, then by LoRA affinity read from their own /metrics.

Run: ``.venv/bin/python benchmarks/fleet.py [--requests 1000] [--adapters 200] [--json out.json]``

A measurement tool, not a product feature (in a cluster the Gateway API Inference Extension's Endpoint Picker
routes; docs/deploy.md). Three ``loraplex-launcher`` replicas serve a tiny random Llama, each with
``--max-active-adapters 8`` and ``--max-cpu-adapters 40`` (memory for 48 of the 200 adapters per replica),
loading adapters on demand from one directory. One Zipf trace is sent twice, each time to freshly started
replicas, by ``--concurrency`` clients in a closed loop:

- round-robin: request i goes to replica i mod 3, as a plain Service spreads connections;
- affinity: a picker that scrapes each replica's /metrics every 50 ms (the Endpoint Picker's refresh) and
  chooses as its LoRA-affinity filter does: among replicas with a short queue, those listing the adapter
  in ``running_lora_adapters`` or ``waiting_lora_adapters``; failing that those with room for one more
  adapter (running + waiting < max_lora); failing that all; then the shortest queue, the least KV use, and
  a random one among equals.

Reported per policy: adapter loads from disk per request (``loraplex_adapter_loads_total`` summed over the
replicas), and p50/p99 of the requests' latency as the client sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.bench.adapters import write_adapter
from loraplex.bench.server import LaunchedServer
from loraplex.shard.config import ModelConfig
from tests.factories import tiny_served_model

REPLICAS = 3
LOW_QUEUE = 128  # the Endpoint Picker's queueing threshold below which LoRA affinity decides
AFFINITY_PROBABILITY = 0.999  # how often it prefers a replica holding the adapter over one with room
REFRESH_S = 0.05  # the Endpoint Picker's metrics refresh interval


@dataclass
class Replica:
    """What the picker knows of one replica: its last /metrics scrape."""

    url: str
    queue: float = 0.0
    kv: float = 0.0
    max_lora: int = 0
    running: set[str] = field(default_factory=set)
    waiting: set[str] = field(default_factory=set)

    def update(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            if family.name == "vllm:num_requests_waiting":
                self.queue = family.samples[0].value
            elif family.name == "vllm:kv_cache_usage_perc":
                self.kv = family.samples[0].value
            elif family.name == "vllm:lora_requests_info" and family.samples:
                labels = max(family.samples, key=lambda s: s.value).labels  # the newest reading
                self.max_lora = int(labels["max_lora"])
                self.running = set(filter(None, labels["running_lora_adapters"].split(",")))
                self.waiting = set(filter(None, labels["waiting_lora_adapters"].split(",")))


def pick_by_affinity(replicas: Sequence[Replica], adapter: str, rng: random.Random) -> Replica:
    """The Endpoint Picker's low-latency path: low queue → LoRA affinity → least queue → least KV → random."""
    candidates = [r for r in replicas if r.queue <= LOW_QUEUE] or list(replicas)
    holding = [r for r in candidates if adapter in r.running or adapter in r.waiting]
    room = [r for r in candidates if adapter not in r.running | r.waiting and len(r.running | r.waiting) < r.max_lora]
    if holding and room:
        candidates = holding if rng.random() < AFFINITY_PROBABILITY else room
    else:
        candidates = holding or room or candidates
    least = min(r.queue for r in candidates)
    candidates = [r for r in candidates if r.queue == least]
    least_kv = min(r.kv for r in candidates)
    return rng.choice([r for r in candidates if r.kv == least_kv])


def zipf_trace(requests: int, adapters: int, exponent: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** exponent for k in range(adapters)]
    return rng.choices(range(adapters), weights=weights, k=requests)


async def _scrape_loop(client: httpx.AsyncClient, replicas: Sequence[Replica], stop: asyncio.Event) -> None:
    while not stop.is_set():
        texts = await asyncio.gather(*(client.get(r.url + "/metrics") for r in replicas), return_exceptions=True)
        for replica, resp in zip(replicas, texts, strict=True):
            if isinstance(resp, httpx.Response) and resp.status_code == 200:
                replica.update(resp.text)
        await asyncio.sleep(REFRESH_S)


def _loads(urls: Sequence[str]) -> float:
    total = 0.0
    for url in urls:
        for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
            if family.name == "loraplex_adapter_loads":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def _send(
    urls: Sequence[str], trace: Sequence[int], concurrency: int, tokens: int, choose: Callable[[int, str], str]
) -> tuple[list[float], int]:
    """Each request of ``trace`` to the replica ``choose(i, adapter)`` names; latencies and failures."""
    latencies: list[float] = []
    failures = 0
    jobs = iter(enumerate(trace))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency * 2)) as client:

        async def worker() -> None:
            nonlocal failures
            for i, k in jobs:
                adapter = f"pool/a{k:03d}"
                url = choose(i, adapter)
                body = {"model": adapter, "prompt": f"request {i}: tell me", "max_tokens": tokens, "ignore_eos": True}
                started = time.perf_counter()
                resp = await client.post(url + "/v1/completions", json=body)
                latencies.append(time.perf_counter() - started)
                failures += resp.status_code != 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures


async def _run_policy(
    policy: str, urls: Sequence[str], trace: Sequence[int], args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    replicas = [Replica(u) for u in urls]
    stop = asyncio.Event()
    sent = dict.fromkeys(urls, 0)
    async with httpx.AsyncClient(timeout=30) as scraper:
        # Scraped under both policies, so that both pay the replicas' /metrics rendering on these shared CPUs.
        scraping = asyncio.ensure_future(_scrape_loop(scraper, replicas, stop))
        await asyncio.sleep(3 * REFRESH_S)  # a first reading of every replica

        def choose(i: int, adapter: str) -> str:
            url = urls[i % len(urls)] if policy == "round-robin" else pick_by_affinity(replicas, adapter, rng).url
            sent[url] += 1
            return url

        started = time.perf_counter()
        latencies, failures = await _send(urls, trace, args.concurrency, args.tokens, choose)
        wall = time.perf_counter() - started
        stop.set()
        await scraping
    loads = _loads(urls)
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "policy": policy,
        "requests": len(trace),
        "failures": failures,
        "adapter_loads": loads,
        "loads_per_request": loads / len(trace),
        "p50_s": statistics.median(latencies),
        "p99_s": cuts[98],
        "wall_s": wall,
        "requests_per_replica": list(sent.values()),
    }


def _replica_args(model_dir: Path, root: Path, args: argparse.Namespace) -> list[str]:
    return [
        "--model-id", str(model_dir), "--adapter-dirs", str(root), "--device", "cpu", "--dtype", "float32",
        "--max-active-adapters", "8", "--max-cpu-adapters", str(args.max_cpu_adapters),
        "--max-concurrent-requests", str(4 * args.concurrency), "--max-batch-total-tokens", "16384",
        "--max-input-tokens", "64", "--max-total-tokens", "128",
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--exponent", type=float, default=1.0, help="the Zipf trace's exponent")
    p.add_argument("--concurrency", type=int, default=12, help="clients in the closed loop, over all replicas")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--max-cpu-adapters", type=int, default=40, help="each replica's host-memory adapter slots")
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or REPLICAS) // REPLICAS),
        help="torch threads per replica (OMP_NUM_THREADS): the replicas share this machine's cores",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by each launcher's shard
    trace = zipf_trace(args.requests, args.adapters, args.exponent, args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="loraplex-fleet-") as tmp:
        top = Path(tmp)
        model_dir = top / "model"
        tiny_served_model(model_dir)
        config = ModelConfig.from_dir(model_dir)
        for k in range(args.adapters):
            write_adapter(top / "adapters" / "pool" / f"a{k:03d}", config, 8, ("q_proj", "v_proj"), seed=k)
        for policy in ("round-robin", "affinity"):
            # Fresh replicas for each policy, so that both start with nothing loaded; started side by side.
            servers = [
                LaunchedServer(_replica_args(model_dir, top / "adapters", args), top / f"{policy}-{i}.log")
                for i in range(REPLICAS)
            ]
            with ExitStack() as stack, ThreadPoolExecutor(REPLICAS) as starting:
                for server in servers:
                    stack.callback(server.stop)
                list(starting.map(LaunchedServer.__enter__, servers))
                result = asyncio.run(_run_policy(policy, [s.url for s in servers], trace, args))
            results.append(result)
            print(json.dumps(result), flush=True)
    rr, aff = results
    summary = {
        "config": {**vars(args), "json": None, "replicas": REPLICAS, "distinct_adapters": len(set(trace))},
        "results": results,
        "loads_ratio": aff["loads_per_request"] / rr["loads_per_request"] if rr["loads_per_request"] else None,
        "p99_ratio": aff["p99_s"] / rr["p99_s"],
        "p50_ratio": aff["p50_s"] / rr["p50_s"],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, default=str))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
