"""Where a served pass's time goes: CPU seconds of router, shard and client per step, the served inter-token
latency against the same decode step run in process, and the whole served pass against the same prompts
run in process on the router's schedule (prefill chunks, then decode; no router, no gRPC, no HTTP).

Run: ``.venv/bin/python benchmarks/serving_overhead.py [--dtype bfloat16] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode_step import make_batch, step
from loraplex.bench.driver import LoadShape
from loraplex.bench.run import Target, screened_prompts, serve
from loraplex.bench.server import LaunchedServer
from loraplex.bench.workload import PromptMaker, build_requests
from loraplex.router.settings import RouterSettings
from loraplex.shard.embedded import embedded_model_dir
from loraplex.shard.runner import build_runner, parse_dtype


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _roles(launcher_pid: int) -> dict[str, psutil.Process]:
    out = {}
    for child in psutil.Process(launcher_pid).children():
        cmd = " ".join(child.cmdline())
        out["router" if "router" in cmd else "shard"] = child
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model_dir = embedded_model_dir()
    log = Path("/tmp") / f"loraplex-overhead-{args.dtype}.log"
    with LaunchedServer(["--dtype", args.dtype], log) as server:
        assert server.proc is not None
        roles = _roles(server.proc.pid)
        target = Target(server.url)
        prompts = screened_prompts(target, PromptMaker(model_dir), args.batch, args.prompt_len, args.new_tokens, False)
        requests = build_requests(prompts, [None] * args.batch, args.new_tokens)
        me = psutil.Process()
        before = {name: _cpu(p) for name, p in roles.items()} | {"client": _cpu(me)}
        p = serve(target, requests, LoadShape(concurrency=args.batch), "loraplex", "base", progress=False)
        after = {name: _cpu(p) for name, p in roles.items()} | {"client": _cpu(me)}
    steps = p.metrics["loraplex_batch_size_count"]
    cpu = {name: after[name] - before[name] for name in before}
    # The same decode step in process: a batch of the same shape, median of 8 steps.
    tokens = args.batch * (args.prompt_len + args.new_tokens + 16)
    runner = build_runner(
        model_dir, dtype=parse_dtype(args.dtype, "cpu"), kv_blocks=2 * (tokens // 16 + args.batch), block_size=16
    )
    seqs = make_batch(runner, [None] * args.batch, args.prompt_len, seed=3)
    times = [step(runner, seqs) for _ in range(10)][2:]
    in_process = statistics.median(times)
    for s in seqs:
        runner.release(s)
    # The served pass's work in process: prefill in chunks of the router's default token budget, then decode.
    per_prefill = max(1, RouterSettings().max_batch_prefill_tokens // args.prompt_len)
    requests = [(list(p.ids), None) for p in prompts]
    runner.generate_greedy(requests[:2], 2)  # warm-up
    start = time.perf_counter()
    runner.generate_greedy(requests, args.new_tokens, prefill_batch=per_prefill)
    pass_seconds = time.perf_counter() - start
    served_itl = p.summary.itl_p50
    result: dict[str, Any] = {
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "seconds": round(p.summary.seconds, 2),
        "in_process_pass_seconds": round(pass_seconds, 2),
        "served_over_in_process": round(p.summary.seconds / pass_seconds, 3),
        "forward_steps": steps,
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_ms_per_step": {k: round(1e3 * v / steps, 1) for k, v in cpu.items()},
        "served_itl_p50_ms": round(1e3 * served_itl, 1),
        "in_process_decode_step_ms": round(1e3 * in_process, 1),
        "overhead_ms_per_step": round(1e3 * (served_itl - in_process), 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
