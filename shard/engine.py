"""The shard's engine: model, KV cache and adapter store behind cached batches, prefill, decode and filter."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

import torch

from loraplex.shard.allocator import release_freed_memory
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.model_thread import ModelThread
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


@dataclass(frozen=True)
class Generation:
    request_id: int
    choice: Choice
    prefill: list[tuple[int, float]] | None = None  # prompt tokens and their logprobs (first one: nan)


@dataclass
class _CachedRequest:
    """A request of a cached batch: its tokens and KV blocks, and how its next token is chosen."""

    seq: SequenceState
    chooser: TokenChooser


class BatchError(ValueError):
    """A call names a batch or request the shard does not hold."""


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

    def __init__(self, runner: ModelRunner, store: AdapterStore, model: ModelThread) -> None:
        if store.pace != model.between_steps:  # loads would otherwise compete with steps from gRPC threads
            raise ValueError("the adapter store must pace its loads with the engine's model thread")
        self.runner = runner
        self.store = store
        self.model = model
        self.lock = model.lock
        self._batches: dict[int, list[_CachedRequest]] = {}

    @_on_model_thread
    def prefill(self, batch_id: int, requests: Sequence[NewRequest]) -> list[Generation]:
        with self.lock:
            if batch_id in self._batches:
                raise BatchError(f"batch {batch_id} already exists")
            if not requests:
                raise BatchError("a batch needs at least one request")
            # Resolve every adapter before touching the cache, so a bad id fails the call cleanly.
            named = [r.adapter_id for r in requests if r.adapter_id]
            resident = self.store.acquire(named, pinned=self.pinned_adapters())
            adapters = [resident[r.adapter_id] if r.adapter_id else None for r in requests]
            entries = [
                _CachedRequest(
                    SequenceState(r.request_id, list(r.input_ids), a),
                    TokenChooser(
                        r.sampling, r.top_n_tokens, self.runner.model.config.eos_token_ids, self.runner.model.device
                    ),
                )
                for r, a in zip(requests, adapters, strict=True)
            ]
            want_prefill = any(r.prefill_logprobs for r in requests)
            seqs = [e.seq for e in entries]
            try:  # whatever fails from here on, the new sequences give their KV blocks back
                logits = self.runner.prefill(seqs, all_logits=want_prefill)
                details: list[list[tuple[int, float]] | None] = [None] * len(requests)
                if want_prefill:
                    logits, details = _prefill_details(requests, logits)
                for r, e in zip(requests, entries, strict=True):
                    if r.generated_tokens:
                        e.chooser.resume(r.input_ids[-r.generated_tokens :], logits.shape[-1])
                gens = self._choose(entries, logits)
            except BaseException:
                for s in seqs:
                    self.runner.release(s)
                raise
            self._batches[batch_id] = entries
            self.store.count_requests(named)
            return [Generation(g.request_id, g.choice, details[i]) if details[i] else g for i, g in enumerate(gens)]

    @_on_model_thread
    def decode(self, batch_ids: Sequence[int]) -> tuple[int, list[Generation]]:
        """Concatenate the batches (into the first id) and run one token of each request."""
        with self.lock:
            missing = [b for b in batch_ids if b not in self._batches]
            if missing or not batch_ids:
                raise BatchError(f"unknown batch ids {missing}")
            first = batch_ids[0]
            entries = [e for b in batch_ids for e in self._batches[b]]
            # Merged only once the step ran: a step refused for want of KV blocks (RESOURCE_EXHAUSTED, nothing
            # allocated) leaves every batch as the router knows it, so that it can preempt and try again.
            logits = self.runner.decode([e.seq for e in entries]) if entries else None
            for other in batch_ids[1:]:
                del self._batches[other]
            self._batches[first] = entries
            return first, [] if logits is None else self._choose(entries, logits)

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

    def _choose(self, entries: list[_CachedRequest], logits: torch.Tensor) -> list[Generation]:
        choices = choose_tokens(logits, [e.chooser for e in entries], [e.seq.token_ids for e in entries])
        for e, c in zip(entries, choices, strict=True):
            e.seq.token_ids.append(c.token_id)
        return [Generation(e.seq.request_id, c) for e, c in zip(entries, choices, strict=True)]


def _prefill_details(
    requests: Sequence[NewRequest], logits: torch.Tensor
) -> tuple[torch.Tensor, list[list[tuple[int, float]] | None]]:
    """Each request's last-position logits, and its prompt tokens' logprobs where asked for."""
    ends = torch.tensor([len(r.input_ids) for r in requests]).cumsum(0)
    all_logprobs = logits.log_softmax(-1)
    details: list[list[tuple[int, float]] | None] = [None] * len(requests)
    for i, r in enumerate(requests):
        if r.prefill_logprobs:
            start = int(ends[i]) - len(r.input_ids)
            rows = all_logprobs[start : int(ends[i]) - 1]
            following = torch.tensor(r.input_ids[1:], dtype=torch.long)  # long even when empty
            lps = rows[torch.arange(len(r.input_ids) - 1), following].tolist()
            details[i] = list(zip(r.input_ids, [float("nan"), *lps], strict=True))
    return logits[ends - 1], details
