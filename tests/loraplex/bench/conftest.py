"""A tiny served model with an adapter root of bench adapters, and one real server on it for the bench tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraplex.bench.adapters import ATTENTION, AdapterSpec, ensure_adapters
from tests.factories import tiny_served_model
from tests.servers import Server, start_server

SPEC = AdapterSpec("bench/r4", 4, ATTENTION)
NUM = 6


@dataclass
class BenchWorld:
    model_dir: Path
    root: Path
    server: Server
    adapters: list[str]


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchWorld]:
    top = tmp_path_factory.mktemp("bench")
    model_dir = top / "model"
    tiny_served_model(model_dir)
    root = top / "adapters"
    ids = ensure_adapters(root, model_dir, SPEC, range(NUM))
    server = start_server(
        top, model_dir, {}, "--max-concurrent-requests", "256", shard_args=("--adapter-dirs", str(root))
    )
    yield BenchWorld(model_dir, root, server, ids)
    server.stop()
