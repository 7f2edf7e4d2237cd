"""The router's estimate of the shards' prefix cache: what it counts, and that a wrong estimate costs time only."""

from __future__ import annotations

import asyncio
import dataclasses

from loraplex.router.events import EndEvent, TokenEvent
from loraplex.router.kv_budget import KvBudget
from loraplex.router.metrics import Metrics
from loraplex.router.prefix_estimate import PrefixEstimate
from loraplex.router.scheduler import Scheduler
from tests.router.test_chunked_prefill import LONG
from tests.router.test_preemption import TOKENIZER, BookkeepingShard, _request, solo


def test_full_blocks_of_the_same_adapter_and_prefix_only() -> None:
    est = PrefixEstimate(4, 100)
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks
    hashes = est.hashes("a", prompt)
    assert len(hashes) == 3 and est.cached(hashes, 14) == 0
    est.record(hashes, 10)  # two blocks' KV computed
    assert est.cached(hashes, 14) == 8
    est.record(hashes, 14)
    assert est.cached(hashes, 14) == 12
    assert est.cached(hashes, 12) == 8  # the last token is always computed: its block is never counted
    assert est.cached(est.hashes("b", prompt), 14) == 0  # another adapter's blocks are not this one's
    assert est.cached(est.hashes("", prompt), 14) == 0
    assert est.cached(est.hashes("a", [9, *prompt[1:]]), 14) == 0  # a chain: the first block differs
    longer = est.hashes("a", [*prompt, *([7] * 10)])
    assert longer[:3] == hashes and est.cached(longer, 24) == 12


def test_the_estimate_forgets_least_recently_used_blocks_past_its_capacity() -> None:
    est = PrefixEstimate(2, 3)
    first, second = est.hashes("", [1, 2, 3, 4, 5]), est.hashes("", [6, 7, 8, 9, 10])
    est.record(first, 4)
    est.record(second, 4)  # 4 blocks in a cache of 3: the oldest block goes
    assert est.cached(first, 5) == 0 and est.cached(second, 5) == 4


def test_an_estimate_the_shard_does_not_bear_out_still_runs_every_prompt_to_its_end() -> None:
    """The bookkeeping shard caches nothing while the estimate expects 40 of every 44-token prompt cached:
    the router keeps sending chunks until each first token comes, and every answer is its solo answer."""
    settings = dataclasses.replace(LONG, prefill_chunk_tokens=8)
    shard = BookkeepingShard(4, 4096)
    system = [5] * 40
    jobs = [([*system, i + 1, i + 2, i + 3, i + 4], 6) for i in range(6)]

    async def run() -> list[list[int]]:
        est = PrefixEstimate(4, 1024)
        est.record(est.hashes("", [*system, 0]), 40)
        kv = KvBudget(4, 4096)
        scheduler = Scheduler(shard, TOKENIZER, settings, set(), Metrics(), kv=kv, prefix=est)  # type: ignore[arg-type]
        loop = asyncio.ensure_future(scheduler.run())
        requests = [_request(p, n, settings) for p, n in jobs]
        for r in requests:
            scheduler.submit(r)
        out = []
        for r in requests:
            ids = []
            while True:
                event = await asyncio.wait_for(r.events.get(), 10)
                if isinstance(event, TokenEvent):
                    ids.append(event.token.id)
                if isinstance(event, EndEvent):
                    break
            out.append(ids)
        loop.cancel()
        return out

    assert asyncio.run(run()) == [solo(p, n) for p, n in jobs]
    assert max(p for _, p in shard.steps) <= 8 and not shard.batches
