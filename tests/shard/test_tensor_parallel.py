"""Tensor parallelism over two real processes (gloo): same logits and tokens as one rank, base and LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from loraplex.shard.engine import NewRequest, ShardEngine
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.model_thread import ModelThread
from loraplex.shard.parallel import ParallelError, TensorParallel, init_tensor_parallel, rank_device
from loraplex.shard.runner import SequenceState, build_runner
from tests.factories import make_adapter, tiny_model
from tests.servers import free_port
from tests.shard.conftest import drive

RANKS = [1, 3, 5, 16, 64]
TARGETS: list[Any] = [
    ["q_proj", "v_proj"],
    "all-linear",
    ["o_proj", "down_proj"],
    ["k_proj", "gate_proj"],
    "all-linear",
]
PROMPTS = [[3, 9, 4], [7, 1, 8, 2, 6, 5, 11], [12], [5, 5, 5, 5, 9], [2, 4, 6, 8, 10, 12]]


def run_rank(rank: int, world: int, port: int, model_dir: Path, adapters: list[Path], out: Path) -> None:
    """What one rank does: load its slice, run a mixed batch, write its logits and tokens."""
    torch.set_num_threads(1)
    tp = init_tensor_parallel(rank, world, f"tcp://127.0.0.1:{port}") if world > 1 else TensorParallel()
    runner = build_runner(model_dir, kv_blocks=128, block_size=4, tp=tp)
    store = AdapterStore(runner.model.full_config, dtype=torch.float32, tp=tp)
    loaded = [store.load(f"a{i}", d) for i, d in enumerate(adapters)]
    rows = [None, *loaded]
    seqs = [SequenceState(i, list(p), rows[i % len(rows)]) for i, p in enumerate(PROMPTS * 2)]
    logits = [runner.prefill(seqs, all_logits=True)]
    for step in range(4):
        for s in seqs:
            s.token_ids.append((step * 7 + s.request_id) % 50)
        logits.append(runner.decode(seqs))
    for s in seqs:
        runner.release(s)
    tokens = runner.generate_greedy([(list(p), rows[i % len(rows)]) for i, p in enumerate(PROMPTS * 2)], 8)
    result = {"logits": logits, "tokens": tokens, "sharded_bytes": runner.model.sharded_weight_bytes}
    result["served"] = _serve_engine(model_dir, adapters, tp)
    torch.save(result, out / f"rank{rank}-of-{world}.pt")
    if tp.distributed:
        torch.distributed.destroy_process_group()


def _serve_engine(model_dir: Path, adapters: list[Path], tp: TensorParallel) -> dict[str, Any]:
    """Long prompts with a shared start under mixed adapters, through the engine with prefix caching on and
    off, whole and in chunks, twice (the second round finds the first's blocks): tokens and cached counts."""
    served: dict[str, Any] = {}
    names = ["", *(f"a{i}" for i in range(len(adapters)))]
    shared = [(7 * i + 3) % 50 for i in range(13)]
    requests = [
        NewRequest(i, shared + [(5 * i + j) % 50 for j in range(3 + 4 * i)], names[i % len(names)]) for i in range(6)
    ]
    for caching in (False, True):
        runner = build_runner(model_dir, kv_blocks=128, block_size=4, tp=tp, prefix_caching=caching)
        model = ModelThread()
        store = AdapterStore(runner.model.full_config, dtype=torch.float32, tp=tp, pace=model.between_steps)
        engine = ShardEngine(runner, store, model)
        for name, directory in zip(names[1:], adapters, strict=True):
            store.load(name, directory)
        for chunk in (0, 5):
            runs = [drive(engine, requests, 4, chunk=chunk, arrivals=2, first_batch_id=10 * k + 1) for k in range(2)]
            served[f"{caching}-{chunk}"] = [(r.tokens, r.cached) for r in runs]
            engine.clear()
    return served


def _spawn_ranks(rank: int, world: int, port: int, model_dir: Path, adapters: list[Path], out: Path) -> None:
    run_rank(rank, world, port, model_dir, adapters, out)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama_biases"])  # qwen2: one KV head on both ranks; biases
def test_two_ranks_equal_one_rank(tmp_path: Path, kind: str) -> None:
    base = tiny_model(tmp_path / "model", kind)
    adapters = [
        make_adapter(base, tmp_path / f"r{r}", seed=r, r=r, lora_alpha=2 * r + 1, target_modules=t)
        for r, t in zip(RANKS, TARGETS, strict=True)
    ]
    run_rank(0, 1, 0, tmp_path / "model", adapters, tmp_path)
    mp.spawn(_spawn_ranks, args=(2, free_port(), tmp_path / "model", adapters, tmp_path), nprocs=2, join=True)
    one = torch.load(tmp_path / "rank0-of-1.pt", weights_only=True)
    two = [torch.load(tmp_path / f"rank{r}-of-2.pt", weights_only=True) for r in range(2)]
    for a, b in zip(one["logits"], two[0]["logits"], strict=True):
        assert float((a - b).norm() / a.norm()) < 1e-5  # float32 rounding: partial sums add in another order
    assert two[0]["tokens"] == two[1]["tokens"] == one["tokens"]
    # Prefix caching and chunked prefill: the same tokens everywhere, and every rank reuses the same blocks.
    assert two[0]["served"] == two[1]["served"] == one["served"]
    served = one["served"]
    reference = served["False-0"][0][0]
    assert all(tokens == reference for runs in served.values() for tokens, _ in runs)
    assert sum(served["True-0"][1][1].values()) > 0 and sum(served["False-5"][1][1].values()) == 0
    assert len({tuple(t) for t in one["tokens"]}) > 4
    for r in range(2):
        share = two[r]["sharded_bytes"] / one["sharded_bytes"]
        print(f"{kind}: rank {r} of 2 holds {two[r]['sharded_bytes']} of {one['sharded_bytes']} bytes ({share:.3f})")
        if kind == "qwen2":  # the one KV head is replicated, so each rank holds a little more than half
            assert 0.5 < share < 0.6
        else:
            assert share == 0.5


def test_shapes_that_do_not_split_are_refused(tmp_path: Path) -> None:
    tiny_model(tmp_path, "llama_tied_linear")  # 6 heads
    with pytest.raises(ParallelError, match="6 attention heads cannot be split evenly over 4"):
        build_runner(tmp_path, tp=TensorParallel(rank=0, world=4))


@pytest.mark.parametrize(
    ("device", "rank", "world", "expected"),
    [("cuda", 1, 2, "cuda:1"), ("cuda", 0, 1, "cuda"), ("cuda:3", 1, 2, "cuda:3"), ("cpu", 1, 2, "cpu")],
)
def test_each_rank_gets_its_own_gpu_unless_told_otherwise(device: str, rank: int, world: int, expected: str) -> None:
    assert rank_device(device, rank, world) == expected
