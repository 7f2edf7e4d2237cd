"""The ``make bench`` suite: the six targets' workloads and baselines in one run, with ratios and plots."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loraplex.bench.adapters import ALL_PROJECTIONS, ATTENTION, AdapterSpec, adapter_numel, ensure_adapters
from loraplex.bench.driver import LoadShape
from loraplex.bench.floor import Floor, adapter_bytes_read, read_bandwidth
from loraplex.bench.plots import plot_cost, plot_latency, plot_throughput
from loraplex.bench.report import summary_table, write_json
from loraplex.bench.run import Target, run_baselines, screened_prompts, serve, warm_adapters
from loraplex.bench.server import LaunchedServer
from loraplex.bench.stats import Summary
from loraplex.bench.targets import cost_curves, evaluate_targets, targets_table
from loraplex.bench.workload import PromptMaker, adapter_indices, build_requests


@dataclass(frozen=True)
class SuiteConfig:
    model_dir: Path
    out: Path
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    requests: int = 64  # the "distinct" workload: this many requests, each its own adapter, all at once
    prompt_tokens: int = 128
    max_new_tokens: int = 64
    rank: int = 8
    heavy_rank: int = 16
    few_adapters: int = 8
    many_adapters: int = 1000
    zipf_requests: int = 96
    max_active_adapters: int = 64
    repeats: int = 2  # passes of each loraplex workload, interleaved; the best is kept
    sequential_sample: int = 16  # peft one at a time: requests timed (each runs alone; tokens/s is per request)
    progress: bool = True


QUICK = dict(
    requests=8, prompt_tokens=16, max_new_tokens=8, rank=4, heavy_rank=8, few_adapters=2, many_adapters=40,
    zipf_requests=16, max_active_adapters=8, repeats=1, sequential_sample=4,
)  # fmt: skip


def quick(config: SuiteConfig) -> SuiteConfig:
    """A small version for tests: the same steps on a few short requests."""
    return replace(config, **QUICK)  # type: ignore[arg-type]


def _best(passes: list[Summary]) -> Summary:
    return max(passes, key=lambda s: s.tokens_per_s)


def run_dtype(config: SuiteConfig, dtype: str, root: Path) -> dict[str, Any]:
    """Every workload of the suite on one server in ``dtype``, then the baselines; returns the dtype's report."""
    c = config
    n = c.requests
    distinct = AdapterSpec(f"distinct-r{c.rank}", c.rank, ATTENTION)
    heavy = AdapterSpec(f"heavy-r{c.heavy_rank}", c.heavy_rank, ALL_PROJECTIONS)
    few = AdapterSpec(f"zipf-{c.few_adapters}", c.rank, ATTENTION)
    many = AdapterSpec(f"zipf-{c.many_adapters}", c.rank, ATTENTION)
    few_idx = adapter_indices(c.zipf_requests, c.few_adapters, "zipf", seed=1)
    many_idx = adapter_indices(c.zipf_requests, c.many_adapters, "zipf", seed=2)
    distinct_ids = ensure_adapters(root, c.model_dir, distinct, range(n))
    heavy_ids = ensure_adapters(root, c.model_dir, heavy, range(n))
    ensure_adapters(root, c.model_dir, few, [i for i in few_idx if i is not None])
    ensure_adapters(root, c.model_dir, many, [i for i in many_idx if i is not None])
    maker = PromptMaker(c.model_dir)
    out = c.out / dtype
    args = [
        "--model-id", str(c.model_dir), "--dtype", dtype, "--adapter-dirs", str(root),
        "--max-active-adapters", str(c.max_active_adapters), "--max-cpu-adapters", "256",
        "--max-concurrent-requests", str(max(128, 2 * n)),
    ]  # fmt: skip
    passes: dict[str, list[Summary]] = {}
    metrics: dict[str, dict[str, float]] = {}
    with LaunchedServer(args, out / "server.log") as server:
        target = Target(server.url)
        prompts = screened_prompts(target, maker, min(n, 64), c.prompt_tokens, c.max_new_tokens, c.progress)
        workloads = {
            "base": build_requests(prompts, [None] * n, c.max_new_tokens),
            "distinct": build_requests(prompts, distinct_ids, c.max_new_tokens),
            "heavy": build_requests(prompts, heavy_ids, c.max_new_tokens),
        }
        warm_adapters(target, distinct_ids + heavy_ids, prompts[0], c.progress)
        for _ in range(c.repeats):  # interleaved, so that machine noise hits every workload alike
            for name, requests in workloads.items():
                p = serve(target, requests, LoadShape(concurrency=n), "loraplex", name, c.progress)
                passes.setdefault(name, []).append(p.summary)
                if p.summary.tokens_per_s >= _best(passes[name]).tokens_per_s:
                    metrics[name] = p.metrics
        for name, spec, idx in (("zipf-few", few, few_idx), ("zipf-many", many, many_idx)):
            ids = [spec.adapter_id(i) if i is not None else None for i in idx]
            p = serve(
                target, build_requests(prompts, ids, c.max_new_tokens), LoadShape(n), "loraplex", name, c.progress
            )
            passes[name], metrics[name] = [p.summary], p.metrics
        for conc in (1, max(1, n // 8)):  # one deployment's own traffic at lower load, for the cost curve
            reqs = build_requests(prompts, [None] * (2 * conc if conc > 1 else 3), c.max_new_tokens)
            p = serve(target, reqs, LoadShape(concurrency=conc), "loraplex", f"base-c{conc}", c.progress)
            passes[f"base-c{conc}"] = [p.summary]
    summaries = {name: _best(ps) for name, ps in passes.items()}
    baseline = run_baselines(
        ["transformers", "peft-sequential", "peft-mixed"], c.model_dir, dtype, root,
        workloads["distinct"], n, "distinct", base_requests=workloads["base"],
        sequential_limit=c.sequential_sample,
    )  # fmt: skip
    for s in baseline:
        summaries[s.system] = s
    bandwidth = read_bandwidth()
    numel = adapter_numel(c.model_dir, c.heavy_rank, ALL_PROJECTIONS)
    rows = metrics["heavy"].get("loraplex_batch_size_sum", float(n * (c.max_new_tokens + 1)))
    itemsize = getattr(torch, dtype).itemsize
    per_adapter = adapter_bytes_read(1, 0, numel, itemsize)  # what one decode row reads
    floor = Floor(summaries["base"].seconds, adapter_bytes_read(rows, n, numel, itemsize), bandwidth)
    targets = evaluate_targets(summaries, floor)
    curves = cost_curves(summaries, n, c.few_adapters, c.many_adapters)
    ordered = [summaries[k] for k in summaries]
    title = f"{c.model_dir.name} {dtype}, {n} requests x {c.prompt_tokens}+{c.max_new_tokens} tokens"
    plots = [
        plot_throughput(ordered, out / "throughput.png", title),
        plot_latency(ordered, out / "latency.png", title),
        plot_cost(
            curves["adapters"], curves["loraplex"], curves["dedicated"], out / "cost.png",
            f"relative cost per token, {c.model_dir.name} {dtype}", measured=curves["measured"],
        ),
    ]  # fmt: skip
    print(f"\n== {title}\n{summary_table(ordered)}\n\n{targets_table(targets, floor)}", flush=True)
    return {
        "dtype": dtype,
        "summaries": {k: s.as_dict() for k, s in summaries.items()},
        "passes": {k: [s.as_dict() for s in ps] for k, ps in passes.items()},
        "server_metrics": metrics,
        "floor": {**asdict(floor), "seconds": floor.seconds, "rows": rows, "bytes_per_adapter": per_adapter},
        "targets": targets,
        "cost_curve": curves,
        "plots": [str(p) for p in plots],
    }


def run_suite(config: SuiteConfig, work_dir: Path | None = None) -> dict[str, Any]:
    """Every dtype in turn; writes ``suite.json`` and the PNGs under ``config.out``."""
    config.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-", dir=work_dir) as tmp:
        reports = [run_dtype(config, dtype, Path(tmp) / "adapters") for dtype in config.dtypes]
    payload = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "results": reports,
    }
    write_json(config.out / "suite.json", payload)
    return payload
