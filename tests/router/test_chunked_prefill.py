"""Chunked prefill in the scheduler: decodes never wait for more than one chunk of anyone's prompt, and
chunked outputs equal whole-prompt outputs, under preemption too (against the bookkeeping shard)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from loraplex.router.events import EndEvent, TokenEvent
from loraplex.router.kv_budget import KvBudget
from loraplex.router.metrics import Metrics
from loraplex.router.scheduler import Scheduler
from loraplex.router.settings import RouterSettings
from tests.router.test_preemption import TOKENIZER, BookkeepingShard, _request, _serve, solo

LONG = RouterSettings(
    max_input_tokens=400, max_total_tokens=480, max_batch_prefill_tokens=512, max_batch_total_tokens=1 << 16
)


def test_a_long_prompt_arriving_while_32_sequences_decode_stalls_no_step_by_more_than_one_chunk() -> None:
    settings = dataclasses.replace(LONG, prefill_chunk_tokens=16)
    shard = BookkeepingShard(16, 4096)

    async def run() -> tuple[list[list[int]], list[EndEvent]]:
        # 32 short requests decode; the long prompt is submitted once they all run (it is the last job).
        jobs = [([i + 1, i + 2], 40) for i in range(32)] + [([7] * 300, 4)]
        _, streamed, ends = await _serve(shard, KvBudget(16, 4096), jobs, settings)
        return streamed, [e for e in ends if isinstance(e, EndEvent)]

    streamed, ends = asyncio.run(run())
    jobs = [([i + 1, i + 2], 40) for i in range(32)] + [([7] * 300, 4)]
    assert streamed == [solo(p, n) for p, n in jobs] and len(ends) == 33
    with_decodes = [(d, p) for d, p in shard.steps if d]
    assert max(p for _, p in with_decodes) <= 16  # no decode step carried more than one chunk of prompt
    long_prompt_steps = [(d, p) for d, p in shard.steps if p and d >= 30]
    assert len(long_prompt_steps) >= 300 // 16  # the long prompt ran beside the decodes, chunk by chunk
    assert all(d >= 30 for d, _ in long_prompt_steps)


@pytest.mark.parametrize("chunk", [0, 1, 5, 64])
def test_chunked_outputs_equal_whole_prompt_outputs_under_preemption(chunk: int) -> None:
    """A small cache forces preemptions, partially prefilled victims included; every output is the solo one."""
    settings = dataclasses.replace(LONG, max_input_tokens=40, max_total_tokens=60, prefill_chunk_tokens=chunk)
    shard = BookkeepingShard(4, 24)
    jobs = [([i % 7 + 1] * (6 + 2 * i), 20) for i in range(8)]
    requests, streamed, ends = asyncio.run(_serve(shard, KvBudget(4, 24), jobs, settings))
    assert all(isinstance(e, EndEvent) for e in ends), ends
    assert streamed == [solo(p, n) for p, n in jobs]
    if chunk != 1:  # one token a step admits too slowly to fill the cache
        assert sum(r.preemptions for r in requests) >= 1
    assert shard.refusals == 0 and shard.free == 24 and not shard.batches
    if chunk:
        assert max(p for _, p in shard.steps) <= chunk


def test_no_chunking_keeps_separate_prefill_and_decode_passes() -> None:
    settings = dataclasses.replace(LONG, prefill_chunk_tokens=0)
    shard = BookkeepingShard(16, 4096)
    jobs = [([3] * 100, 5), ([4] * 200, 5)]
    _, streamed, _ = asyncio.run(_serve(shard, KvBudget(16, 4096), jobs, settings))
    assert streamed == [solo(p, n) for p, n in jobs]
    assert any(p >= 100 for _, p in shard.steps)  # whole prompts in one pass


def test_a_client_gone_in_the_middle_of_its_prompt_frees_its_blocks_and_the_others_go_on() -> None:
    """Cancelled while its prompt runs chunk by chunk: it leaves the shard's batch, nothing else is disturbed."""
    settings = dataclasses.replace(LONG, prefill_chunk_tokens=8)

    class Yielding(BookkeepingShard):  # a step takes time, as a real one does: the client can act meanwhile
        async def decode(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.001)
            return await super().decode(*args, **kwargs)

    shard = Yielding(4, 4096)
    jobs = [([3, 4], 20), ([6] * 200, 5), ([8, 9], 20)]

    async def run() -> tuple[list[list[int]], bool]:
        scheduler = Scheduler(shard, TOKENIZER, settings, set(), Metrics(), kv=KvBudget(4, 4096))  # type: ignore[arg-type]
        loop = asyncio.ensure_future(scheduler.run())
        requests = [_request(p, n, settings) for p, n in jobs]
        for r in requests:
            scheduler.submit(r)
        for _ in range(5000):
            if shard.ran.get(requests[1].id, 0) >= 40:  # a few chunks of the long prompt have run
                break
            await asyncio.sleep(0.001)
        assert 40 <= shard.ran[requests[1].id] < 200  # cancelled in the middle of its prompt
        scheduler.cancel(requests[1])
        out = []
        for r in (requests[0], requests[2]):
            ids = []
            while not isinstance(event := await asyncio.wait_for(r.events.get(), 10), EndEvent):
                if isinstance(event, TokenEvent):
                    ids.append(event.token.id)
            out.append(ids)
        await asyncio.sleep(0.05)
        loop.cancel()
        return out, requests[1].released and not requests[1].generated

    answers, released = asyncio.run(run())
    assert answers == [solo(jobs[0][0], 20), solo(jobs[2][0], 20)]
    assert released and shard.free == 4096 and not shard.batches
