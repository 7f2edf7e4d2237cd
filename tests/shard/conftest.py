"""Fixtures of the shard tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from loraplex.shard.engine import NewRequest, ShardEngine
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.model_thread import ModelThread
from loraplex.shard.runner import build_runner
from tests.factories import tiny_model


def make_engine(model_dir: Path, kv_blocks: int = 8, block_size: int = 4, prefix_caching: bool = True) -> ShardEngine:
    """A shard engine over the checkpoint in ``model_dir``, its adapter loads paced by its model thread."""
    runner = build_runner(model_dir, kv_blocks=kv_blocks, block_size=block_size, prefix_caching=prefix_caching)
    model = ModelThread()
    store = AdapterStore(runner.model.full_config, dtype=torch.float32, pace=model.between_steps)
    return ShardEngine(runner, store, model)


@pytest.fixture
def engine(tmp_path: Path) -> ShardEngine:
    """A shard engine over a tiny Llama (8 KV blocks of 4 tokens), without prefix caching: its users count
    blocks as the router does, one request's at a time (the prefix cache's own tests share them)."""
    tiny_model(tmp_path, "llama")
    return make_engine(tmp_path, prefix_caching=False)


@dataclass
class Run:
    """What ``drive`` saw: each request's generated tokens, and the prompt tokens it found cached."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    cached: dict[int, int] = field(default_factory=dict)
    steps: int = 0


def drive(
    engine: ShardEngine,
    requests: Sequence[NewRequest],
    new_tokens: int,
    *,
    chunk: int = 0,
    arrivals: int = 0,
    first_batch_id: int = 1,
) -> Run:
    """Run ``requests`` to ``new_tokens`` greedy tokens each as the router would: ``arrivals`` requests join per
    step (0: all in the first), each prompt in chunks of ``chunk`` tokens (0: whole), finished ones filtered."""
    run = Run({r.request_id: [] for r in requests})
    waiting = list(requests)
    partial: set[int] = set()
    batch: int | None = None
    next_id = first_batch_id
    while waiting or batch is not None:
        take, waiting = waiting[: arrivals or len(waiting)], waiting[arrivals or len(waiting) :]
        new = (next_id, [replace(r, prefill_chunk=chunk) for r in take]) if take else None
        next_id += 1
        chunks = {rid: chunk for rid in partial} if chunk else {}
        batch, gens = engine.step([batch] if batch is not None else [], new, chunks)
        run.steps += 1
        partial |= {r.request_id for r in take}
        for g in gens:
            if g.request_id in partial:
                partial.discard(g.request_id)
                run.cached[g.request_id] = g.cached_tokens
            run.tokens[g.request_id].append(g.choice.token_id)
        members = engine.members(batch)
        keep = [rid for rid in members if len(run.tokens[rid]) < new_tokens]
        if keep != members:
            engine.filter(batch, keep)
        if not keep:
            batch = None
    return run
