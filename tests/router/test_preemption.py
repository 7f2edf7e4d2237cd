"""The scheduler against a bookkeeping shard: block admission, newest-first preemption, recomputation that
continues exactly, and a shard that says "full" against the router's count (RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace

import grpc
import pytest

from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.router.events import EndEvent, ErrorEvent, TokenEvent
from loraplex.router.inflight import InFlightRequest
from loraplex.router.kv_budget import KvBudget
from loraplex.router.metrics import Metrics
from loraplex.router.scheduler import Scheduler
from loraplex.router.settings import RouterSettings
from loraplex.router.validation import validate_parameters

SETTINGS = RouterSettings(max_input_tokens=24, max_total_tokens=40, max_batch_total_tokens=4096)


def next_token(tokens: Sequence[int]) -> int:
    """The fake model: the next token depends on the whole sequence, as a real one's does."""
    return sum(t * (i + 1) for i, t in enumerate(tokens)) % 97 + 1


def solo(prompt: list[int], max_new: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


def _exhausted(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class BookkeepingShard:
    """A shard's cached batches and KV blocks, allocated as ``shard/runner.py`` does (a sequence holds
    ceil(tokens run / block_size) blocks), refusing a whole step when blocks run out. Prompts may run in chunks
    (``prefill_chunk``, a step's ``chunks``): a request yields its first token in the step that ends its prompt."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.block_size, self.free = block_size, num_blocks
        self.batches: dict[int, list[int]] = {}
        self.seqs: dict[int, list[int]] = {}
        self.prompt: dict[int, int] = {}  # prompt length
        self.ran: dict[int, int] = {}  # tokens whose KV is cached
        self.held: dict[int, int] = {}
        self.refusals = 0
        self.preempted_prompts: dict[int, list[int]] = {}
        self.steps: list[tuple[int, int]] = []  # per forward pass: (decode rows, prompt tokens run)

    def _grow(self, runs: dict[int, int]) -> None:
        want = {r: -(-(self.ran[r] + n) // self.block_size) for r, n in runs.items()}
        if sum(want[r] - self.held[r] for r in runs) > self.free:
            self.refusals += 1
            raise _exhausted(f"need more KV blocks, {self.free} free")
        for r in runs:
            self.free -= want[r] - self.held[r]
            self.held[r] = want[r]

    def _step(self, runs: dict[int, int]) -> list[pb.Generation]:
        decodes = sum(1 for r in runs if self.ran[r] >= self.prompt[r])
        self.steps.append((decodes, sum(n for r, n in runs.items() if self.ran[r] < self.prompt[r])))
        out = []
        for r, n in runs.items():
            self.ran[r] += n
            if self.ran[r] == len(self.seqs[r]):  # its prompt is all run, or its newest token is
                token = next_token(self.seqs[r])
                self.seqs[r].append(token)
                out.append(pb.Generation(request_id=r, token=pb.Token(id=token)))
        return out

    def _free(self, r: int) -> None:
        self.free += self.held.pop(r)
        del self.seqs[r], self.prompt[r], self.ran[r]

    def _add(self, batch: pb.Batch) -> dict[int, int]:
        for r in batch.requests:
            self.seqs[r.id], self.held[r.id] = list(r.input_ids), 0
            self.prompt[r.id], self.ran[r.id] = len(r.input_ids), 0
            if r.generated_tokens:
                self.preempted_prompts[r.id] = list(r.input_ids)
        return {r.id: r.prefill_chunk or len(r.input_ids) for r in batch.requests}

    async def prefill(self, batch: pb.Batch) -> pb.PrefillResponse:
        runs = self._add(batch)
        try:
            self._grow(runs)
        except grpc.aio.AioRpcError:
            for r in runs:
                self._free(r)
            raise
        self.batches[batch.id] = list(runs)
        gens = self._step(runs)
        return pb.PrefillResponse(generations=gens, batch=pb.CachedBatch(id=batch.id, request_ids=list(runs)))

    async def decode(
        self, batches: Sequence[pb.CachedBatch], new_batch: pb.Batch | None = None, chunks: dict[int, int] | None = None
    ) -> pb.DecodeResponse:
        ids = [r for b in batches for r in self.batches[b.id]]
        runs = {r: 1 if self.ran[r] >= self.prompt[r] else (chunks or {}).get(r, 0) for r in ids}
        runs = {r: n for r, n in runs.items() if n}
        added = self._add(new_batch) if new_batch is not None and new_batch.requests else {}
        try:
            self._grow(runs | added)  # refused before anything changes, as the real engine does
        except grpc.aio.AioRpcError:
            for r in added:
                self._free(r)
            raise
        for b in batches[1:]:
            del self.batches[b.id]
        merged = ids + list(added)
        self.batches[batches[0].id] = merged
        gens = self._step(runs | added)
        return pb.DecodeResponse(generations=gens, batch=pb.CachedBatch(id=batches[0].id, request_ids=merged))

    async def filter(self, batch_id: int, keep: Sequence[int]) -> None:
        for r in self.batches[batch_id]:
            if r not in keep:
                self._free(r)
        self.batches[batch_id] = list(keep)

    async def clear(self, batch_id: int | None = None) -> None:
        for b in list(self.batches) if batch_id is None else [batch_id]:
            for r in self.batches.pop(b, []):
                self._free(r)


TOKENIZER = SimpleNamespace(
    decode=lambda ids: " ".join(map(str, ids)), special_ids=set(), token_text=lambda token_id: str(token_id)
)


def _request(prompt: list[int], max_new: int, settings: RouterSettings = SETTINGS) -> InFlightRequest:
    return InFlightRequest(prompt, validate_parameters({"max_new_tokens": max_new}, settings), max_new)


async def _serve(
    shard: BookkeepingShard, kv: KvBudget, jobs: list[tuple[list[int], int]], settings: RouterSettings = SETTINGS
) -> tuple[list[InFlightRequest], list[list[int]], list[EndEvent | ErrorEvent]]:
    scheduler = Scheduler(shard, TOKENIZER, settings, set(), Metrics(), kv=kv)  # type: ignore[arg-type]
    loop = asyncio.ensure_future(scheduler.run())
    requests = [_request(p, n, settings) for p, n in jobs]
    for r in requests:
        scheduler.submit(r)
    streamed: list[list[int]] = []
    ends: list[EndEvent | ErrorEvent] = []
    for r in requests:
        ids: list[int] = []
        while True:
            event = await asyncio.wait_for(r.events.get(), 10)
            if isinstance(event, TokenEvent):
                ids.append(event.token.id)
                assert event.index == len(ids)  # every index once, in order: nothing sent twice
            if isinstance(event, EndEvent | ErrorEvent):
                ends.append(event)
                break
        streamed.append(ids)
    loop.cancel()
    return requests, streamed, ends


def test_the_three_requests_of_the_bug_all_finish_with_their_solo_tokens() -> None:
    # --max-batch-total-tokens 64, block size 16: 4 blocks. Three 5 + 14 token requests need 2 blocks each.
    shard = BookkeepingShard(16, 4)
    jobs = [([3, 1, 4, 1, 5], 14), ([2, 7, 1, 8, 2], 14), ([1, 6, 1, 8, 0], 14)]
    requests, streamed, ends = asyncio.run(_serve(shard, KvBudget(16, 4), jobs))
    assert all(isinstance(e, EndEvent) and e.finish_reason == "length" for e in ends)
    assert streamed == [solo(p, n) for p, n in jobs]
    assert [[t.id for t in e.tokens] for e in ends if isinstance(e, EndEvent)] == streamed
    assert requests[0].preemptions == 0 and sum(r.preemptions for r in requests) >= 1
    assert shard.refusals == 0  # the router's count is exact: it preempts before the shard would refuse
    assert shard.free == 4 and not shard.batches


def test_a_preempted_request_is_recomputed_from_its_prompt_and_generated_tokens() -> None:
    shard = BookkeepingShard(4, 6)
    jobs = [([5, 5, 5], 17), ([9, 9, 9], 17)]  # 20 tokens: 5 blocks each, 6 in all
    requests, streamed, _ = asyncio.run(_serve(shard, KvBudget(4, 6), jobs))
    assert streamed == [solo(p, n) for p, n in jobs]
    assert requests[0].preemptions == 0 and requests[1].preemptions >= 1  # the newest gave its blocks back
    prompt = shard.preempted_prompts[requests[1].id]
    assert prompt[:3] == [9, 9, 9] and prompt[3:] == streamed[1][: len(prompt) - 3]


@pytest.mark.parametrize("hidden", [3, 5])
def test_a_shard_refusing_against_the_routers_count_preempts_rather_than_fails(hidden: int) -> None:
    """The router believes 8 blocks, the shard has fewer (another rank's cache, a future optimistic count)."""
    shard = BookkeepingShard(4, hidden)
    jobs = [([i + 1] * (2 + i % 3), 9 - i % 3) for i in range(8)]  # 11 tokens: 3 blocks, each fits alone
    requests, streamed, ends = asyncio.run(_serve(shard, KvBudget(4, 8), jobs))
    assert shard.refusals >= 1
    assert all(isinstance(e, EndEvent) for e in ends), ends
    assert streamed == [solo(p, n) for p, n in jobs]
    assert requests[0].preemptions == 0
    assert shard.free == hidden


def test_a_lone_request_the_shard_cannot_hold_fails_alone_and_frees_its_blocks() -> None:
    """Nothing to preempt: the request the shard refuses to grow gets an error, not a retry forever."""
    shard = BookkeepingShard(4, 2)  # the router believes 8 blocks; 11 tokens need 3
    _, streamed, ends = asyncio.run(_serve(shard, KvBudget(4, 8), [([1, 2], 9)]))
    assert shard.refusals == 1
    assert isinstance(ends[0], ErrorEvent) and "cannot hold this request" in ends[0].message
    assert streamed == [solo([1, 2], 9)[:7]]  # 2 blocks hold 8 tokens: the step that writes the 9th is refused
    assert shard.free == 2 and not shard.batches


def test_a_request_the_shard_message_cannot_hold_fails_alone_in_its_batch() -> None:
    """A field past its wire type (validation refuses it; this is the scheduler's own guard) fails that request
    only: the rest of its prefill batch is served."""

    async def run() -> tuple[EndEvent | ErrorEvent, EndEvent | ErrorEvent, list[int]]:
        shard = BookkeepingShard(4, 8)
        scheduler = Scheduler(shard, TOKENIZER, SETTINGS, set(), Metrics(), kv=KvBudget(4, 8))  # type: ignore[arg-type]
        bad, good = _request([1, 2], 3), _request([3, 4], 3)
        bad.params = dataclasses.replace(bad.params, top_k=2**40)  # uint32 on the wire
        for r in (bad, good):
            scheduler.submit(r)
        loop = asyncio.ensure_future(scheduler.run())
        events = [[await asyncio.wait_for(r.events.get(), 10) for _ in range(n)] for r, n in ((bad, 1), (good, 3))]
        end = await asyncio.wait_for(good.events.get(), 10)
        loop.cancel()
        assert shard.free == 8
        return events[0][0], end, [e.token.id for e in events[1] if isinstance(e, TokenEvent)]

    refused, end, tokens = asyncio.run(run())
    assert isinstance(refused, ErrorEvent) and "cannot be sent to the shards" in refused.message
    assert isinstance(end, EndEvent) and tokens == solo([3, 4], 3)


def test_admission_is_in_blocks_and_lets_a_long_preempted_prompt_in_alone() -> None:
    settings = RouterSettings(max_batch_prefill_tokens=8, max_input_tokens=8, max_total_tokens=40)
    scheduler = Scheduler(None, TOKENIZER, settings, set(), Metrics(), kv=KvBudget(8, 5))  # type: ignore[arg-type]
    preempted = _request([1] * 8, 30)
    preempted.generated = [2] * 12  # 20 tokens now: over the prefill budget, but alone in its batch
    scheduler.waiting.extend([preempted, _request([3] * 7, 4), _request([4] * 8, 4)])
    assert list(scheduler._admit()) == [preempted]  # 3 blocks; the next prompt would pass the prefill budget
    scheduler.running[preempted.id] = preempted
    batch = list(scheduler._admit())
    assert [len(e.input_ids) for e in batch] == [7]  # 3 + 1 blocks; 8 + 1 tokens would need 2 more
