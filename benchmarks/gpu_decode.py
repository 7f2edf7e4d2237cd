"""Decode on the GPU with Llama-3-8B's shapes (random bf16 weights made on the device): base vs 64 distinct
rank-8 q/k/v/o adapters, eager and CUDA-graphed (``shard/decode_graph.py``), side by side in one run.

Run (NVIDIA GPU, CuPy): ``python3 benchmarks/gpu_decode.py [--json out.json]``.
- step ratios: base step time / mixed step time (a throughput ratio; target >= 0.9 graphed on an H200);
- served: tokens per second through the shard engine (its model thread, metadata, sampling; eager decode,
  no router), mixed / base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kernels_gpu import copy_bandwidth, gpu_arguments
from loraplex.shard.config import ModelConfig
from loraplex.shard.decode_graph import DecodeGraph
from loraplex.shard.kv_cache import KVCache
from loraplex.shard.lora.adapter import LoraAdapter, ProjectionWeights
from loraplex.shard.model import CausalLM
from loraplex.shard.projections import PROJECTIONS
from loraplex.shard.runner import ModelRunner, SequenceState

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPT = 128


def random_adapter(config: ModelConfig, rank: int, targets: tuple[str, ...], seed: int) -> LoraAdapter:
    """An adapter built straight on the device (A transposed, as the kernels read it)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    projections = {}
    for proj in targets:
        in_f, out_f = PROJECTIONS[proj].shape(config)
        a_t = (torch.randn(config.num_layers, rank, in_f, generator=gen, device="cuda") / in_f**0.5).bfloat16()
        b = (torch.randn(config.num_layers, rank, out_f, generator=gen, device="cuda") * 0.01).bfloat16()
        projections[proj] = ProjectionWeights(a_t.transpose(1, 2), b, dict.fromkeys(range(config.num_layers), rank))
    nbytes = sum(p.a.nbytes + p.b.nbytes for p in projections.values())
    return LoraAdapter(f"r{rank}-{seed}", projections, nbytes).with_site_shrinks()


def step_seconds(step: Any, runner: ModelRunner, adapters: list[LoraAdapter | None], steps: int) -> float:
    """Median seconds of one decode step (``step(seqs)``) over a batch with 128-token prompts."""
    seqs = [SequenceState(i, [(7 * i + j) % 32000 for j in range(PROMPT)], a) for i, a in enumerate(adapters)]
    runner.prefill(seqs)
    times = []
    for n in range(steps + 2):
        for s in seqs:
            s.token_ids.append(n + 1)
        torch.cuda.synchronize()
        start = time.perf_counter()  # host clock after a sync: host-bound steps count their host time
        step(seqs)
        torch.cuda.synchronize()
        if n >= 2:  # the first steps capture graphs
            times.append(time.perf_counter() - start)
    for s in seqs:
        runner.release(s)
    return statistics.median(times)


def served_tokens_per_second(runner: ModelRunner, adapter_dirs: list[Path | None], steps: int) -> float:
    """Tokens per second through ShardEngine (model thread, adapter store, metadata, greedy choice): prefill,
    then ``steps`` decode calls of the whole batch."""
    from loraplex.shard.engine import NewRequest, ShardEngine
    from loraplex.shard.lora.store import AdapterStore
    from loraplex.shard.model_thread import ModelThread

    thread = ModelThread(device="cuda")
    store = AdapterStore(
        runner.model.full_config, dtype=torch.bfloat16, device="cuda", max_active=len(adapter_dirs),
        pace=thread.between_steps,
    )  # fmt: skip
    names = []
    for i, d in enumerate(adapter_dirs):
        if d is not None:
            store.load(f"a{i}", d)
        names.append(f"a{i}" if d is not None else "")
    requests = [NewRequest(i, [(7 * i + j) % 32000 for j in range(PROMPT)], n) for i, n in enumerate(names)]
    engine = ShardEngine(runner, store, thread)
    try:
        engine.prefill(1, requests)
        engine.decode([1])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.decode([1])
        torch.cuda.synchronize()
        return steps * len(requests) / (time.perf_counter() - start)
    finally:
        engine.clear()
        thread.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-served", action="store_true", help="skip the engine's end-to-end figure")
    args = gpu_arguments(parser)
    if args is None:
        return 2
    config = ModelConfig.from_dict(LLAMA_8B)
    model = CausalLM.random(config, torch.bfloat16, "cuda")
    max_len = PROMPT + args.steps + 16
    blocks = 3 * args.batch * (-(-max_len // 16)) + 8
    cache = KVCache(config, blocks, 16, num_kv_heads=config.num_kv_heads, dtype=torch.bfloat16, device="cuda")
    runner = ModelRunner(model, cache)
    mixed: list[LoraAdapter | None] = [random_adapter(config, 8, ATTENTION, seed=i) for i in range(args.batch)]
    base: list[LoraAdapter | None] = [None] * args.batch
    base_graph = DecodeGraph(model, cache, max_batch=args.batch, max_len=max_len, targets=(), mode="graph")
    lora_graph = DecodeGraph(
        model, cache, max_batch=args.batch, max_len=max_len, slots=args.batch, max_rank=8, targets=ATTENTION
    )
    copy = copy_bandwidth()
    cases = {
        "eager base": (runner.decode, base),
        "eager mixed": (runner.decode, mixed),
        "graph base": (base_graph.decode, base),
        "graph mixed": (lora_graph.decode, mixed),
    }
    rounds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(3):  # interleaved, so drift hits every case alike
        for name, (step, adapters) in cases.items():
            rounds[name].append(step_seconds(step, runner, adapters, args.steps))
    t = {k: statistics.median(v) for k, v in rounds.items()}
    adapter_mb = sum(p.a.nbytes + p.b.nbytes for p in mixed[0].projections.values()) / 1e6 if mixed[0] else 0
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "batch": args.batch,
        "copy_gbs": round(copy / 1e9, 1),
        "adapter_mb": round(adapter_mb, 1),
        **{f"{k.replace(' ', '_')}_ms": round(v * 1e3, 3) for k, v in t.items()},
        "eager_ratio": round(t["eager base"] / t["eager mixed"], 3),
        "graph_ratio": round(t["graph base"] / t["graph mixed"], 3),
        "graph_speedup_base": round(t["eager base"] / t["graph base"], 2),
    }
    if not args.no_served:
        from loraplex.bench.adapters import write_adapter

        with tempfile.TemporaryDirectory() as tmp:
            dirs: list[Path | None] = [
                write_adapter(Path(tmp) / f"a{i}", config, 8, ATTENTION, seed=i) for i in range(args.batch)
            ]
            base_tps = served_tokens_per_second(runner, [None] * args.batch, args.steps)
            mixed_tps = served_tokens_per_second(runner, dirs, args.steps)
            result.update(served_base_tps=round(base_tps, 1), served_mixed_tps=round(mixed_tps, 1))
            result["served_ratio"] = round(mixed_tps / base_tps, 3)
            try:  # the same through graphed decode (one graph object per case, as adapters differ)
                base_runner, lora_runner = ModelRunner(model, cache), ModelRunner(model, cache)
                base_runner.decode_graph, lora_runner.decode_graph = base_graph, lora_graph
                g_base = served_tokens_per_second(base_runner, [None] * args.batch, args.steps)
                g_mixed = served_tokens_per_second(lora_runner, dirs, args.steps)
                result.update(served_graph_base_tps=round(g_base, 1), served_graph_mixed_tps=round(g_mixed, 1))
                result["served_graph_ratio"] = round(g_mixed / g_base, 3)
            except Exception as exc:  # reported, never a made-up figure
                result["served_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
