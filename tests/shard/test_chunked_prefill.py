"""Chunked prefill on the shard: exact outputs, no token before a prompt ends, preemption mid-prompt, errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from loraplex.common.sampling import SamplingParams
from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.proto.shard.v1 import shard_pb2_grpc as pb_grpc
from loraplex.shard.engine import NewRequest, ShardEngine, StepError
from loraplex.shard.kv_cache import KVCache, KVCacheFull
from loraplex.shard.lora.config import AdapterError
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.model_thread import ModelThread
from loraplex.shard.runner import ModelRunner, build_runner
from loraplex.shard.server import EngineServicer, serve
from tests.factories import make_adapter, tiny_model
from tests.shard.conftest import drive, make_engine
from tests.shard.test_device_placement import DEVICE, DeviceCheck, Generators, generators  # noqa: F401

NEW_TOKENS = 5


def _world(tmp_path: Path, kind: str, caching: bool, kv_blocks: int = 128) -> tuple[ShardEngine, int]:
    base = tiny_model(tmp_path / "model", kind)
    engine = make_engine(tmp_path / "model", kv_blocks=kv_blocks, block_size=4, prefix_caching=caching)
    for name, seed, targets in (("a", 1, "all-linear"), ("b", 2, ["q_proj", "v_proj"])):
        engine.store.load(
            name, make_adapter(base, tmp_path / name, seed=seed, r=4, lora_alpha=8, target_modules=targets)
        )
    return engine, base.config.vocab_size


def _requests(vocab: int, lengths: list[int], seed: int = 0) -> list[NewRequest]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(vocab, (9,), generator=gen).tolist()  # a common start, so caching has work to do
    return [
        NewRequest(i, shared + torch.randint(vocab, (n,), generator=gen).tolist(), ["", "a", "b"][i % 3])
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "mistral_sliding"])
@pytest.mark.parametrize("caching", [False, True])
def test_chunked_greedy_outputs_equal_unchunked(tmp_path: Path, kind: str, caching: bool) -> None:
    engine, vocab = _world(tmp_path, kind, caching)
    requests = _requests(vocab, [31, 3, 24, 40, 17, 2])  # most prompts several chunks long
    # Two arrivals per step: chunks of new prompts run beside decodes and beside other prompts' chunks.
    whole = drive(engine, requests, NEW_TOKENS, arrivals=2)
    chunked = drive(engine, requests, NEW_TOKENS, arrivals=2, chunk=7, first_batch_id=50)
    tiny = drive(engine, requests, NEW_TOKENS, arrivals=3, chunk=1, first_batch_id=100)
    assert chunked.tokens == whole.tokens == tiny.tokens
    assert len({tuple(t) for t in whole.tokens.values()}) > 3
    if caching:  # the first run left every prompt's blocks: later chunks start after them
        assert all(c >= (len(r.input_ids) - 1) // 4 * 4 for r, c in zip(requests, chunked.cached.values(), strict=True))
    else:
        assert chunked.steps > whole.steps + 4
    engine.clear()
    assert engine.stats()[0] == 0


def test_a_prompt_yields_nothing_until_its_last_chunk(tmp_path: Path) -> None:
    engine, vocab = _world(tmp_path, "llama", caching=False)
    prompt = _requests(vocab, [13])[0].input_ids  # 22 tokens
    reference = drive(engine, [NewRequest(9, prompt)], 1, first_batch_id=9).tokens[9]
    assert engine.prefill(1, [NewRequest(1, prompt, prefill_chunk=8)]) == []
    assert engine.members(1) == [1]
    assert engine.step([1], None, {1: 8}) == (1, [])
    assert engine.step([1], None, {}) == (1, [])  # named by no chunk: it waits
    batch, gens = engine.step([1], None, {1: 8})  # 6 left: they run and the first token comes
    assert batch == 1 and [g.request_id for g in gens] == [1] and gens[0].choice.token_id == reference[0]


def test_a_chunk_starts_after_the_cached_prefix(tmp_path: Path) -> None:
    engine, vocab = _world(tmp_path, "llama", caching=True)
    prompt = _requests(vocab, [13])[0].input_ids  # 22 tokens: 5 full blocks before the last token
    reference = drive(engine, [NewRequest(9, prompt)], 1, first_batch_id=9).tokens[9]
    assert engine.prefill(1, [NewRequest(1, prompt, prefill_chunk=1)]) == []  # token 21 of 22
    _, gens = engine.step([1], None, {1: 1})
    assert [(g.request_id, g.cached_tokens, g.choice.token_id) for g in gens] == [(1, 20, reference[0])]


def test_prompt_logprobs_gathered_chunk_by_chunk_equal_one_pass(tmp_path: Path) -> None:
    engine, vocab = _world(tmp_path, "qwen2", caching=False)
    prompt = _requests(vocab, [10])[0].input_ids
    whole = engine.prefill(1, [NewRequest(1, prompt, "a", prefill_logprobs=True)])[0]
    engine.prefill(2, [NewRequest(2, prompt, "a", prefill_logprobs=True, prefill_chunk=7)])  # 19 tokens
    _, more = engine.step([2], None, {2: 7})
    _, last = engine.step([2], None, {2: 7})
    assert more == [] and len(last) == 1 and last[0].prefill is not None and whole.prefill is not None
    assert [t for t, _ in last[0].prefill] == prompt == [t for t, _ in whole.prefill]
    ours = torch.tensor([lp for _, lp in last[0].prefill[1:]])
    assert torch.allclose(ours, torch.tensor([lp for _, lp in whole.prefill[1:]]), atol=1e-5)
    assert last[0].choice.token_id == whole.choice.token_id


def test_a_seeded_sample_does_not_depend_on_chunking(tmp_path: Path) -> None:
    engine, vocab = _world(tmp_path, "mistral", caching=True)
    sampling = SamplingParams(do_sample=True, temperature=1.5, seed=11)
    requests = [replace(r, sampling=sampling) for r in _requests(vocab, [20, 6, 15], seed=3)]
    assert (
        drive(engine, requests, 8, arrivals=1).tokens
        == drive(engine, requests, 8, arrivals=1, chunk=3, first_batch_id=20).tokens
    )


@pytest.mark.parametrize("caching", [False, True])
def test_a_partially_prefilled_request_dropped_then_prefilled_again(tmp_path: Path, caching: bool) -> None:
    engine, vocab = _world(tmp_path, "llama", caching, kv_blocks=24)
    victim, neighbour = _requests(vocab, [30, 5], seed=4)  # 39 tokens on the base; 14 under "a"
    engine.prefill(1, [neighbour])
    engine.step([1], (2, [replace(victim, prefill_chunk=8)]), {})
    engine.step([1], None, {victim.request_id: 8})
    assert engine.members(1) == [neighbour.request_id, victim.request_id]
    engine.filter(1, [neighbour.request_id])  # preempted with 16 of its 39 tokens run: its blocks go back
    assert engine.stats()[0] == engine.runner.cache.allocator.blocks_for(len(neighbour.input_ids) + 2)
    engine.clear()
    assert engine.stats()[0] == 0
    again = drive(engine, [replace(victim, request_id=7)], NEW_TOKENS, chunk=8, first_batch_id=3)
    ref = drive(make_engine(tmp_path / "model", kv_blocks=24, prefix_caching=False), [victim], NEW_TOKENS)
    assert again.tokens[7] == ref.tokens[victim.request_id]
    assert again.cached[7] == (16 if caching else 0)  # the chunks it ran before the preemption, when cached


def test_chunks_that_name_unknown_or_decoding_requests_are_invalid_arguments(tmp_path: Path) -> None:
    engine, vocab = _world(tmp_path, "llama", caching=True)
    short, long = _requests(vocab, [2, 20], seed=5)
    engine.prefill(1, [short, replace(long, prefill_chunk=4)])
    with pytest.raises(StepError, match=r"not partially prefilled in these batches: \[0\]"):
        engine.step([1], None, {short.request_id: 3})
    with pytest.raises(StepError, match=r"\[99\]"):
        engine.step([1], None, {99: 3})
    with pytest.raises(StepError, match="repeats"):
        engine.step([1], (2, [replace(short, input_ids=[1, 2])]), {})
    assert engine.members(1) == [0, 1]  # refused steps change nothing
    server = serve(EngineServicer(engine, pb.InfoResponse(prefix_caching=True)), f"unix://{tmp_path}/shard.sock")
    try:
        with grpc.insecure_channel(f"unix://{tmp_path}/shard.sock") as channel:
            stub = pb_grpc.ShardStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=1)], chunks={0: 3}))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            resp = stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=1)], chunks={1: 4}))
            assert list(resp.batch.request_ids) == [0, 1] and [g.request_id for g in resp.generations] == [0]
            new = pb.Batch(id=5, requests=[pb.Request(id=8, input_ids=long.input_ids, prefill_chunk=30)])
            resp = stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=1)], chunks={1: 40}, new_batch=new))
            gens = {g.request_id: g for g in resp.generations}
            assert resp.batch.id == 1 and list(resp.batch.request_ids) == [0, 1, 8] and set(gens) == {0, 1, 8}
            # Request 8 is on the base, as ``short`` is, whose first 9 tokens it shares: 2 full blocks to
            # reuse; ``long`` holds all of them, but under adapter "a".
            assert gens[1].cached_tokens == 0 and gens[8].cached_tokens == 8
            health = stub.Health(pb.HealthRequest())
            assert health.prefix_hit_tokens == 8 and health.prefix_queried_tokens == 11 + 29 + 29
            assert health.prefix_cached_blocks > 0 and stub.Info(pb.InfoRequest()).prefix_caching
    finally:
        server.stop(None)


def test_chunks_and_cached_prefixes_keep_to_the_model_device(tmp_path: Path, generators: Generators) -> None:  # noqa: F811
    """The context path (chunks, a cached prefix, decodes beside them) on a stand-in GPU (fake tensors)."""
    mode = DeviceCheck(generators)
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=4, target_modules="all-linear")
    cpu = build_runner(tmp_path / "base", kv_blocks=32, block_size=4)
    thread = ModelThread()
    store = AdapterStore(cpu.model.full_config, dtype=cpu.model.dtype, device=DEVICE, pace=thread.between_steps)
    thread.call(store.load, "a", tmp_path / "a")
    thread.call(mode.__enter__)
    try:
        model = thread.call(cpu.model.to, DEVICE)
        config = model.config
        cache = thread.call(
            KVCache,
            config,
            32,
            4,
            num_kv_heads=config.num_kv_heads,
            dtype=model.dtype,
            device=DEVICE,
            prefix_caching=True,
        )
        engine = ShardEngine(ModelRunner(model, cache), store, thread)
        prompt = list(range(1, 15))
        engine.prefill(1, [NewRequest(1, prompt, "a", prefill_chunk=5), NewRequest(2, [3, 4, 5])])
        again = [
            NewRequest(3, prompt, "a", prefill_chunk=4),
            NewRequest(4, prompt, prefill_logprobs=True, prefill_chunk=6),
        ]
        engine.step([1], (2, again), {1: 5})
        _, gens = engine.step([1], None, {1: 5, 3: 20, 4: 20})
        assert {g.request_id for g in gens} == {1, 2, 3, 4}
        assert next(g.cached_tokens for g in gens if g.request_id == 3) == 4  # request 1's first block: its first chunk
        engine.decode([1])
    finally:
        thread.call(mode.__exit__, None, None, None)
        thread.stop()


def test_decode_steps_through_the_decode_graph_give_the_same_tokens(tmp_path: Path) -> None:
    """The runner's hook for a capturable decode: decode-only steps run there, the others eagerly, and the
    prefix cache still names the blocks the graph's steps filled."""
    from loraplex.shard.decode_graph import DecodeGraph

    engine, vocab = _world(tmp_path, "llama", caching=True)
    requests = _requests(vocab, [12, 3, 20], seed=6)
    eager = drive(engine, requests, 9, arrivals=1, chunk=6)
    engine.clear()
    runner = engine.runner
    runner.decode_graph = DecodeGraph(runner.model, runner.cache, max_batch=4, max_len=64, slots=4, mode="eager")
    graphed = drive(engine, [replace(r, request_id=r.request_id + 10) for r in requests], 9, arrivals=1, chunk=6)
    assert list(graphed.tokens.values()) == list(eager.tokens.values())
    assert runner.decode_graph._runners  # its buckets ran: decode-only steps went through it
    turn = requests[1].input_ids + graphed.tokens[11] + [4]
    follow = drive(engine, [NewRequest(30, turn, requests[1].adapter_id)], 1, first_batch_id=30)
    assert follow.cached[30] == (len(turn) - 2) // 4 * 4  # the answer's blocks, filled by graph steps, found


def _check_blocks(engine: ShardEngine) -> None:
    """Every block is exactly one of: free, cached and unused, or referenced once per live sequence holding it."""
    alloc = engine.runner.cache.allocator
    held: dict[int, int] = {}
    for batch in engine._batches.values():
        for e in batch:
            for block in e.seq.blocks:
                held[block] = held.get(block, 0) + 1
    unused = set(alloc.prefix.unused) if alloc.prefix is not None else set()
    free = set(alloc._free)
    assert len(free) == len(alloc._free) and not free & unused and not (free | unused) & set(held)
    assert len(free) + len(unused) + len(held) == alloc.num_blocks
    assert all(alloc.refs(b) == n for b, n in held.items()) and all(alloc.refs(b) == 0 for b in free | unused)


@pytest.mark.parametrize("seed", range(4))
def test_random_steps_keep_blocks_consistent_and_outputs_exact(tmp_path: Path, seed: int) -> None:
    """Arrivals, chunks, waits and preemptions at random over a small cache, prefix caching on: every step
    keeps the block accounting whole, and every finished request has the tokens of an uncached solo run."""
    engine, vocab = _world(tmp_path, "qwen2", caching=True, kv_blocks=40)
    rng = torch.Generator().manual_seed(seed)
    pool = _requests(vocab, [int(x) for x in torch.randint(1, 30, (10,), generator=rng)], seed=seed)
    pool += [replace(r, request_id=r.request_id + 10) for r in pool]
    # Adapters at random, so that requests of one adapter often join in the same step and share blocks there.
    pool = [replace(r, adapter_id=["", "a", "b"][int(torch.randint(3, (1,), generator=rng))]) for r in pool]
    want = 4
    tokens: dict[int, list[int]] = {}
    partial: set[int] = set()
    batch: int | None = None
    waiting, next_id, refusals = list(pool), 1, 0
    while waiting or batch is not None:
        roll = int(torch.randint(4, (1,), generator=rng))
        take = waiting[: roll % 3] if waiting else []
        waiting = waiting[len(take) :]
        if batch is None and not take:
            take, waiting = waiting[:1], waiting[1:]
        chunk = int(torch.randint(1, 9, (1,), generator=rng))
        new = (next_id, [replace(r, prefill_chunk=chunk) for r in take]) if take else None
        next_id += 1
        chunks = {rid: chunk for rid in partial if roll}  # roll 0: partial prompts wait this step
        try:
            batch, gens = engine.step([batch] if batch is not None else [], new, chunks)
        except KVCacheFull:  # refused whole: as the router does, take nobody new, or preempt the newest
            _check_blocks(engine)
            waiting[:0] = take
            if not take:
                assert batch is not None
                members = engine.members(batch)
                partial.discard(members[-1])
                waiting.insert(0, next(r for r in pool if r.request_id == members[-1]))
                engine.filter(batch, members[:-1])
                batch = batch if len(members) > 1 else None
            refusals += 1
            continue
        for r in take:
            partial.add(r.request_id)
            tokens[r.request_id] = []
        for g in gens:
            partial.discard(g.request_id)
            tokens[g.request_id].append(g.choice.token_id)
        members = engine.members(batch)
        keep = [rid for rid in members if len(tokens[rid]) < want]
        if roll == 3 and len(keep) > 1:  # preempt the newest: it starts again later, from its prompt
            victim = keep.pop()
            partial.discard(victim)
            waiting.insert(0, next(r for r in pool if r.request_id == victim))
        if keep != members:
            engine.filter(batch, keep)
        if not keep:
            batch = None
        _check_blocks(engine)
    reference = make_engine(tmp_path / "model", kv_blocks=40, prefix_caching=False)
    for name in ("a", "b"):
        reference.store.load(name, tmp_path / name)
    for r in pool:
        solo = drive(reference, [r], want, first_batch_id=1000 + r.request_id)
        assert tokens[r.request_id] == solo.tokens[r.request_id], r.request_id
    assert engine.prefix_stats()[1] > 0
    print(f"seed {seed}: {next_id - 1} steps, {refusals} refused, {engine.prefix_stats()} prefix stats")


def test_a_new_batch_that_fails_leaves_the_running_batches_as_they_were(tmp_path: Path) -> None:
    """A Decode carrying a new batch that cannot run (an adapter not loaded, no room) changes nothing: the
    router fails or requeues the newcomers and runs the step again without them."""
    engine, vocab = _world(tmp_path, "llama", caching=True, kv_blocks=12)
    running, other = _requests(vocab, [8, 30], seed=7)
    expected = drive(engine, [running], 4).tokens[running.request_id]
    engine.clear()
    _, gens = engine.step([], (1, [running]), {})
    tokens = [g.choice.token_id for g in gens]
    before = engine.stats()
    with pytest.raises(AdapterError, match="not loaded"):
        engine.step([1], (2, [replace(other, adapter_id="missing")]), {})
    with pytest.raises(KVCacheFull):
        engine.step([1], (3, [replace(other, request_id=5)]), {})  # 39 tokens: 10 blocks, 7 free
    assert engine.stats() == before and engine.members(1) == [running.request_id]
    for _ in range(3):
        tokens += [g.choice.token_id for g in engine.step([1])[1]]
    assert tokens == expected


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_requests_joining_one_step_share_the_blocks_filled_in_it(tmp_path: Path, kind: str) -> None:
    """Same adapter, same start, one step: each later request points at the blocks earlier ones fill in that
    very step (chunks included) and runs its next tokens instead; another adapter shares nothing."""
    engine, vocab = _world(tmp_path, kind, caching=True)
    gen = torch.Generator().manual_seed(9)
    start = torch.randint(vocab, (30,), generator=gen).tolist()
    tails = [torch.randint(vocab, (3,), generator=gen).tolist() for _ in range(4)]
    requests = [NewRequest(i, start + tails[i], "" if i == 3 else "a") for i in range(4)]
    run = drive(engine, requests, NEW_TOKENS, chunk=12)
    # 0 fills blocks 0-2; 1 points at them and fills 3-5; 2 points at all six and fills 6-7 (32 tokens: the
    # last full block before its last token); 3, on the base, finds nothing.
    assert run.cached == {0: 0, 1: 12, 2: 24, 3: 0}
    reference = make_engine(tmp_path / "model", kv_blocks=128, prefix_caching=False)
    reference.store.load("a", tmp_path / "a")
    assert run.tokens == drive(reference, requests, NEW_TOKENS, chunk=12).tokens
    assert engine.prefix_stats()[1] == 36
