"""Prefix caching: block bookkeeping (refcounts, LRU, eviction), per-adapter identity, and exact greedy outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.proto.shard.v1 import shard_pb2_grpc as pb_grpc
from loraplex.shard.engine import NewRequest, ShardEngine
from loraplex.shard.kv_cache import BlockAllocator, KVCacheFull
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.prefix_cache import PrefixIndex, adapter_identity, block_hashes, chain_next, chain_seed
from tests.factories import make_adapter, tiny_model
from tests.shard.conftest import drive, make_engine

NEW_TOKENS = 6


def _named(alloc: BlockAllocator, table: list[int], tag: bytes) -> None:
    """Name every block of ``table`` in the prefix index (as the runner does once their KV is computed)."""
    assert alloc.prefix is not None
    for i, block in enumerate(table):
        assert alloc.prefix.register(block, tag + bytes([i]))


def test_unused_cached_blocks_count_as_free_and_are_taken_last_oldest_first() -> None:
    alloc = BlockAllocator(num_blocks=6, block_size=4, prefix=PrefixIndex())
    a: list[int] = []
    b: list[int] = []
    alloc.grow(a, 8)
    alloc.grow(b, 8)
    kept_a, kept_b = list(a), list(b)
    _named(alloc, a, b"a")
    _named(alloc, b, b"b")
    alloc.free(a)  # first unused: evicted first, its tail before its head
    alloc.free(b)
    assert alloc.num_free == 6 and alloc.num_used == 0
    assert alloc.prefix is not None and len(alloc.prefix) == 4
    c: list[int] = []
    alloc.grow(c, 8)  # two truly free blocks: no cached one is touched
    assert not set(c) & set(kept_a + kept_b) and len(alloc.prefix) == 4
    d: list[int] = []
    alloc.grow(d, 4)
    assert d == [kept_a[1]]  # the oldest unused chain's last block
    assert alloc.prefix.lookup([b"a\x00", b"a\x01"]) == [kept_a[0]]
    assert alloc.prefix.lookup([b"b\x00", b"b\x01"]) == kept_b


def test_a_block_in_use_is_never_evicted_and_sharing_counts_references() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=4, prefix=PrefixIndex())
    owner: list[int] = []
    alloc.grow(owner, 8)
    _named(alloc, owner, b"p")
    sharer = list(owner)
    alloc.share(sharer)
    assert [alloc.refs(b) for b in owner] == [2, 2]
    alloc.free(owner)
    assert [alloc.refs(b) for b in sharer] == [1, 1] and alloc.num_used == 2
    other: list[int] = []
    with pytest.raises(KVCacheFull, match="need 3 more KV blocks, 2 free"):
        alloc.grow(other, 12)
    alloc.grow(other, 8)
    assert not set(other) & set(sharer)  # only truly free blocks: the shared ones are in use
    shared = list(sharer)
    alloc.free(sharer)
    assert alloc.num_free == 2  # unused now, still cached
    assert alloc.prefix is not None and alloc.prefix.lookup([b"p\x00", b"p\x01"]) == shared
    alloc.share(alloc.prefix.lookup([b"p\x00"]))  # an unused block taken again leaves the LRU
    assert alloc.num_free == 1 and alloc.refs(shared[0]) == 1


def test_a_prefix_named_twice_keeps_its_first_block() -> None:
    index = PrefixIndex()
    assert index.register(3, b"h")
    assert not index.register(5, b"h")  # the second copy stays private and is freed like any block
    assert index.lookup([b"h"]) == [3] and not index.is_cached(5)


def _adapter(adapter_id: str) -> LoraAdapter:
    return LoraAdapter(adapter_id, {}, 0)


def test_block_hashes_name_the_adapter_and_its_version_and_every_earlier_token() -> None:
    tokens = list(range(12))
    a1, a2, b = _adapter("a"), _adapter("a"), _adapter("b")  # a2: "a" loaded again (a new serial)
    ids = [adapter_identity(x) for x in (None, a1, a2, b)]
    assert len(set(ids)) == 4
    chains = [block_hashes(i, tokens, 4, 3) for i in ids]
    assert len({h for chain in chains for h in chain}) == 12
    base = chains[0]
    assert block_hashes(ids[0], tokens, 4, 3) == base  # deterministic (sha256, no per-process salt)
    assert block_hashes(ids[0], [99, *tokens[1:]], 4, 3)[2] != base[2]  # a block names its whole prefix
    assert base[1] == chain_next(chain_next(chain_seed(ids[0]), tokens[:4]), tokens[4:8])


# --- the engine: exact outputs with the cache on, never shared across adapters --------------------------------


def _world(tmp_path: Path, kind: str) -> tuple[Path, Any, dict[str, Path]]:
    base = tiny_model(tmp_path / "model", kind)
    layers = base.config.num_hidden_layers
    adapters = {  # differ from the base (and each other) only in the last layer: the first ones' keys match
        name: make_adapter(
            base,
            tmp_path / name,
            seed=seed,
            r=4,
            lora_alpha=8,
            target_modules=["k_proj", "v_proj", "down_proj"],
            layers_to_transform=[layers - 1],
        )
        for name, seed in (("a", 1), ("b", 2))
    }
    return tmp_path / "model", base, adapters


def _engine(model_dir: Path, adapters: dict[str, Path], caching: bool, kv_blocks: int = 96) -> ShardEngine:
    engine = make_engine(model_dir, kv_blocks=kv_blocks, block_size=4, prefix_caching=caching)
    for name, directory in adapters.items():
        engine.store.load(name, directory)
    return engine


def _prompts(vocab: int, shared: int, count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(vocab, (shared,), generator=gen).tolist()
    return [system + torch.randint(vocab, (2 + i,), generator=gen).tolist() for i in range(count)]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "mistral_sliding"])
def test_greedy_outputs_with_caching_equal_without_and_no_block_crosses_adapters(tmp_path: Path, kind: str) -> None:
    model_dir, base, adapters = _world(tmp_path, kind)
    prompts = _prompts(base.config.vocab_size, 21, 3)
    # The same prompt under the base and both adapters in one batch, twice (the second round hits).
    requests = [NewRequest(i * 3 + j, p, name) for i, p in enumerate(prompts) for j, name in enumerate(["", "a", "b"])]
    on, off = _engine(model_dir, adapters, True), _engine(model_dir, adapters, False)
    first, second = drive(on, requests, NEW_TOKENS), drive(on, requests, NEW_TOKENS, first_batch_id=9)
    ref = drive(off, requests, NEW_TOKENS)
    assert first.tokens == ref.tokens == second.tokens
    assert len({tuple(t) for t in ref.tokens.values()}) > 3  # the adapters do change the output
    # In the first batch, the first prompt of each identity fills the shared start's 5 full blocks and the
    # later prompts of that identity (never of another) point at them within the same step; in the second,
    # each request finds its whole prompt's full blocks (not the last token).
    for r in requests:
        assert first.cached[r.request_id] == (0 if r.request_id < 3 else 20)
        assert second.cached[r.request_id] == (len(r.input_ids) - 1) // 4 * 4
    queried, hit, cached_blocks = on.prefix_stats()
    assert queried == 2 * sum(len(r.input_ids) for r in requests)
    assert hit == sum(first.cached.values()) + sum(second.cached.values())
    assert cached_blocks > 0 and off.prefix_stats() == (0, 0, 0)
    on.clear()
    assert on.stats()[0] == 0


def test_a_prefix_cached_under_one_adapter_is_not_read_for_another(tmp_path: Path) -> None:
    model_dir, base, adapters = _world(tmp_path, "llama")
    prompt = _prompts(base.config.vocab_size, 30, 1)[0]
    engine = _engine(model_dir, adapters, True)
    steps = [("a", 1), ("b", 2), ("", 3), ("a", 4), ("", 5)]
    cached = {}
    for name, rid in steps:
        run = drive(engine, [NewRequest(rid, prompt, name)], NEW_TOKENS, first_batch_id=rid)
        cached[rid] = run.cached[rid]
    full = (len(prompt) - 1) // 4 * 4
    assert cached == {1: 0, 2: 0, 3: 0, 4: full, 5: full}
    queried, hit, _ = engine.prefix_stats()
    assert (queried, hit) == (5 * len(prompt), 2 * full)


def test_outputs_stay_exact_when_cached_blocks_are_evicted(tmp_path: Path) -> None:
    model_dir, base, adapters = _world(tmp_path, "qwen2")
    prompts = _prompts(base.config.vocab_size, 13, 6, seed=4)
    requests = [NewRequest(i, p, ["", "a", "b"][i % 3]) for i, p in enumerate(prompts)]
    small = _engine(model_dir, adapters, True, kv_blocks=14)  # the last two requests fill it
    off = _engine(model_dir, adapters, False, kv_blocks=14)
    runs = [drive(small, requests[i : i + 2], NEW_TOKENS, first_batch_id=i + 1) for i in range(0, 6, 2)]
    again = [drive(small, requests[i : i + 2], NEW_TOKENS, first_batch_id=i + 11) for i in range(0, 6, 2)]
    ref = [drive(off, requests[i : i + 2], NEW_TOKENS, first_batch_id=i + 1) for i in range(0, 6, 2)]
    assert [r.tokens for r in runs] == [r.tokens for r in ref] == [r.tokens for r in again]
    found = {rid: c for r in again for rid, c in r.cached.items()}
    full = {r.request_id: (len(r.input_ids) - 1) // 4 * 4 for r in requests}
    assert any(found[rid] < full[rid] for rid in full)  # something was evicted ...
    assert any(found[rid] == full[rid] for rid in full)  # ... and something was still there


def test_an_adapter_reloaded_from_changed_files_never_reuses_its_old_blocks(tmp_path: Path) -> None:
    model_dir, base, adapters = _world(tmp_path, "mistral")
    changed = make_adapter(base, tmp_path / "a2", seed=7, r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"])
    prompt = _prompts(base.config.vocab_size, 25, 1, seed=2)[0]
    engine = _engine(model_dir, adapters, True)
    before = drive(engine, [NewRequest(1, prompt, "a")], NEW_TOKENS)
    engine.unload_adapter("a")
    engine.store.load("a", changed)
    after = drive(engine, [NewRequest(2, prompt, "a")], NEW_TOKENS, first_batch_id=2)
    fresh = _engine(model_dir, {"a": changed}, False)
    assert after.cached == {2: 0}
    assert after.tokens[2] == drive(fresh, [NewRequest(2, prompt, "a")], NEW_TOKENS).tokens[2] != before.tokens[1]
    again = drive(engine, [NewRequest(3, prompt, "a")], NEW_TOKENS, first_batch_id=3)
    assert again.cached[3] > 0 and again.tokens[3] == after.tokens[2]


def test_a_next_turn_reuses_the_previous_answer_blocks(tmp_path: Path) -> None:
    model_dir, base, adapters = _world(tmp_path, "llama")
    prompt = _prompts(base.config.vocab_size, 10, 1, seed=5)[0]
    engine = _engine(model_dir, adapters, True)
    off = _engine(model_dir, adapters, False)
    turn = drive(engine, [NewRequest(1, prompt, "b")], 9)
    follow = prompt + turn.tokens[1] + [5, 6, 7]
    second = drive(engine, [NewRequest(2, follow, "b")], NEW_TOKENS, first_batch_id=2)
    # The answer's last token was never run (it came out of the last step), so its block is the edge.
    computed = len(prompt) + len(turn.tokens[1]) - 1
    assert second.cached[2] == computed // 4 * 4 > len(prompt)
    assert second.tokens == drive(off, [NewRequest(2, follow, "b")], NEW_TOKENS).tokens


def test_prompt_logprobs_skip_the_lookup_and_equal_an_uncached_run(tmp_path: Path) -> None:
    model_dir, base, adapters = _world(tmp_path, "llama")
    prompt = _prompts(base.config.vocab_size, 16, 1, seed=6)[0]
    engine = _engine(model_dir, adapters, True)
    drive(engine, [NewRequest(1, prompt)], 2)
    gens = engine.prefill(2, [NewRequest(2, prompt, prefill_logprobs=True)])
    ref = _engine(model_dir, adapters, False).prefill(2, [NewRequest(2, prompt, prefill_logprobs=True)])
    assert gens[0].cached_tokens == 0 and gens[0].prefill is not None and ref[0].prefill is not None
    assert [t for t, _ in gens[0].prefill] == prompt
    assert torch.allclose(
        torch.tensor([lp for _, lp in gens[0].prefill[1:]]), torch.tensor([lp for _, lp in ref[0].prefill[1:]])
    )
    assert gens[0].choice.token_id == ref[0].choice.token_id


def test_a_step_the_router_counts_as_fitting_is_never_refused(tmp_path: Path) -> None:
    """The router counts every request at its full length without sharing: that bounds what the shard needs,
    cached blocks (unused ones counted free) included."""
    model_dir, base, adapters = _world(tmp_path, "llama")
    prompts = _prompts(base.config.vocab_size, 12, 8, seed=8)
    blocks = [-(-(len(p) + NEW_TOKENS) // 4) for p in prompts]
    engine = _engine(model_dir, adapters, True, kv_blocks=max(blocks[i] + blocks[i + 1] for i in range(0, 8, 2)))
    for i in range(0, 8, 2):  # each pair exactly fills the router's count of the cache
        run = drive(engine, [NewRequest(i, prompts[i], "a"), NewRequest(i + 1, prompts[i + 1], "a")], NEW_TOKENS)
        assert all(len(t) == NEW_TOKENS for t in run.tokens.values())
    assert engine.stats()[0] == 0 and engine.prefix_stats()[1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("flag", [False, True])
def test_the_shard_process_turns_caching_off_with_its_flag(tmp_path: Path, flag: bool) -> None:
    tiny_model(tmp_path / "model", "llama")
    sock = tmp_path / "shard.sock"
    cmd = [sys.executable, "-m", "loraplex.shard.main", "--model-id", str(tmp_path / "model")]
    cmd += ["--listen", f"unix://{sock}", "--max-batch-total-tokens", "256", "--block-size", "4"]
    proc = subprocess.Popen([*cmd, *(["--no-prefix-caching"] if flag else [])], stderr=subprocess.PIPE)
    try:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = pb_grpc.ShardStub(channel)
            assert stub.Info(pb.InfoRequest()).prefix_caching is not flag
            prompt = list(range(3, 20))
            for batch in (1, 2):  # the second finds the first's blocks, unless caching is off
                stub.Prefill(
                    pb.PrefillRequest(batch=pb.Batch(id=batch, requests=[pb.Request(id=batch, input_ids=prompt)]))
                )
                stub.ClearCache(pb.ClearCacheRequest())
            health = stub.Health(pb.HealthRequest())
            assert (health.prefix_queried_tokens, health.prefix_hit_tokens) == ((0, 0) if flag else (34, 16))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_blocks_outlive_an_adapter_leaving_the_device_tier(tmp_path: Path) -> None:
    """A demoted adapter comes back as a new device copy (a new object, as on a GPU): its load is the same,
    so are its blocks; only an unload ends them (see the reload test)."""
    model_dir, base, adapters = _world(tmp_path, "llama")
    prompt = _prompts(base.config.vocab_size, 17, 1, seed=9)[0]
    engine = _engine(model_dir, adapters, True)
    first = drive(engine, [NewRequest(1, prompt, "a")], NEW_TOKENS)
    rec = engine.store.record("a")
    assert rec.host is not None
    # Demoted and promoted again: ``to(device)`` gives a GPU shard a new object (and serial) of the same load.
    rec.device = LoraAdapter(rec.host.adapter_id, rec.host.projections, rec.host.weight_bytes, rec.host.source)
    again = drive(engine, [NewRequest(2, prompt, "a")], NEW_TOKENS, first_batch_id=2)
    assert again.cached[2] == (len(prompt) - 1) // 4 * 4 and again.tokens[2] == first.tokens[1]
