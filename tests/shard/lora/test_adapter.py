"""Adapter loading in pieces: small adapters take two turns of the model thread, big ones one per projection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import loraplex.shard.lora.adapter as adapter_module
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter, load_adapter
from tests.factories import make_adapter, tiny_model


def _load_counting_pieces(directory: Path, config: ModelConfig) -> tuple[LoraAdapter, int]:
    pieces = 0

    def pace(piece: Callable[[], Any]) -> Any:
        nonlocal pieces
        pieces += 1
        return piece()

    loaded = load_adapter("a", directory, config, max_rank=64, dtype=torch.float32, pace=pace)
    return loaded, pieces


def test_a_small_adapter_loads_in_two_pieces_and_a_big_one_per_projection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    config = ModelConfig.from_dir(tmp_path / "base")
    whole, pieces = _load_counting_pieces(tmp_path / "a", config)
    assert pieces == 2  # the read, then every projection at once: a few kB of weights
    monkeypatch.setattr(adapter_module, "PIECE_BYTES", 1)
    split, pieces = _load_counting_pieces(tmp_path / "a", config)
    assert pieces == 1 + 5  # the read, then one piece per projection
    assert set(whole.projections) == set(split.projections) == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    for name, weights in whole.projections.items():
        assert torch.equal(weights.a, split.projections[name].a)
        assert torch.equal(weights.b, split.projections[name].b)
