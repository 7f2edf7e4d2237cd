"""Decode throughput on the GPU with Mistral-7B's shapes (random bf16 weights made on the device), base
only vs 64 distinct adapters, side by side in one run.

Run (NVIDIA GPU, CuPy): ``python3 benchmarks/gpu_decode.py [--json out.json]``.
- b: 64 distinct rank-8 adapters on q/k/v/o (the shape of LoRA Land's adapters, 13.6 MB each in bf16);
  target: throughput >= 0.85 x base.
- c: 64 distinct rank-16 adapters on all seven projections; reported next to its memory-bandwidth floor
  (base step + adapter bytes / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kernels_gpu import copy_bandwidth, gpu_arguments
from loraplex.shard.config import ModelConfig
from loraplex.shard.kv_cache import KVCache
from loraplex.shard.lora.adapter import LoraAdapter, ProjectionWeights
from loraplex.shard.model import CausalLM
from loraplex.shard.projections import PROJECTIONS
from loraplex.shard.runner import ModelRunner, SequenceState

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None,
}  # fmt: skip
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_adapter(config: ModelConfig, rank: int, targets: tuple[str, ...], seed: int) -> LoraAdapter:
    """An adapter built straight on the device (A transposed, as the kernels read it)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    projections = {}
    for proj in targets:
        in_f, out_f = PROJECTIONS[proj].shape(config)
        a_t = (torch.randn(config.num_layers, rank, in_f, generator=gen, device="cuda") / in_f**0.5).bfloat16()
        b = (torch.randn(config.num_layers, rank, out_f, generator=gen, device="cuda") * 0.01).bfloat16()
        projections[proj] = ProjectionWeights(
            a_t.transpose(1, 2), b, dict.fromkeys(range(config.num_layers), rank), a_t
        )
    nbytes = sum(p.a.nbytes + p.b.nbytes for p in projections.values())
    return LoraAdapter(f"r{rank}-{seed}", projections, nbytes)


def decode_seconds(runner: ModelRunner, adapters: list[LoraAdapter | None], steps: int) -> float:
    """Median seconds of one decode step over a batch with 128-token prompts, one row per adapter."""
    seqs = [SequenceState(i, [(7 * i + j) % 32000 for j in range(128)], a) for i, a in enumerate(adapters)]
    runner.prefill(seqs)
    times = []
    for step in range(steps):
        for s in seqs:
            s.token_ids.append(step + 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.decode(seqs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    for s in seqs:
        runner.release(s)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = gpu_arguments(parser)
    if args is None:
        return 2
    config = ModelConfig.from_dict(MISTRAL_7B)
    model = CausalLM.random(config, torch.bfloat16, "cuda")
    cache = KVCache(config, 64 * args.batch, 16, num_kv_heads=config.num_kv_heads, dtype=torch.bfloat16, device="cuda")
    runner = ModelRunner(model, cache)
    small = [random_adapter(config, 8, ATTENTION, seed=i) for i in range(args.batch)]
    heavy = [random_adapter(config, 16, tuple(PROJECTIONS), seed=1000 + i) for i in range(args.batch)]
    copy = copy_bandwidth()
    base: list[LoraAdapter | None] = [None] * args.batch
    rounds: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for _ in range(3):  # interleaved, so drift hits every case alike
        rounds["a"].append(decode_seconds(runner, base, args.steps))
        rounds["b"].append(decode_seconds(runner, list(small), args.steps))
        rounds["c"].append(decode_seconds(runner, list(heavy), args.steps))
    step = {k: sorted(v)[1] for k, v in rounds.items()}
    heavy_bytes = sum(a.memory_bytes for a in heavy)
    result: dict[str, Any] = {
        "batch": args.batch,
        "copy_gbs": round(copy / 1e9, 1),
        "base_step_ms": round(step["a"] * 1e3, 2),
        "b_adapter_mb": round(small[0].memory_bytes / 1e6, 1),
        "b_throughput_ratio": round(step["a"] / step["b"], 3),
        "c_throughput_ratio": round(step["a"] / step["c"], 3),
        "c_floor_ratio": round(step["a"] / (step["a"] + heavy_bytes / copy), 3),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"\ndecode, batch {args.batch}: 64 x r8 qkvo = {result['b_throughput_ratio']} x base (target >= 0.85); "
        f"64 x r16 all = {result['c_throughput_ratio']} x base vs floor {result['c_floor_ratio']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
