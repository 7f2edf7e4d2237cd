"""Shared fixtures: tests run on the CPU in float32 unless they say otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.factories import make_adapter, tiny_served_model
from tests.servers import NUM_ADAPTERS, Server, start_server

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("served")
    base = tiny_served_model(root / "model")
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear", ["down_proj"]]
    adapters = {}
    for i in range(NUM_ADAPTERS):
        name = f"team-{i % 3}/adapter-{i}"
        adapters[name] = make_adapter(
            base,
            root / f"adapter-{i}",
            seed=100 + i,
            r=[1, 4, 8, 16][i % 4],
            lora_alpha=8,
            target_modules=targets[i % 4],
        )
    return root / "model", adapters


@pytest.fixture(scope="session")
def server(served_model: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir, adapters = served_model
    srv = start_server(tmp_path_factory.mktemp("run"), model_dir, adapters)
    yield srv
    srv.stop()
