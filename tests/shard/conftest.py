"""Fixtures of the shard tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.shard.engine import ShardEngine
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
