"""Decode-step cost of LoRA on SmolLM2: base vs 64 distinct adapters, side by side, against the bandwidth floor.

Run: ``.venv/bin/python benchmarks/decode_step.py [--dtype bfloat16] [--json out.json]``
``--graph-modes eager,compile`` times case b (64 x r8 q/k/v/o) through ``shard/decode_graph.py`` in those modes
beside the runner's own decode, interleaved: whether ``torch.compile`` of the static step pays on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.bench.adapters import ALL_PROJECTIONS, ATTENTION, write_adapter
from loraplex.bench.floor import read_bandwidth
from loraplex.shard.embedded import embedded_model_dir
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.store import AdapterStore
from loraplex.shard.runner import ModelRunner, SequenceState, build_runner, parse_dtype


def make_batch(
    runner: ModelRunner, adapters: list[LoraAdapter | None], prompt_len: int, seed: int
) -> list[SequenceState]:
    gen = torch.Generator().manual_seed(seed)
    vocab = runner.model.config.vocab_size
    seqs = [
        SequenceState(i, torch.randint(vocab, (prompt_len,), generator=gen).tolist(), a) for i, a in enumerate(adapters)
    ]
    logits = runner.prefill(seqs)
    for s, t in zip(seqs, logits.argmax(-1).tolist(), strict=True):
        s.token_ids.append(t)
    return seqs


def step(runner: ModelRunner, seqs: list[SequenceState]) -> float:
    start = time.perf_counter()
    logits = runner.decode(seqs)
    elapsed = time.perf_counter() - start
    for s, t in zip(seqs, logits.argmax(-1).tolist(), strict=True):
        s.token_ids.append(t)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--lora-dtype",
        default="float32",
        choices=["same", "float32"],
        help="dtype of the per-batch LoRA stacks (float32 is the CPU default whatever --dtype)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--graph-modes", default="", help="e.g. eager,compile: case b through DecodeGraph too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype, "cpu")

    model_dir = embedded_model_dir()
    tokens = args.batch * (args.prompt_len + args.steps + 4)
    copies = 3 + (len(args.graph_modes.split(",")) + 1 if args.graph_modes else 0)  # batches held at once
    runner = build_runner(model_dir, dtype=dtype, kv_blocks=copies * (tokens // 16 + args.batch), block_size=16)
    config = runner.model.config
    store = AdapterStore(config, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.batch):
            store.load(f"attn-{i}", write_adapter(Path(tmp) / f"a{i}", config, 8, ATTENTION, seed=i))
            store.load(f"all-{i}", write_adapter(Path(tmp) / f"c{i}", config, 16, ALL_PROJECTIONS, seed=1000 + i))
    cases: dict[str, list[LoraAdapter | None]] = {
        "a: base only": [None] * args.batch,
        "b: 64 x r8 q/k/v/o": [store.get(f"attn-{i}") for i in range(args.batch)],
        "c: 64 x r16 all 7": [store.get(f"all-{i}") for i in range(args.batch)],
    }
    lora_dtype = None if args.lora_dtype == "same" else parse_dtype(args.lora_dtype, "cpu")
    stack_dtype = lora_dtype or dtype
    # Bytes LoRA streams per decode step: every adapter's A and B, in the dtype the plan stacks them in.
    adapter_bytes = {
        name: sum(
            (p.a.numel() + p.b.numel()) * stack_dtype.itemsize
            for a in adapters
            if a is not None
            for p in a.projections.values()
        )
        for name, adapters in cases.items()
    }
    batches = {name: make_batch(runner, adapters, args.prompt_len, seed=7) for name, adapters in cases.items()}
    # One runner per case, so that each batch keeps its own cached LoRA plan.
    runners = {name: ModelRunner(runner.model, runner.cache, decode_lora_dtype=lora_dtype) for name in cases}
    if args.graph_modes:
        return compare_graph(runner, batches["b: 64 x r8 q/k/v/o"], lora_dtype, args)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(args.steps + 2):
        for name in cases:  # interleaved, so that machine noise hits every case alike
            t = step(runners[name], batches[name])
            if i >= 2:
                times[name].append(t)
    bandwidth = read_bandwidth()
    base = statistics.median(times["a: base only"])
    rows = []
    for name in cases:
        t = statistics.median(times[name])
        floor = (base + adapter_bytes[name] / bandwidth) / base
        rows.append(
            dict(
                case=name,
                step_ms=t * 1e3,
                ratio=t / base,
                floor=floor,
                vs_floor=(t / base) / floor,
                adapter_mb=adapter_bytes[name] / 1e6,
            )
        )
    print(
        f"\nSmolLM2-135M {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
        f"LoRA stacks {args.lora_dtype}, {args.threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"median of {args.steps} steps"
    )
    print(f"{'case':<22}{'step ms':>10}{'x base':>9}{'floor':>8}{'/floor':>8}{'LoRA MB read/step':>19}")
    for r in rows:
        print(
            f"{r['case']:<22}{r['step_ms']:>10.1f}{r['ratio']:>9.3f}{r['floor']:>8.3f}{r['vs_floor']:>8.3f}"
            f"{r['adapter_mb']:>19.0f}"
        )
    print("targets: b/a <= 1.15; c within 1.2x of its floor")
    if args.json:
        args.json.write_text(json.dumps(dict(dtype=args.dtype, bandwidth=bandwidth, rows=rows), indent=2))
    return 0


def compare_graph(
    runner: ModelRunner, seqs: list[SequenceState], lora_dtype: torch.dtype | None, args: argparse.Namespace
) -> int:
    """One batch, its own copy per variant, stepped in turn: the runner's decode and DecodeGraph's modes."""
    from loraplex.shard.decode_graph import DecodeGraph

    def copy(s: SequenceState) -> SequenceState:
        blocks: list[int] = []
        runner.cache.allocator.grow(blocks, len(s.token_ids) + args.steps + 4)
        for layer in range(runner.model.config.num_layers):  # the same keys and values in fresh blocks
            for kv in (runner.cache.k, runner.cache.v):
                kv[layer][blocks[: len(s.blocks)]] = kv[layer][s.blocks]
        return SequenceState(s.request_id, list(s.token_ids), s.adapter, blocks, s.num_cached)

    length = len(seqs[0].token_ids) + args.steps + 8
    variants: dict[str, object] = {"runner": ModelRunner(runner.model, runner.cache, decode_lora_dtype=lora_dtype)}
    for mode in args.graph_modes.split(","):
        variants[f"graph {mode}"] = DecodeGraph(
            runner.model, runner.cache, max_batch=len(seqs), max_len=length, slots=len(seqs), max_rank=8,
            targets=ATTENTION, mode=mode,
        )  # fmt: skip
    batches = {name: [copy(s) for s in seqs] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps + 2):
        for name, v in variants.items():
            start = time.perf_counter()
            logits = v.decode(batches[name])  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - start
            for s, t in zip(batches[name], logits.argmax(-1).tolist(), strict=True):
                s.token_ids.append(t)
            if i >= 2:  # the first calls compile
                times[name].append(elapsed)
    base = statistics.median(times["runner"])
    print(f"\ncase b, {args.dtype}, batch {len(seqs)}, {args.threads} threads, median of {args.steps} steps")
    for name, ts in times.items():
        print(f"{name:<16}{statistics.median(ts) * 1e3:>10.1f} ms {statistics.median(ts) / base:>7.3f} x runner")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
