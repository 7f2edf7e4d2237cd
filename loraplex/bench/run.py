"""One benchmark run: a workload against a server, then the same requests through the chosen baselines."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.bench import baselines
from loraplex.bench.clients import Client, GrpcClient, HttpClient, RequestResult, scrape_metrics
from loraplex.bench.driver import LoadShape, run_load, screen_prompts
from loraplex.bench.stats import Summary, summarize
from loraplex.bench.workload import BenchRequest, Prompt, PromptMaker


@dataclass
class Target:
    """Where the load goes: the HTTP URL (always, for /metrics) and, for gRPC, the public gRPC address."""

    url: str
    grpc: str = ""
    api_key: str = ""

    def client(self) -> Client:
        return GrpcClient(self.grpc, self.api_key) if self.grpc else HttpClient(self.url, self.api_key)


@dataclass
class ServerPass:
    summary: Summary
    results: list[RequestResult]
    metrics: dict[str, float] = field(default_factory=dict)  # /metrics after minus before


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters and histogram parts that moved during the pass."""
    keys = [k for k in after if k.endswith(("_total", "_count", "_sum")) or "_total{" in k]
    return {k: after[k] - before.get(k, 0.0) for k in keys if after[k] != before.get(k, 0.0)}


async def _with_client(target: Target, coro_fn: Any) -> Any:
    client = target.client()
    try:
        return await coro_fn(client)
    finally:
        await client.close()


def serve(
    target: Target,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    system: str,
    workload: str,
    progress: bool = True,
) -> ServerPass:
    """Send ``requests`` to the server; the summary counts the tokens each stream really carried."""
    before = scrape_metrics(target.url)
    results, started, ended = asyncio.run(
        _with_client(target, lambda c: run_load(c, list(requests), shape, progress, f"{system} {workload}"))
    )
    after = scrape_metrics(target.url)
    new = max((r.max_new_tokens for r in requests), default=0)
    return ServerPass(summarize(system, workload, results, started, ended, new), results, metrics_delta(before, after))


def screened_prompts(
    target: Target, maker: PromptMaker, count: int, prompt_tokens: int, max_new_tokens: int, progress: bool = True
) -> list[Prompt]:
    """``count`` prompts that run their full length on the base model (also warms the server up)."""
    return list(
        asyncio.run(
            _with_client(
                target,
                lambda c: screen_prompts(
                    c, lambda seed: maker.prompt(prompt_tokens, seed), count, max_new_tokens, progress=progress
                ),
            )
        )
    )


def warm_adapters(target: Target, adapters: Sequence[str], prompt: Prompt, progress: bool = True) -> None:
    """One one-token request per adapter, so that loads from disk are not part of the measured pass."""
    requests = [BenchRequest(i, prompt, a, 1) for i, a in enumerate(adapters)]
    results, _, _ = asyncio.run(
        _with_client(target, lambda c: run_load(c, requests, LoadShape(concurrency=64), progress, "adapter warm-up"))
    )
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"adapter warm-up failed: {failed[0]}")


def run_baselines(
    names: Sequence[str],
    model_dir: Path,
    dtype: str,
    adapter_root: Path | None,
    requests: Sequence[BenchRequest],
    batch_size: int,
    workload: str,
    base_requests: Sequence[BenchRequest] | None = None,
    sequential_limit: int = 0,
) -> list[Summary]:
    """The chosen baselines, in process, on ``requests`` (transformers: on ``base_requests``, default the same
    requests without their adapters). Each baseline produces exactly ``max_new_tokens`` per request.

    ``sequential_limit`` > 0 runs peft one request at a time on only that many requests: each request runs
    alone, so its tokens/s over the first k requests is its tokens/s over all of them, at a k-th of the time.
    """
    out: list[Summary] = []
    new = max(r.max_new_tokens for r in requests)
    base = (
        list(base_requests)
        if base_requests is not None
        else [BenchRequest(r.index, r.prompt, None, r.max_new_tokens) for r in requests]
    )
    if "transformers" in names:
        model = baselines.load_model(model_dir, dtype)
        res, t0, t1 = baselines.run_transformers(model, base, batch_size)
        out.append(summarize("transformers", "base", res, t0, t1, new))
        del model
    peft_wanted = [n for n in ("peft-sequential", "peft-mixed") if n in names]
    if peft_wanted:
        adapter_ids = peft_ids = baselines.peft_names([r.adapter for r in requests])
        if adapter_ids and adapter_root is None:
            raise ValueError("the peft baselines need --adapter-root to find the adapters' files")
        model = baselines.wrap_peft(baselines.load_model(model_dir, dtype), adapter_root or Path("."), peft_ids)
        if "peft-sequential" in names:
            sample = requests[:sequential_limit] if sequential_limit > 0 else requests
            res, t0, t1 = baselines.run_peft_sequential(model, peft_ids, sample)
            out.append(summarize("peft-sequential", workload, res, t0, t1, new))
        if "peft-mixed" in names:
            res, t0, t1 = baselines.run_peft_mixed(model, peft_ids, requests, batch_size)
            out.append(summarize("peft-mixed", workload, res, t0, t1, new))
    return out
