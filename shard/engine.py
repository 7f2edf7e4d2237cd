"""The shard's engine: model, KV cache and adapter store behind cached batches, prefill, decode and filter."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

import torch

from loraplex.shard.allocator import release_freed_memory
from loraplex.shard.grammar import GrammarCompiler
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.model_thread import ModelThread
from loraplex.shard.prefix_cache import adapter_identity
from loraplex.shard.runner import ModelRunner, SequenceState
from loraplex.shard.sampling import Choice, SamplingParams, TokenChooser, choose_tokens

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class NewRequest:
    request_id: int
    input_ids: list[int]
    adapter_id: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    generated_tokens: int = 0  # the last ones of input_ids, generated before a preemption
    prefill_chunk: int = 0  # prompt tokens to run in the first step, after the cached prefix (0: all)


@dataclass(frozen=True)
class Generation:
    request_id: int
    choice: Choice
    prefill: list[tuple[int, float]] | None = None  # prompt tokens and their logprobs (first one: nan)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (first generation only)


@dataclass
class _CachedRequest:
    """A request of a cached batch: its tokens and KV blocks, and how its next token is chosen.

    Until its prompt is all run (chunked prefill) it samples nothing: ``prompt`` is set then, and
    ``prompt_logprobs`` gathers a decoder_input_details request's logprobs chunk by chunk.
    """

    seq: SequenceState
    chooser: TokenChooser
    prompt: NewRequest | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[float] | None = None

    @property
    def prefilling(self) -> bool:
        return self.prompt is not None


class BatchError(ValueError):
    """A call names a batch or request the shard does not hold."""


class StepError(BatchError):
    """A step's chunks name a request that is not partially prefilled in its batches (INVALID_ARGUMENT)."""


def _on_model_thread(method: Callable[Concatenate[ShardEngine, P], T]) -> Callable[Concatenate[ShardEngine, P], T]:
    """The method runs on the engine's model thread, whichever thread calls it (``shard/model_thread.py``)."""

    @functools.wraps(method)
    def run(self: ShardEngine, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.model.call(method, self, *args, **kwargs)

    return run


class ShardEngine:
    """Everything a shard does between gRPC and the model: it owns the runner (model and KV cache), the
    adapter store and the cached batches. All model work (steps, batch changes, and the adapter-load
    pieces the store runs through ``model.between_steps``) runs on one model thread, under its lock."""

    def __init__(
        self, runner: ModelRunner, store: AdapterStore, model: ModelThread, grammars: GrammarCompiler | None = None
    ) -> None:
        """``grammars``: the model's tokenizer compiled for structured output (None: grammar requests fail)."""
        if store.pace != model.between_steps:  # loads would otherwise compete with steps from gRPC threads
            raise ValueError("the adapter store must pace its loads with the engine's model thread")
        self.runner = runner
        self.store = store
        self.model = model
        self.grammars = grammars
        self.lock = model.lock
        self._batches: dict[int, list[_CachedRequest]] = {}

    def prefill(self, batch_id: int, requests: Sequence[NewRequest]) -> list[Generation]:
        """A new batch's first step (each request's whole prompt, or its first chunk)."""
        return self.step([], (batch_id, requests))[1]

    def decode(self, batch_ids: Sequence[int]) -> tuple[int, list[Generation]]:
        """Concatenate the batches (into the first id) and run one token of each request."""
        return self.step(batch_ids)

    @_on_model_thread
    def step(
        self,
        batch_ids: Sequence[int],
        new: tuple[int, Sequence[NewRequest]] | None = None,
        chunks: Mapping[int, int] | None = None,
    ) -> tuple[int, list[Generation]]:
        """One forward pass over the cached batches (a token each, or a chunk of a partial prompt as
        ``chunks`` says) and ``new``'s requests (their first chunk); all merge into the first cached batch
        (``new``'s id when there is none), whose id comes back with the generations of this step."""
        chunks = chunks or {}
        with self.lock:
            entries, merged = self._check_step(batch_ids, new, chunks)
            fresh = self._admit(new[1]) if new is not None else []
            work = [(e, min(chunks.get(e.seq.request_id, 0), e.seq.pending) if e.prefilling else 1) for e in entries]
            work = [(e, n) for e, n in work if n]  # a partial prompt without a chunk waits this step
            prompts = [e.prompt for e in fresh if e.prompt is not None]
            looked_up = [e for e, r in zip(fresh, prompts, strict=True) if not r.prefill_logprobs]
            try:  # whatever fails from here on, the new sequences give their KV blocks back
                found = [e.seq.num_cached for e in fresh]
                seqs, lookup = [e.seq for e in fresh], [not r.prefill_logprobs for r in prompts]
                runs = self.runner.share_in_step(seqs, [r.prefill_chunk for r in prompts], lookup)
                for e, before, n in zip(fresh, found, runs, strict=True):
                    e.cached_tokens += e.seq.num_cached - before
                    work.append((e, n))
                full = [e.prompt_logprobs is not None for e, _ in work]
                logits = self.runner.step([(e.seq, n) for e, n in work], full) if work else None
            except BaseException:
                for e in fresh:
                    self.runner.release(e.seq)
                raise
            # Merged only once the step ran: a step refused for want of KV blocks (RESOURCE_EXHAUSTED, nothing
            # allocated) leaves every batch as the router knows it, so that it can preempt and try again.
            for other in batch_ids[1:]:
                del self._batches[other]
            self._batches[merged] = entries + fresh
            if new is not None:
                self.store.count_requests(r.adapter_id for r in new[1] if r.adapter_id)
            if self.runner.prefix is not None and looked_up:
                queried = sum(len(e.seq.token_ids) for e in looked_up)  # before any token is sampled
                self.runner.prefix.record(queried, sum(e.cached_tokens for e in looked_up))
            try:
                return merged, [] if logits is None else self._generations(work, full, logits)
            except BaseException:
                if not batch_ids:  # a failed prefill keeps nothing, as the router drops its requests
                    for e in self._batches.pop(merged):
                        self.runner.release(e.seq)
                raise

    def _check_step(
        self, batch_ids: Sequence[int], new: tuple[int, Sequence[NewRequest]] | None, chunks: Mapping[int, int]
    ) -> tuple[list[_CachedRequest], int]:
        """The cached batches' requests in order and the answer's batch id, or a BatchError."""
        missing = [b for b in batch_ids if b not in self._batches]
        if missing or (not batch_ids and new is None):
            raise BatchError(f"unknown batch ids {missing}")
        if len(set(batch_ids)) != len(batch_ids):
            raise StepError(f"batch ids repeat: {list(batch_ids)}")
        entries = [e for b in batch_ids for e in self._batches[b]]
        if new is not None:
            if new[0] in self._batches:
                raise BatchError(f"batch {new[0]} already exists")
            if not new[1]:
                raise BatchError("a batch needs at least one request")
            held = {e.seq.request_id for e in entries}
            ids = [r.request_id for r in new[1]]
            if len(set(ids)) != len(ids) or held & set(ids):
                raise StepError("a new request's id repeats one of its batch or of the cached batches")
        partial = {e.seq.request_id for e in entries if e.prefilling}
        wrong = sorted(r for r, n in chunks.items() if n and r not in partial)
        if wrong:
            raise StepError(f"chunks name requests that are not partially prefilled in these batches: {wrong}")
        return entries, batch_ids[0] if batch_ids else new[0]  # type: ignore[index]

    def _admit(self, requests: Sequence[NewRequest]) -> list[_CachedRequest]:
        """New requests' entries, each pointing at its longest cached prefix; a bad adapter id fails them all."""
        named = [r.adapter_id for r in requests if r.adapter_id]
        resident = self.store.acquire(named, pinned=self.pinned_adapters())
        eos = self.runner.model.config.eos_token_ids
        fresh = []
        for r in requests:
            if not r.input_ids:
                raise ValueError(f"request {r.request_id} has an empty prompt")
            seq = SequenceState(r.request_id, list(r.input_ids), resident[r.adapter_id] if r.adapter_id else None)
            if r.adapter_id:
                # The load, not its device copy, computed the KV: blocks outlive a demotion from the device tier.
                # (A copy that is no longer the record's means a reload came in between: it keeps its own.)
                rec = self.store.record(r.adapter_id)
                if rec.device is seq.adapter and rec.host is not None:
                    seq.identity = adapter_identity(rec.host)
            chooser = TokenChooser(r.sampling, r.top_n_tokens, eos, self.runner.model.device, self.grammars)
            fresh.append(_CachedRequest(seq, chooser, r, prompt_logprobs=[] if r.prefill_logprobs else None))
        for e in fresh:  # after every check: a lookup takes references that only release() gives back
            assert e.prompt is not None
            if not e.prompt.prefill_logprobs:  # those need every prompt token's logits
                e.cached_tokens = self.runner.reuse_prefix(e.seq)
        return fresh

    def _generations(
        self, work: list[tuple[_CachedRequest, int]], full: list[bool], logits: torch.Tensor
    ) -> list[Generation]:
        """Sample for every request whose tokens are all run now; prompts' details on their first token."""
        ready, rows, row = [], [], 0
        for (e, n), everything in zip(work, full, strict=True):
            done = e.seq.pending == 0
            if everything:
                assert e.prompt_logprobs is not None
                e.prompt_logprobs.extend(_following_logprobs(logits[row : row + n], e.seq, n, done))
                row += n
                if done:
                    ready.append(e)
                    rows.append(row - 1)
            elif done:
                ready.append(e)
                rows.append(row)
                row += 1
        if not ready:
            return []
        picked = logits[torch.tensor(rows, device=logits.device)] if any(full) else logits
        vocab = logits.shape[-1]
        for e in ready:
            if e.prompt is not None and e.prompt.generated_tokens:
                e.chooser.resume(e.prompt.input_ids[-e.prompt.generated_tokens :], vocab)
        choices = choose_tokens(picked, [e.chooser for e in ready], [e.seq.token_ids for e in ready])
        gens = []
        for e, c in zip(ready, choices, strict=True):
            e.seq.token_ids.append(c.token_id)
            prompt = e.prompt
            if prompt is None:
                gens.append(Generation(e.seq.request_id, c))
                continue
            details = None
            if e.prompt_logprobs is not None:
                details = list(zip(prompt.input_ids, [float("nan"), *e.prompt_logprobs], strict=True))
            gens.append(Generation(e.seq.request_id, c, details, e.cached_tokens))
            e.prompt, e.prompt_logprobs = None, None
        return gens

    @_on_model_thread
    def filter(self, batch_id: int, keep: Sequence[int]) -> list[int]:
        """Keep only ``keep`` in the batch; everyone else's KV blocks are freed now."""
        with self.lock:
            if batch_id not in self._batches:
                raise BatchError(f"unknown batch id {batch_id}")
            wanted = set(keep)
            kept = []
            for e in self._batches[batch_id]:
                if e.seq.request_id in wanted:
                    kept.append(e)
                else:
                    self.runner.release(e.seq)
            if kept:
                self._batches[batch_id] = kept
            else:
                del self._batches[batch_id]
            return [e.seq.request_id for e in kept]

    @_on_model_thread
    def clear(self, batch_id: int | None = None) -> None:
        with self.lock:
            ids = list(self._batches) if batch_id is None else [batch_id]
            for b in ids:
                for e in self._batches.pop(b, []):
                    self.runner.release(e.seq)

    def members(self, batch_id: int) -> list[int]:
        """Request ids of a cached batch, in order (partially prefilled ones included)."""
        with self.lock:
            return [e.seq.request_id for e in self._batches.get(batch_id, [])]

    def warmup(self, batch_size: int, input_length: int) -> int:
        """Run a throw-away batch (none for size 0); the KV blocks sequences can have, which the router admits in.

        Blocks held outside every sequence (a decode graph's scratch block) are not the router's to count,
        and the throw-away prompts do not count as prefix-cache queries.
        """
        prefix = self.runner.prefix
        counters = (prefix.queried_tokens, prefix.hit_tokens) if prefix is not None else (0, 0)
        if batch_size:
            ids = range(2**63, 2**63 + batch_size)
            self.prefill(2**63, [NewRequest(i, [1] * max(1, input_length)) for i in ids])
            self.decode([2**63])
            self.clear(2**63)
        if prefix is not None:
            prefix.queried_tokens, prefix.hit_tokens = counters
        with self.lock:
            held = {b for batch in self._batches.values() for e in batch for b in e.seq.blocks}
            return self.runner.cache.allocator.num_free + len(held)

    def pinned_adapters(self) -> set[str]:
        """Adapters that cached batches use: they stay on the device until their requests leave."""
        return {e.seq.adapter.adapter_id for b in self._batches.values() for e in b if e.seq.adapter is not None}

    def unload_adapter(self, adapter_id: str) -> None:
        with self.lock:  # batches cannot change while we look at who uses the adapter
            self.store.unload(adapter_id, pinned=self.pinned_adapters())
        release_freed_memory()

    def stats(self) -> tuple[int, int, int, int]:
        """KV blocks used, KV blocks free, cached batches, cached requests."""
        alloc = self.runner.cache.allocator
        return alloc.num_used, alloc.num_free, len(self._batches), sum(len(b) for b in self._batches.values())

    def prefix_stats(self) -> tuple[int, int, int]:
        """Prompt tokens looked up in the prefix cache, those found, and blocks holding a named prefix."""
        prefix = self.runner.prefix
        if prefix is None:
            return 0, 0, 0
        return prefix.queried_tokens, prefix.hit_tokens, len(prefix)


def _following_logprobs(logits: torch.Tensor, seq: SequenceState, n: int, done: bool) -> list[float]:
    """Logprobs of the prompt tokens that follow each of a chunk's ``n`` rows (the last row's is the answer)."""
    start = seq.num_cached - n + 1  # position of the token each first row predicts
    end = seq.num_cached if done else seq.num_cached + 1  # exclusive; a done prompt's last row predicts no prompt token
    following = torch.tensor(seq.token_ids[start:end], dtype=torch.long)
    rows = logits[: len(following)].log_softmax(-1)
    return rows[torch.arange(len(following)), following].tolist()
