"""The load loop: closed-loop concurrency or open-loop Poisson arrivals, for a count or a duration."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from loraplex.bench.clients import Client, RequestResult
from loraplex.bench.workload import BenchRequest, Prompt


@dataclass(frozen=True)
class LoadShape:
    """``concurrency`` requests in flight (closed loop), or Poisson arrivals at ``rate`` req/s when rate > 0.

    ``duration`` > 0 keeps issuing requests (cycling through the workload) until that many seconds have passed;
    otherwise each request of the workload is sent once.
    """

    concurrency: int = 64
    rate: float = 0.0
    duration: float = 0.0
    seed: int = 0


async def run_load(
    client: Client,
    requests: list[BenchRequest],
    shape: LoadShape,
    progress: bool = True,
    label: str = "loraplex",
) -> tuple[list[RequestResult], float, float]:
    """Send the workload; returns the results (in completion order), the start and the end time."""
    results: list[RequestResult] = []
    total = None if shape.duration > 0 else len(requests)
    bar = tqdm(total=total, desc=label, unit="req", disable=not progress, file=sys.stderr, leave=False)
    started = time.perf_counter()
    deadline = started + shape.duration if shape.duration > 0 else None
    sem = asyncio.Semaphore(shape.concurrency if shape.rate <= 0 and shape.concurrency > 0 else 1 << 30)
    rng = random.Random(shape.seed)

    async def one(request: BenchRequest) -> None:
        try:
            results.append(await client.stream(request))
        finally:
            sem.release()
            bar.update(1)

    tasks: list[asyncio.Task[None]] = []
    i = 0
    next_arrival = started
    while True:
        if deadline is None and i >= len(requests):
            break
        if deadline is not None and time.perf_counter() >= deadline:
            break
        if shape.rate > 0:
            next_arrival += rng.expovariate(shape.rate)
            delay = next_arrival - time.perf_counter()
            if deadline is not None and next_arrival >= deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
        await sem.acquire()
        if deadline is not None and time.perf_counter() >= deadline:
            sem.release()
            break
        base = requests[i % len(requests)]
        tasks.append(asyncio.create_task(one(BenchRequest(i, base.prompt, base.adapter, base.max_new_tokens))))
        i += 1
    await asyncio.gather(*tasks)
    ended = time.perf_counter()
    bar.close()
    return results, started, ended


async def screen_prompts(
    client: Client,
    make_prompt: Callable[[int], Prompt],
    count: int,
    max_new_tokens: int,
    concurrency: int = 64,
    rounds: int = 4,
    progress: bool = True,
) -> list[Prompt]:
    """``count`` prompts whose greedy base-model continuation runs the full ``max_new_tokens`` on this server.

    There is no ignore-EOS parameter, so a prompt whose continuation ends early is replaced by the next seed.
    This pass doubles as the server's warm-up.
    """
    seeds = list(range(count))
    next_seed = count
    prompts = {s: make_prompt(s) for s in seeds}
    pending = list(range(count))
    for round_ in range(rounds):
        batch = [BenchRequest(slot, prompts[seeds[slot]], None, max_new_tokens) for slot in pending]
        results, _, _ = await run_load(client, batch, LoadShape(concurrency=concurrency), progress, "screening")
        pending = []
        for r in results:
            if r.error:
                raise RuntimeError(f"screening request failed: {r.error}")
            if r.tokens < max_new_tokens:
                pending.append(r.index)
        if not pending or round_ == rounds - 1:
            break  # prompts still short after the last round are kept (and counted as short by the summary)
        for slot in pending:
            seeds[slot] = next_seed
            prompts[next_seed] = make_prompt(next_seed)
            next_seed += 1
    return [prompts[s] for s in seeds]
