"""The capturable decode step against the runner's eager decode: eager, compiled (fullgraph) and CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.shard.decode_graph import DecodeGraph, buckets_up_to
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import ModelRunner, SequenceState, build_runner
from tests.factories import make_adapter, tiny_model

PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12, 13]]


def _setup(tmp_path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[ModelRunner, list]:
    base = tiny_model(tmp_path / "base", "llama")
    make_adapter(base, tmp_path / "a", r=4, target_modules="all-linear")
    make_adapter(base, tmp_path / "b", seed=1, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    make_adapter(base, tmp_path / "c", seed=2, r=8, target_modules=["o_proj", "gate_proj"])
    runner = build_runner(tmp_path / "base", dtype=dtype, device=device, kv_blocks=64, block_size=4)
    runner.decode_lora_dtype = None  # the adapters' own dtype, as the slot stacks hold them
    store = AdapterStore(runner.model.full_config, dtype=dtype, device=device)
    for name in "abc":
        store.load(name, tmp_path / name)
    adapters = store.acquire(list("abc"), pinned=set())
    return runner, [adapters["a"], None, adapters["b"], adapters["c"]]


def _prefilled(runner: ModelRunner, adapters: list[LoraAdapter | None]) -> list[SequenceState]:
    seqs = [SequenceState(i, list(p), a) for i, (p, a) in enumerate(zip(PROMPTS, adapters, strict=True))]
    for s, t in zip(seqs, runner.prefill(seqs).argmax(-1).tolist(), strict=True):
        s.token_ids.append(t)
    return seqs


def _decode_both(runner: ModelRunner, adapters: list, graph: DecodeGraph, steps: int, rows: list[int]) -> None:
    eager, graphed = _prefilled(runner, adapters), _prefilled(runner, adapters)
    for _ in range(steps):  # crosses KV block boundaries (block size 4)
        want = runner.decode([eager[i] for i in rows])
        got = graph.decode([graphed[i] for i in rows])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
        for i, t in zip(rows, want.argmax(-1).tolist(), strict=True):
            eager[i].token_ids.append(t)
            graphed[i].token_ids.append(t)
    for s in eager + graphed:
        runner.release(s)


def test_graph_step_equals_eager_decode_with_mixed_adapters_and_padding(tmp_path: Path) -> None:
    runner, adapters = _setup(tmp_path)
    graph = DecodeGraph(runner.model, runner.cache, max_batch=4, max_len=32, slots=2, max_rank=8, mode="eager")
    _decode_both(runner, adapters, graph, steps=5, rows=[0, 1, 2])  # 3 rows run padded to the 4-row bucket
    _decode_both(runner, adapters, graph, steps=2, rows=[3, 1])  # a third adapter evicts one of the two slots
    _decode_both(runner, adapters, graph, steps=2, rows=[2, 0, 1])  # and the evicted one comes back
    assert len(graph._slot_of) == 2


@pytest.mark.slow  # about a minute of compiling on two cores
def test_decode_step_compiles_with_fullgraph_and_equals_eager(tmp_path: Path) -> None:
    runner, adapters = _setup(tmp_path)
    graph = DecodeGraph(runner.model, runner.cache, max_batch=4, max_len=32, slots=4, max_rank=8, mode="compile")
    _decode_both(runner, adapters, graph, steps=3, rows=[0, 1, 2, 3])  # torch.compile(fullgraph=True) raises on a break


def test_the_graph_names_what_it_cannot_run(tmp_path: Path) -> None:
    runner, adapters = _setup(tmp_path)
    graph = DecodeGraph(runner.model, runner.cache, max_batch=2, max_len=16, slots=4, max_rank=4, mode="eager")
    seqs = _prefilled(runner, adapters)
    assert not graph.fits(seqs)  # 4 rows > 2
    assert not graph.fits(seqs[3:])  # rank 8 > 4
    with pytest.raises(ValueError, match="does not fit"):
        graph.step(seqs[3:])
    with pytest.raises(ValueError, match="ranks"):
        graph.lora.load(0, adapters[3])
    assert buckets_up_to(6) == (1, 2, 4, 6) and buckets_up_to(1) == (1,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (scripts/gpu_check.sh)")
def test_cuda_graphs_equal_eager_decode_on_the_gpu(tmp_path: Path) -> None:
    runner, adapters = _setup(tmp_path, "cuda", torch.bfloat16)
    graph = DecodeGraph(runner.model, runner.cache, max_batch=4, max_len=32, slots=2, max_rank=8, mode="graph")
    eager = DecodeGraph(runner.model, runner.cache, max_batch=4, max_len=32, slots=2, max_rank=8, mode="eager")
    for rows in ([0, 1, 2], [3, 0, 1, 2]):  # the second batch changes slot contents under a captured graph
        a, b = _prefilled(runner, adapters), _prefilled(runner, adapters)
        for _ in range(4):
            want = eager.decode([a[i] for i in rows])
            got = graph.decode([b[i] for i in rows])
            assert float((got - want).norm() / want.norm()) < 1e-2
            for i, t in zip(rows, want.argmax(-1).tolist(), strict=True):
                a[i].token_ids.append(t)
                b[i].token_ids.append(t)
