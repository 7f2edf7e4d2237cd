"""Adapters' stacks kept across plans: copied once, reused by later plans, never stale, freed on forget."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter, ProjectionWeights
from loraplex.shard.lora.roots import AdapterRoots
from loraplex.shard.lora.stack_pool import StackPool
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.lora.torch_plan import TorchLoraPlan
from loraplex.shard.projections import PROJECTIONS, SITES
from loraplex.shard.runner import ModelRunner, SequenceState, build_runner
from tests.factories import tiny_model, write_raw_adapter

CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
ALL = tuple(PROJECTIONS)
N = len(SITES)  # slot writes per adapter with weights at every site


def adapter(seed: int, rank: int = 4, targets: tuple[str, ...] = ALL) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    projections = {}
    for name in targets:
        n_in, n_out = PROJECTIONS[name].shape(CONFIG)
        a = torch.randn(CONFIG.num_layers, n_in, rank, generator=gen)
        b = torch.randn(CONFIG.num_layers, rank, n_out, generator=gen)
        projections[name] = ProjectionWeights(a, b, dict.fromkeys(range(CONFIG.num_layers), rank))
    return LoraAdapter(f"a{seed}", projections, 0)


def expected(rows: list[LoraAdapter | None], site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Each row's delta from its adapter's own weights, in float64, one row at a time."""
    projs = SITES[site]
    out = torch.zeros(len(rows), sum(p.shape(CONFIG)[1] for p in projs), dtype=torch.float64)
    for i, a in enumerate(rows):
        col = 0
        for p in projs:
            width = p.shape(CONFIG)[1]
            if a is not None and p.name in a.projections:
                w = a.projections[p.name]
                out[i, col : col + width] = x[i].double() @ w.a[layer].double() @ w.b[layer].double()
            col += width
    return out


def assert_plan_right(plan: TorchLoraPlan, rows: list[LoraAdapter | None], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for site, projs in SITES.items():
        x = torch.randn(len(rows), projs[0].shape(CONFIG)[0], generator=gen)
        for layer in range(CONFIG.num_layers):
            y = torch.zeros(len(rows), sum(p.shape(CONFIG)[1] for p in projs))
            plan.apply(site, layer, x, y)
            want = expected(rows, site, layer, x)
            torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
            base = [i for i, a in enumerate(rows) if a is None]
            assert torch.equal(y[base], torch.zeros_like(y[base]))  # rows without adapter: untouched


def test_a_plan_copies_only_the_adapters_new_to_the_pool() -> None:
    adapters = [adapter(i) for i in range(6)]
    pool = StackPool()
    rows: list[LoraAdapter | None] = [adapters[0], None, adapters[1], adapters[2]]
    assert_plan_right(TorchLoraPlan(rows, CONFIG, pool=pool), rows)
    assert pool.slot_writes == 3 * N
    bytes_of_three = pool.nbytes
    rows = [adapters[3], adapters[2], adapters[0], adapters[1], None]  # one more, and reordered
    assert_plan_right(TorchLoraPlan(rows, CONFIG, pool=pool), rows)
    assert pool.slot_writes == 4 * N
    rows = [adapters[1], adapters[3]]  # fewer: nothing to copy
    assert_plan_right(TorchLoraPlan(rows, CONFIG, pool=pool), rows)
    assert pool.slot_writes == 4 * N
    assert pool.nbytes >= bytes_of_three > 0
    private = TorchLoraPlan(rows, CONFIG)  # no pool: copies of its own, as before pools
    assert_plan_right(private, rows)
    assert pool.slot_writes == 4 * N


def test_long_segments_run_on_the_adapters_own_weights() -> None:
    a, b, c = adapter(0), adapter(1), adapter(2)
    rows: list[LoraAdapter | None] = [a, b] + [c] * 40 + [None, a] + [b] * 3
    pool = StackPool()
    plan = TorchLoraPlan(rows, CONFIG, pool=pool)
    assert_plan_right(plan, rows)
    assert pool.slot_writes == 2 * N and pool.conversions == 0  # c's 40 rows are a GEMM of their own: no copy
    solo = [s for s in plan._solo["qkv"]]
    assert len(solo) == 1 and solo[0].parts[0][0] is c.projections["q_proj"].a
    converted = TorchLoraPlan(rows, CONFIG, torch.float64, pool=pool)  # another dtype: converted once, kept
    assert (pool.slot_writes, pool.conversions) == (4 * N, 1)
    TorchLoraPlan(rows, CONFIG, torch.float64, pool=pool)
    assert (pool.slot_writes, pool.conversions) == (4 * N, 1)
    assert converted._solo["qkv"][0].parts[0][0].dtype == torch.float64


def test_many_long_segments_are_stacked_for_the_plan_alone() -> None:
    # A step of many prompts: their segments are copied into the plan's own stacks (one bmm per site),
    # not into the pool, and not run one by one; ranks differ, so some chunks are padded.
    prompts = [adapter(i, rank=4 if i % 2 else 3) for i in range(5)]
    decodes = [adapter(10 + i) for i in range(3)]
    rows: list[LoraAdapter | None] = list(decodes)
    for i, a in enumerate(prompts):
        rows += [a] * (17 + 9 * i) + [None]
    pool = StackPool()
    plan = TorchLoraPlan(rows, CONFIG, pool=pool)
    assert pool.slot_writes == 3 * N and not plan._solo["qkv"]
    assert len(plan._stacked["qkv"]) == 2  # the decode rows' bank, and the prompts' (ranks 3 padded to 4)
    assert_plan_right(plan, rows)


@pytest.mark.parametrize("seed", range(4))
def test_a_ramp_up_of_changing_batches_matches_the_adapters_weights(seed: int) -> None:
    # Chunked prefill's ramp-up: decode rows join a few at a time and leave, prompt chunks come and go,
    # ranks and targets differ (several banks), and slots are taken over once the pool is short of room.
    rnd = random.Random(seed)
    kinds = [(4, ALL), (2, ("q_proj", "v_proj", "down_proj")), (3, ALL), (8, ("o_proj", "gate_proj"))]
    adapters = [adapter(i, *kinds[i % len(kinds)]) for i in range(16)]
    pool = StackPool()
    decoding: list[int] = []
    for step in range(12):
        if decoding and rnd.random() < 0.3:
            decoding.remove(rnd.choice(decoding))
        waiting = [i for i in range(16) if i not in decoding]
        joining = rnd.sample(waiting, min(len(waiting), rnd.randint(1, 3)))
        prompt = rnd.sample(range(16), 2)
        rows: list[LoraAdapter | None] = [adapters[i] for i in decoding] + [None]
        rows += [adapters[prompt[0]]] * rnd.randint(1, 30) + [adapters[prompt[1]]] * rnd.randint(1, 30)
        if seed % 2:  # else decode rows first, as the engine orders a step: their results go back as a run
            rnd.shuffle(rows)
        before = pool.slot_writes
        plan = TorchLoraPlan(rows, CONFIG, pool=pool, reuse=step % 2 == 0)
        assert_plan_right(plan, rows, seed=step)
        assert pool.slot_writes - before <= N * len({id(a) for a in rows if a is not None})
        decoding += joining


def test_a_decode_plan_puts_its_slots_in_row_order_once() -> None:
    # Rows in another order than their slots cost an index_select in and out at every site of every step:
    # a plan that decode steps reuse moves the misplaced slots instead, once.
    pool = StackPool()
    a, b, c, d = (adapter(i) for i in range(4))
    first = TorchLoraPlan([a, b, c, d], CONFIG, pool=pool)
    writes = pool.slot_writes
    rows: list[LoraAdapter | None] = [a, d, b, c]
    one_step = TorchLoraPlan(rows, CONFIG, pool=pool, reuse=False)
    assert pool.slot_writes == writes and not first.stale
    assert not one_step._stacked["qkv"][0].layout.identity
    assert_plan_right(one_step, rows)
    decode = TorchLoraPlan(rows, CONFIG, pool=pool)
    assert pool.slot_writes == writes + 3 * N  # d, b and c moved; a stays
    assert first.stale and decode._stacked["qkv"][0].layout.identity
    assert_plan_right(decode, rows)
    assert_plan_right(TorchLoraPlan([d, b], CONFIG, pool=pool), [d, b])
    assert pool.slot_writes == writes + 3 * N


def test_idle_slots_inside_a_plans_run_may_hold_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    # Slots read for nothing (a gone adapter's, between two live ones) are never added to any row, so the
    # pool need not clear them: poison what the pool allocates and the deltas must stay right.
    real_empty = torch.empty

    def poisoned(*shape: int, **kw: object) -> torch.Tensor:
        return real_empty(*shape, **kw).fill_(float("nan"))  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(torch, "empty", poisoned)
    pool = StackPool()
    adapters = [adapter(i) for i in range(5)]
    TorchLoraPlan(adapters, CONFIG, pool=pool)
    gone = adapters.pop(2)
    del gone
    pool.forget()
    rows: list[LoraAdapter | None] = [adapters[3], None, adapters[0], adapters[1], adapters[2]]
    plan = TorchLoraPlan(rows, CONFIG, pool=pool, reuse=False)
    assert plan._stacked["qkv"][0].layout.num_chunks == 5  # the run still holds the idle slot
    assert_plan_right(plan, rows)


def test_a_plan_whose_slots_were_taken_over_refuses_to_run() -> None:
    pool = StackPool()
    a, b, c = adapter(0), adapter(1), adapter(2)
    first = TorchLoraPlan([a, b], CONFIG, pool=pool)
    second = TorchLoraPlan([c, b], CONFIG, pool=pool)  # full pool: c takes a's slot, not in this batch
    assert first.stale and not second.stale
    x = torch.randn(2, CONFIG.hidden_size)
    with pytest.raises(RuntimeError, match="reused"):
        first.apply("qkv", 0, x, torch.zeros(2, CONFIG.q_size + 2 * CONFIG.kv_size))
    assert_plan_right(second, [c, b])
    assert_plan_right(TorchLoraPlan([a, c], CONFIG, pool=pool), [a, c])  # a comes back: copied again


def test_forget_frees_the_slots_of_adapters_that_are_gone_and_of_unused_banks() -> None:
    pool = StackPool()
    a, b = adapter(0), adapter(1, rank=2)  # different ranks: different banks
    TorchLoraPlan([a, b], CONFIG, pool=pool)
    both = pool.nbytes
    TorchLoraPlan([b], CONFIG, pool=pool)
    assert pool.nbytes == both  # kept while no one asks
    pool.forget()
    assert 0 < pool.nbytes < both and pool.live_slots() == len(SITES)  # a's banks: unused by the latest plan
    del b
    pool.forget()
    assert pool.nbytes == 0 and pool.live_slots() == 0


@pytest.fixture
def served(tmp_path: Path) -> tuple[ModelRunner, AdapterStore, Path]:
    tiny_model(tmp_path / "model", "llama")
    for i in range(4):
        write_raw_adapter(tmp_path / "root" / f"a{i}", tmp_path / "model", rank=4, targets=ALL, seed=i)
    runner = build_runner(tmp_path / "model", kv_blocks=64, block_size=4)
    store = AdapterStore(
        runner.model.config, dtype=torch.float32, roots=AdapterRoots([tmp_path / "root"]), on_evict=runner.forget_plan
    )
    return runner, store, tmp_path


def test_runner_steps_share_the_pool_and_unloading_frees_it(served: tuple[ModelRunner, AdapterStore, Path]) -> None:
    runner, store, _ = served
    names = ["a0", "a1", "a2"]
    for name in names:
        store.load(name)
    adapters = store.acquire(names, pinned=set())
    seqs = [SequenceState(i, [3 + i] * (20 + 4 * i), adapters[n]) for i, n in enumerate(names)]
    runner.step([(seqs[0], 20)])  # the first prompt alone: a long segment, nothing stacked
    assert runner.lora_stacks.slot_writes == 0
    seqs[0].token_ids.append(1)
    runner.step([(seqs[0], 1), (seqs[1], 24)])  # a decode row (a0 stacked) beside a prompt
    for s in seqs[:2]:
        s.token_ids.append(1)
    runner.step([(seqs[0], 1), (seqs[1], 1), (seqs[2], 28)])
    for s in seqs:
        s.token_ids.append(1)
    assert runner.lora_stacks.slot_writes == 2 * N
    runner.decode(seqs)
    assert runner.lora_stacks.slot_writes == 3 * N  # only a2 was new to the stacks
    for s in seqs:
        runner.release(s)
    del seqs, adapters, s  # the last references to the adapters but the store's
    for name in names:
        store.unload(name)  # on_evict: the runner's forget_plan
    assert runner.lora_stacks.nbytes == 0


def test_a_reloaded_adapter_gets_its_new_weights_stacked(served: tuple[ModelRunner, AdapterStore, Path]) -> None:
    runner, store, tmp_path = served

    def decode_logits(pair: list[str]) -> torch.Tensor:
        adapters = store.acquire(pair, pinned=set())
        seqs = [SequenceState(i, [5, 6 + i, 7], adapters[n]) for i, n in enumerate(pair)]
        runner.prefill(seqs)
        for s in seqs:
            s.token_ids.append(2)
        out = runner.decode(seqs)
        for s in seqs:
            runner.release(s)
        return out

    store.load("a0")
    store.load("a1")
    first = decode_logits(["a0", "a1"])
    writes = runner.lora_stacks.slot_writes
    store.load("a0", tmp_path / "root" / "a3")  # same id, a3's weights: a new adapter object, a new serial
    again = decode_logits(["a0", "a1"])
    assert runner.lora_stacks.slot_writes == writes + N
    assert not torch.allclose(again[0], first[0]) and torch.allclose(again[1], first[1], atol=1e-5)
    store.unload("a0")
    store.load("a0", tmp_path / "root" / "a0")
    torch.testing.assert_close(decode_logits(["a0", "a1"]), first, rtol=1e-5, atol=1e-5)
