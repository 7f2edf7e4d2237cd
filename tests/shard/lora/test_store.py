"""The tiered store: capacity refused not overrun, device LRU that spares pinned adapters, real unload."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.roots import AdapterRoots
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import SequenceState, build_runner
from tests.factories import tiny_model, write_raw_adapter


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    tiny_model(tmp_path / "model", "llama")
    for i in range(6):
        write_raw_adapter(tmp_path / "root" / f"a{i}", tmp_path / "model", rank=2, seed=i)
    runner = build_runner(tmp_path / "model", kv_blocks=16, block_size=4)
    return AdapterStore(
        runner.model.config,
        dtype=torch.float32,
        roots=AdapterRoots([tmp_path / "root"]),
        max_active=2,
        max_host=1,
        on_evict=runner.forget_plan,
    )


def test_loads_past_the_limit_are_refused_and_loading_twice_is_free(store: AdapterStore) -> None:
    first = store.load("a0")
    assert store.load("a0") is first
    store.load("a1")
    store.load("a2")
    with pytest.raises(AdapterError) as info:
        store.load("a3")
    assert info.value.kind == "capacity" and store.ids() == ["a0", "a1", "a2"]
    store.unload("a1")
    store.load("a3")
    assert store.ids() == ["a0", "a2", "a3"]


def test_device_tier_demotes_the_least_recently_used_unpinned_adapter(store: AdapterStore) -> None:
    for name in ("a0", "a1", "a2"):
        store.load(name)
    store.acquire(["a0"], pinned=set())
    store.acquire(["a1"], pinned=set())
    assert {r.adapter_id: r.tier for r in store.records(discover=False)} == {
        "a0": "device",
        "a1": "device",
        "a2": "host",
    }
    store.acquire(["a2"], pinned={"a0"})  # a0 is older but in use: a1 goes
    tiers = {r.adapter_id: r.tier for r in store.records(discover=False)}
    assert tiers == {"a0": "device", "a1": "host", "a2": "device"}
    with pytest.raises(AdapterError) as info:
        store.acquire(["a1"], pinned={"a0", "a2"})
    assert info.value.kind == "capacity"
    with pytest.raises(AdapterError, match="not loaded"):
        store.acquire(["a5"], pinned=set())


def test_unload_refuses_pinned_and_frees_the_weights(store: AdapterStore) -> None:
    adapter = store.load("a0")
    with pytest.raises(AdapterError) as info:
        store.unload("a0", pinned={"a0"})
    assert info.value.kind == "in_use"
    weights = adapter.projections["q_proj"].a
    ref = weakref.ref(weights)
    del adapter, weights
    store.unload("a0")
    assert ref() is None  # nothing keeps the tensor alive: the memory really went back
    assert "a0" not in store and [r.tier for r in store.records() if r.adapter_id == "a0"] == ["disk"]


def test_a_reloaded_adapter_never_reuses_a_stale_batch_plan(tmp_path: Path, store: AdapterStore) -> None:
    runner = build_runner(tmp_path / "model", kv_blocks=16, block_size=4)
    store.on_evict = runner.forget_plan

    def decode_once(name: str) -> torch.Tensor:
        adapter = store.acquire([name], pinned=set())[name]
        seq = SequenceState(0, [3, 4, 5], adapter)
        runner.prefill([seq])
        seq.token_ids.append(6)
        out = runner.decode([seq])
        runner.release(seq)
        return out

    store.load("a0")
    first = decode_once("a0")
    store.unload("a0")
    store.load("a0", tmp_path / "root" / "a4")  # same id, other weights
    assert not torch.allclose(decode_once("a0"), first)
