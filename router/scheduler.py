"""The continuous-batching loop: admits waiting requests under token budgets, drives prefill and decode."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import grpc

from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.router import admission, shard_requests
from loraplex.router.events import EndEvent, ErrorEvent, Event
from loraplex.router.inflight import InFlightRequest, Overloaded
from loraplex.router.kv_budget import KvBudget
from loraplex.router.metrics import Metrics
from loraplex.router.prefix_estimate import PrefixEstimate
from loraplex.router.settings import RouterSettings
from loraplex.router.shards import ShardClients
from loraplex.router.tokenizer import TextTokenizer

log = logging.getLogger("loraplex.router")


RECOVERY_INTERVAL_S = 2.0  # how often an idle, unhealthy router asks the shards again


class Scheduler:
    """Owns the queue and the running batch; the shards hold the KV state, addressed by batch ids."""

    def __init__(
        self,
        shards: ShardClients,
        tokenizer: TextTokenizer,
        settings: RouterSettings,
        eos_ids: set[int],
        metrics: Metrics,
        *,
        adapter_slots: int = 0,
        kv: KvBudget | None = None,
        on_release: Callable[[InFlightRequest], None] | None = None,
        on_recovered: Callable[[], Awaitable[None]] | None = None,
        prefix: PrefixEstimate | None = None,
    ) -> None:
        """``adapter_slots`` is the shards' --max-active-adapters (0: no limit); ``kv`` the KV blocks they
        reported (None: --max-batch-total-tokens in one-token blocks). ``on_release(request)``
        runs exactly once per submitted request, once it holds nothing on the shards any more (its adapter may
        be unloaded then); ``on_recovered()`` once the shards answer again after a failure (they may have restarted)."""
        self.shards = shards
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_ids = eos_ids
        self.metrics = metrics
        self.waiting: deque[InFlightRequest] = deque()
        self.running: dict[int, InFlightRequest] = {}
        self.members: dict[int, list[int]] = {}  # cached batch id -> request ids
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self.healthy = True
        self.adapter_slots = adapter_slots or 1 << 30
        self.kv = kv or KvBudget(1, settings.max_batch_total_tokens)
        self._kv_hold = False  # the shards said "full" against our count: one at a time until a request leaves
        self.on_release = on_release
        self._on_recovered = on_recovered
        self.prefix = prefix  # the shards' prefix cache as the budgets expect it (None: caching off)
        self.longest_wait = 0.0

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    def submit(self, request: InFlightRequest) -> None:
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise Overloaded("Model is overloaded")
        request.id = next(self._ids)
        self.waiting.append(request)
        self.metrics.queue_size.set(len(self.waiting))
        self.metrics.input_tokens.inc(len(request.input_ids))
        self._wake.set()

    def cancel(self, request: InFlightRequest) -> None:
        """The client went away: the request leaves the batch at the next step and its KV blocks are freed."""
        if not request.finished:
            request.cancelled = True
            self._wake.set()

    async def run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                if self.healthy:
                    await self._wake.wait()
                else:  # retry the clean-up now and then: a restarted shard is taken back without a router restart
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), RECOVERY_INTERVAL_S)
            if not self.healthy and not self.running and not await self._recover():
                for e in self.waiting:
                    if not e.finished:
                        self._finish(e, ErrorEvent("generation failed: the shards are not answering"))
                self.waiting.clear()
                continue
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a shard failed: everyone in flight gets an error, nobody hangs
                log.exception("batch step failed")
                if isinstance(exc, grpc.aio.AioRpcError):
                    reason = f"a shard failed ({exc.code().name})"
                else:  # its kind only: an exception's text may hold local paths (the log above has it all)
                    reason = f"internal error ({type(exc).__name__})"
                await self._fail_all(f"generation failed: {reason}")

    async def _step(self) -> None:
        while self.waiting and self.waiting[0].cancelled:
            self._finish(self.waiting.popleft(), None)
        chunk = min(self.settings.prefill_chunk_tokens, self.settings.max_batch_prefill_tokens)
        if chunk:
            await self._chunked_step(chunk)
        else:  # TGI's schedule: whole prompts in a prefill pass of their own, then a decode pass
            batch = list(self._admit())
            if batch:
                await self._prefill(batch)
            if self.running:
                await self._decode()
        self.metrics.queue_size.set(len(self.waiting))
        self.metrics.running_requests.set(len(self.running))

    def _admit(self, budget: int | None = None, chunked: bool = False) -> dict[InFlightRequest, int]:
        """Waiting requests that join now (``router/admission.py``), each with the prompt tokens it runs."""
        now = time.monotonic()
        budget = self.settings.max_batch_prefill_tokens if budget is None else budget
        costs: dict[InFlightRequest, int] = {}  # one prefix lookup a request and step, for the order and the budget

        def to_compute(e: InFlightRequest) -> int:
            if e not in costs:
                costs[e] = self._to_compute(e)
            return costs[e]

        if self.prefix is not None:
            admission.cached_first(
                self.waiting, lambda e: to_compute(e) < e.length,
                patience=self.settings.cached_prefix_patience, window=self.settings.max_batch_size,
            )  # fmt: skip
        passed = admission.admit(
            self.waiting, self.running, self.settings, self.kv, adapter_slots=self.adapter_slots, budget=budget,
            chunked=chunked, one_at_a_time=self._kv_hold, now=now, to_compute=to_compute,
        )  # fmt: skip
        for e in passed.cancelled:
            self._finish(e, None)
        self.waiting = passed.waiting
        for e in passed.batch:
            if e.preemptions:  # its wait for a first prefill is already counted
                continue
            wait = now - e.queued_at
            self.metrics.queue_wait.observe(wait)
            if wait > self.longest_wait:
                self.longest_wait = wait
                self.metrics.longest_queue_wait.set(wait)
        return passed.batch

    def _to_compute(self, e: InFlightRequest) -> int:
        """Prompt tokens the shards are expected to compute for ``e`` (its prompt less the cached prefix)."""
        e.prompt_cached = 0
        if self.prefix is not None:
            prompt = e.prompt_ids
            if len(e.prefix_hashes) != len(prompt) // self.prefix.block_size:  # new, or longer after a preemption
                e.prefix_hashes = self.prefix.hashes(e.params.adapter_id, prompt)
            e.prompt_cached = self.prefix.cached(e.prefix_hashes, len(prompt))
        return e.length - e.prompt_cached

    def _sent(self, e: InFlightRequest, tokens: int) -> None:
        """``tokens`` more of ``e``'s prompt ran (counted after its cached prefix)."""
        e.prompt_left = max(0, e.prompt_left - tokens)
        e.prompt_sent += tokens
        if self.prefix is not None:
            self.prefix.record(e.prefix_hashes, min(e.length, e.prompt_cached + e.prompt_sent))

    def _messages(
        self, admitted: dict[InFlightRequest, int], chunked: bool = True
    ) -> tuple[list[InFlightRequest], list[pb.Request]]:
        """The admitted requests' shard messages (running from now on, so that whatever fails reaches them)."""
        entries, messages = [], []
        for e, cost in admitted.items():
            self.running[e.id] = e
            try:
                messages.append(shard_requests.shard_request(e, cost if chunked else 0))
            except Exception as exc:  # a field the shard's message cannot hold: this request alone fails
                log.warning("request cannot be sent to the shards", extra={"request": e.id, "error": repr(exc)})
                del self.running[e.id]
                self._finish(e, ErrorEvent("generation failed: the request cannot be sent to the shards"))
                continue
            e.prefilling, e.prompt_left, e.prompt_sent = True, e.length - e.prompt_cached, 0
            entries.append(e)
        return entries, messages

    async def _prefill(self, admitted: list[InFlightRequest]) -> None:
        entries, messages = self._messages(dict.fromkeys(admitted, 0), chunked=False)
        if not entries:
            return
        batch_id = next(self._ids)
        self.metrics.batch_size.observe(len(entries))
        try:
            with self.metrics.forward_duration.labels("prefill").time():
                resp = await self.shards.prefill(pb.Batch(id=batch_id, requests=messages))
        except grpc.aio.AioRpcError as exc:
            await self._new_batch_failed(exc, batch_id, entries)
            return
        for e in entries:
            self._sent(e, e.length)
        self.members[batch_id] = [e.id for e in entries]
        self._handle(resp.generations)
        await self._filter()

    async def _new_batch_failed(self, exc: grpc.aio.AioRpcError, batch_id: int, entries: list[InFlightRequest]) -> None:
        """A step with new requests failed; the shards changed nothing. Their requests wait or fail, alone."""
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise exc  # a shard is gone or stuck: everyone in flight is affected
        with contextlib.suppress(grpc.aio.AioRpcError):  # a rank that did cache the batch (TP) drops it too
            await self.shards.clear(batch_id)
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(self.running) > 1:
            # The shards hold less than our count says: these wait, first in line, until a request ends
            # (or, with nothing running, go one at a time: a lone request always fits).
            self._requeue(entries)
            self._kv_hold = True
            return
        kind = "adapter_not_found" if exc.code() == grpc.StatusCode.NOT_FOUND else "generation"
        message = exc.details() or "prefill failed"
        if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            log.error("prefill failed", extra={"code": exc.code().name, "details": message})
            message = f"generation failed: {exc.code().name}"
        for e in entries:
            del self.running[e.id]
            self._finish(e, ErrorEvent(message, kind))

    async def _chunked_step(self, chunk: int) -> None:
        """One pass (vLLM's chunked prefill): every decode, plus at most ``chunk`` prompt tokens — the prompts
        under way first, oldest first, then new requests' first chunks — so that no decode waits for more than
        one chunk of anyone's prompt."""
        await self._filter()
        await self._make_room()
        chunks: dict[int, int] = {}
        for rid in sorted(r for r, e in self.running.items() if e.prefilling):
            e = self.running[rid]
            # Past the expected count with no token yet, the shard found less cached than expected: what was
            # never sent is the most it can still have to run.
            need = e.prompt_left or e.length - e.prompt_sent
            if chunk <= 0 or need <= 0:
                continue
            chunks[rid] = min(need, chunk)
            chunk -= chunks[rid]
        admitted = self._admit(chunk, chunked=True) if chunk > 0 else {}
        entries, messages = self._messages(admitted)
        if not entries and not self.members:
            return
        batch_id = next(self._ids)
        new_batch = pb.Batch(id=batch_id, requests=messages) if entries else None
        ids = list(self.members)
        self.metrics.batch_size.observe(len(self.running))
        kind = "prefill" if not ids else ("decode" if not entries and not chunks else "mixed")
        try:
            with self.metrics.forward_duration.labels(kind).time():
                if ids:
                    cached = [pb.CachedBatch(id=b, request_ids=self.members[b]) for b in ids]
                    resp = await self.shards.decode(cached, new_batch, chunks)
                else:
                    prefill = await self.shards.prefill(new_batch or pb.Batch(id=batch_id))
                    resp = pb.DecodeResponse(generations=prefill.generations, batch=prefill.batch)
        except grpc.aio.AioRpcError as exc:
            if entries:
                await self._new_batch_failed(exc, batch_id, entries)
            elif exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await self._decode_refused(exc)
            else:
                raise
            return
        for rid, n in chunks.items():
            self._sent(self.running[rid], n)
        for e in entries:
            self._sent(e, admitted[e])
        merged = [r for b in ids for r in self.members.pop(b)] + [e.id for e in entries]
        self.members[resp.batch.id] = merged
        self._handle(resp.generations)
        await self._filter()

    async def _make_room(self) -> None:
        """Growth outruns the cache: the newest give their blocks back and are recomputed later."""
        victims = self.kv.victims([(r, self.running[r].length) for m in self.members.values() for r in m])
        if victims:
            await self._preempt([self.running[r] for r in victims])

    async def _decode(self) -> None:
        await self._filter()  # cancelled requests leave before the step, not after
        if not self.members:
            return
        await self._make_room()
        ids = list(self.members)
        self.metrics.batch_size.observe(len(self.running))
        try:
            with self.metrics.forward_duration.labels("decode").time():
                resp = await self.shards.decode([pb.CachedBatch(id=b, request_ids=self.members[b]) for b in ids])
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await self._decode_refused(exc)
            return
        merged = [r for b in ids for r in self.members.pop(b)]
        self.members[resp.batch.id] = merged
        self._handle(resp.generations)
        await self._filter()

    async def _filter(self) -> None:
        members = [self.running[r] for m in self.members.values() for r in m if r in self.running]
        gone = [e for e in members if e.finished or e.cancelled]
        for e in gone:
            if not e.finished:
                self._finish(e, None)
        if not gone:
            return
        await self._drop({e.id for e in gone})
        for e in gone:  # released only now that the shards no longer hold them
            del self.running[e.id]
            self._release(e)
        self._kv_hold = False  # blocks were freed: admission may try again

    async def _drop(self, ids: set[int]) -> None:
        """Take requests out of their cached batches on the shards (their KV blocks are freed there)."""
        for batch_id, members in list(self.members.items()):
            keep = [r for r in members if r not in ids]
            if len(keep) == len(members):
                continue
            if keep:
                await self.shards.filter(batch_id, keep)
                self.members[batch_id] = keep
            else:
                await self.shards.clear(batch_id)
                del self.members[batch_id]

    async def _preempt(self, victims: list[InFlightRequest]) -> None:
        """vLLM's recompute preemption: the victims' blocks are freed and they wait, first in line, with their
        generated tokens appended to the prompt; nothing they streamed is sent again (docs/serving.md)."""
        await self._drop({e.id for e in victims})
        for e in victims:
            e.preemptions += 1
        self._requeue(victims)
        self.metrics.preemptions.inc(len(victims))
        log.info("preempted", extra={"requests": [e.id for e in victims], "running": len(self.running)})

    def _requeue(self, entries: list[InFlightRequest]) -> None:
        for e in sorted(entries, key=lambda e: e.id, reverse=True):  # the oldest ends up first
            self.running.pop(e.id, None)
            self.waiting.appendleft(e)

    async def _decode_refused(self, exc: grpc.aio.AioRpcError) -> None:
        """The shards refused a step for want of KV blocks although our count said it fits (a count that is
        off, or a future optimistic one): the newest request makes room; only a lone one fails."""
        newest = max(self.running.values(), key=lambda e: e.id)
        log.warning("KV cache full against the router's count", extra={"details": exc.details()})
        if len(self.running) > 1:
            await self._preempt([newest])
            self._kv_hold = True
        else:
            await self._drop({newest.id})
            del self.running[newest.id]
            self._finish(newest, ErrorEvent("generation failed: the shard's KV cache cannot hold this request"))

    def _handle(self, generations: list[pb.Generation]) -> None:
        now = time.monotonic()
        for g in generations:
            e = self.running.get(g.request_id)
            if e is None or e.finished or e.cancelled:
                continue
            try:
                end = shard_requests.take_token(e, g, now, self.tokenizer, self.eos_ids, self.metrics)
                if end is not None:
                    self._finish(e, end)
            except Exception:  # this request's own token (its text, its stop check): it alone fails
                log.exception("token handling failed", extra={"request": e.id})
                self._finish(e, ErrorEvent("generation failed: internal error"))  # _filter drops it on the shards

    def _release(self, e: InFlightRequest) -> None:
        """The request holds nothing on the shards any more: its adapter may be unloaded."""
        if not e.released:
            e.released = True
            if self.on_release is not None:
                self.on_release(e)

    def _finish(self, e: InFlightRequest, event: Event | None) -> None:
        e.finished = True
        if e.id not in self.running:  # never reached the shards, or already left them
            self._release(e)
        if isinstance(event, EndEvent):
            e.end = event
            if self.prefix is not None:  # its answer is cached too: the next turn of a chat resends it
                tokens = e.input_ids + e.generated
                self.prefix.record(self.prefix.hashes(e.params.adapter_id, tokens), len(tokens) - 1)
        if event is not None:
            e.events.put_nowait(event)
        status = "cancelled" if event is None else ("error" if isinstance(event, ErrorEvent) else "success")
        self.metrics.requests.labels(status).inc()
        self.metrics.request_duration.observe(time.monotonic() - e.queued_at)

    async def _fail_all(self, message: str) -> None:
        failed = [*self.waiting, *self.running.values()]
        for e in failed:
            if not e.finished:
                self._finish(e, ErrorEvent(message))
        self.waiting.clear()
        self.running.clear()
        self.members.clear()
        await self._clear_shards()
        for e in failed:
            self._release(e)

    async def _clear_shards(self) -> bool:
        """Drop every batch the shards hold; ``healthy`` says whether every rank answered."""
        try:
            # A rank stuck in a collective with a dead peer holds its lock: do not wait for it forever.
            await asyncio.wait_for(self.shards.clear(), timeout=5.0)
        except (grpc.aio.AioRpcError, TimeoutError):
            self.healthy = False
        else:
            self.healthy = True
        return self.healthy

    async def _recover(self) -> bool:
        """After a failed clean-up: once every rank answers (and holds nothing), serve again."""
        if not await self._clear_shards():
            return False
        log.info("shards answer again; serving")
        if self._on_recovered is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._on_recovered()
        return True
