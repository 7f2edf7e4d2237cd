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


@pytest.fixture
def engine(tmp_path: Path) -> ShardEngine:
    """A shard engine over a tiny Llama (8 KV blocks of 4 tokens), its adapter loads paced by its model thread."""
    tiny_model(tmp_path, "llama")
    runner = build_runner(tmp_path, kv_blocks=8, block_size=4)
    model = ModelThread()
    store = AdapterStore(runner.model.config, dtype=torch.float32, pace=model.between_steps)
    return ShardEngine(runner, store, model)
