"""``loraplex-bench``: drive a running server with a workload (and baselines), or run the ``make bench`` suite."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from loraplex.bench.adapters import AdapterSpec, ensure_adapters, parse_targets
from loraplex.bench.baselines import BASELINES
from loraplex.bench.driver import LoadShape
from loraplex.bench.plots import plot_latency, plot_throughput
from loraplex.bench.report import ratio_lines, summary_table, write_json
from loraplex.bench.run import Target, run_baselines, screened_prompts, serve, warm_adapters
from loraplex.bench.workload import POPULARITIES, PromptMaker, adapter_indices, build_requests
from loraplex.common.flags import FlagParser, fail


def _model_dir(value: str) -> Path:
    if value:
        from loraplex.shard.checkpoint import resolve_model_dir

        return Path(resolve_model_dir(value))
    from loraplex.shard.embedded import embedded_model_dir

    return embedded_model_dir()


def run_parser() -> FlagParser:
    p = FlagParser(
        prog="loraplex-bench", description="Drive a running loraplex server; `loraplex-bench suite -h` for the suite."
    )
    f = p.flag
    f("--url", env="BENCH_URL", default="http://127.0.0.1:8080", help="the server's HTTP address (also for /metrics)")
    f("--grpc", env="BENCH_GRPC", default="", help="send the load over gRPC to this host:port instead of HTTP")
    f("--api-key", env="BENCH_API_KEY", default="")
    f(
        "--model-id",
        env="BENCH_MODEL_ID",
        default="",
        help="the served checkpoint (tokenizer, baselines); default embedded",
    )
    f("--requests", env="BENCH_REQUESTS", type=int, default=64, help="requests in the workload")
    f(
        "--duration",
        env="BENCH_DURATION",
        type=float,
        default=0.0,
        help="seconds to keep sending (cycling); 0: once each",
    )
    f("--concurrency", env="BENCH_CONCURRENCY", type=int, default=64, help="requests in flight (closed loop)")
    f("--rate", env="BENCH_RATE", type=float, default=0.0, help="Poisson arrivals per second (open loop) instead")
    f("--adapters", env="BENCH_ADAPTERS", type=int, default=0, help="number of adapters; 0: base model only")
    f("--popularity", env="BENCH_POPULARITY", default="distinct", choices=list(POPULARITIES))
    f("--zipf-s", env="BENCH_ZIPF_S", type=float, default=1.1, help="Zipf exponent")
    f(
        "--adapter-ids",
        env="BENCH_ADAPTER_IDS",
        default="",
        help="comma list of existing adapter ids (overrides --namespace)",
    )
    f("--namespace", env="BENCH_NAMESPACE", default="bench/r8-attention", help="adapter ids are <namespace>/<i>")
    f("--adapter-root", env="BENCH_ADAPTER_ROOT", type=Path, default=None, help="the server's --adapter-dirs root")
    f("--write-adapters", env="BENCH_WRITE_ADAPTERS", action="store_true", help="write random adapters under the root")
    f("--rank", env="BENCH_RANK", type=int, default=8)
    f("--targets", env="BENCH_TARGETS", default="attention", help="attention, all, or a comma list of projections")
    f("--prompt-tokens", env="BENCH_PROMPT_TOKENS", type=int, default=128)
    f("--max-new-tokens", env="BENCH_MAX_NEW_TOKENS", type=int, default=64)
    f("--no-screen", env="BENCH_NO_SCREEN", action="store_true", help="skip replacing prompts that end early")
    f("--warm-adapters", env="BENCH_WARM_ADAPTERS", action="store_true", help="load every adapter before timing")
    f("--baselines", env="BENCH_BASELINES", default="", help=f"comma list of {', '.join(BASELINES)} or all")
    f("--baseline-batch", env="BENCH_BASELINE_BATCH", type=int, default=64, help="static batch size of baselines")
    f("--dtype", env="BENCH_DTYPE", default="float32", choices=["float32", "bfloat16"], help="baselines' dtype")
    f("--seed", env="BENCH_SEED", type=int, default=0)
    f("--out", env="BENCH_OUT", type=Path, default=Path("bench-results"), help="directory for JSON and PNGs")
    f("--no-progress", env="BENCH_NO_PROGRESS", action="store_true")
    return p


def _launching_flags(p: FlagParser, out: Path, repeats_help: str) -> None:
    """The flags of the subcommands that start their own servers."""
    p.flag("--model-id", env="BENCH_MODEL_ID", default="", help="default: the embedded SmolLM2")
    p.flag("--out", env="BENCH_OUT", type=Path, default=out)
    p.flag("--repeats", env="BENCH_REPEATS", type=int, default=2, help=repeats_help)
    p.flag("--quick", env="BENCH_QUICK", action="store_true", help="a few short requests (for tests)")
    p.flag("--work-dir", env="BENCH_WORK_DIR", type=Path, default=None, help="where the adapters are written")
    p.flag("--no-progress", env="BENCH_NO_PROGRESS", action="store_true")


def suite_parser() -> FlagParser:
    p = FlagParser(prog="loraplex-bench suite", description="Six performance targets: loraplex vs baselines.")
    p.flag("--dtypes", env="BENCH_DTYPES", default="float32,bfloat16")
    _launching_flags(p, Path("bench-results"), "passes of each main workload; best kept")
    return p


def suite_main(argv: Sequence[str]) -> int:
    from loraplex.bench.suite import SuiteConfig, quick, run_suite

    args = suite_parser().parse(list(argv))
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or any(d not in ("float32", "bfloat16") for d in dtypes):
        fail("loraplex-bench suite", "--dtypes takes float32 and/or bfloat16")
    config = SuiteConfig(
        _model_dir(args.model_id), args.out, dtypes, repeats=args.repeats, progress=not args.no_progress
    )
    if args.quick:
        config = quick(config)
    run_suite(config, args.work_dir)
    print(f"\nwrote {args.out / 'suite.json'} and PNGs under {args.out}/<dtype>/")
    return 0


def prefix_parser() -> FlagParser:
    p = FlagParser(
        prog="loraplex-bench prefix",
        description="Prefix caching on vs off: a shared system prompt, multi-turn chats, and nothing shared.",
    )
    p.flag("--dtype", env="BENCH_DTYPE", default="bfloat16", choices=["float32", "bfloat16"])
    _launching_flags(p, Path("bench-results/prefix"), "on/off alternations; best pass kept")
    return p


def prefix_main(argv: Sequence[str]) -> int:
    from loraplex.bench.prefix import PrefixConfig, quick, run_prefix

    args = prefix_parser().parse(list(argv))
    if args.repeats < 1:
        fail("loraplex-bench prefix", "--repeats must be at least 1")
    config = PrefixConfig(
        _model_dir(args.model_id), args.out, args.dtype, repeats=args.repeats, progress=not args.no_progress
    )
    if args.quick:
        config = quick(config)
    run_prefix(config, args.work_dir)
    print(f"\nwrote {args.out / 'prefix.json'}")
    return 0


def _adapter_ids(args: object, model_dir: Path) -> list[str | None]:
    a = args
    idx = adapter_indices(a.requests, a.adapters, a.popularity, a.seed, a.zipf_s)  # type: ignore[attr-defined]
    explicit = [x.strip() for x in a.adapter_ids.split(",") if x.strip()]  # type: ignore[attr-defined]
    if explicit:
        if len(explicit) < a.adapters:  # type: ignore[attr-defined]
            fail("loraplex-bench", "--adapter-ids names fewer adapters than --adapters")
        return [explicit[i] if i is not None else None for i in idx]
    spec = AdapterSpec(a.namespace, a.rank, parse_targets(a.targets))  # type: ignore[attr-defined]
    if a.write_adapters:  # type: ignore[attr-defined]
        if a.adapter_root is None:  # type: ignore[attr-defined]
            fail("loraplex-bench", "--write-adapters needs --adapter-root")
        ensure_adapters(a.adapter_root, model_dir, spec, [i for i in idx if i is not None])  # type: ignore[attr-defined]
    return [spec.adapter_id(i) if i is not None else None for i in idx]


def run_main(argv: Sequence[str]) -> int:
    args = run_parser().parse(list(argv))
    names = list(BASELINES) if args.baselines == "all" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    if any(n not in BASELINES for n in names):
        fail("loraplex-bench", f"--baselines takes {', '.join(BASELINES)} or all")
    if args.requests < 1 or args.max_new_tokens < 1 or args.prompt_tokens < 1:
        fail("loraplex-bench", "--requests, --prompt-tokens and --max-new-tokens must be positive")
    model_dir = _model_dir(args.model_id)
    progress = not args.no_progress
    adapters = _adapter_ids(args, model_dir)
    target = Target(args.url, args.grpc, args.api_key)
    maker = PromptMaker(model_dir)
    pool = min(args.requests, 64)
    if args.no_screen:
        prompts = [maker.prompt(args.prompt_tokens, args.seed * 1_000_003 + i) for i in range(pool)]
    else:
        prompts = screened_prompts(target, maker, pool, args.prompt_tokens, args.max_new_tokens, progress)
    requests = build_requests(prompts, adapters, args.max_new_tokens)
    if args.warm_adapters:
        warm_adapters(target, sorted({a for a in adapters if a is not None}), prompts[0], progress)
    workload = f"{args.adapters}x{args.popularity}" if args.adapters else "base"
    shape = LoadShape(args.concurrency, args.rate, args.duration, args.seed)
    result = serve(target, requests, shape, "loraplex" + ("-grpc" if args.grpc else ""), workload, progress)
    summaries = [result.summary]
    if names:
        done = sorted(result.results, key=lambda r: r.index)
        sent = [requests[r.index % len(requests)] for r in done] if args.duration > 0 else requests
        summaries += run_baselines(names, model_dir, args.dtype, args.adapter_root, sent, args.baseline_batch, workload)
    print(summary_table(summaries))
    for line in ratio_lines(summaries[0], summaries[1:]):
        print(line)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model_dir.name}: {workload}, {args.prompt_tokens}+{args.max_new_tokens} tokens"
    write_json(
        out / "bench.json",
        {
            "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "summaries": [s.as_dict() for s in summaries],
            "server_metrics": result.metrics,
            "requests": [
                {"index": r.index, "adapter": r.adapter, "tokens": r.tokens, "ttft": r.ttft, "error": r.error}
                for r in sorted(result.results, key=lambda r: r.index)
            ],
            "plots": [
                str(plot_throughput(summaries, out / "throughput.png", title)),
                str(plot_latency(summaries, out / "latency.png", title)),
            ],
        },
    )
    print(f"wrote {out / 'bench.json'}, {out / 'throughput.png'}, {out / 'latency.png'}")
    return 1 if result.summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["suite"]:
        return suite_main(argv[1:])
    if argv[:1] == ["prefix"]:
        return prefix_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
