"""``loraplex-bench prefix``: prefix caching on ÷ off on workloads that repeat themselves, and one that does not.

- shared-prefix: 64 requests over 8 adapters, one 512-token system prompt common to all, 32 unique tokens each,
  64 new tokens, all at once;
- multi-turn: conversations whose every turn resends the previous turns (prompt and answer) plus a new message;
- distinct: the suite's workload where nothing is shared (each request its own adapter and prompt): caching
  must cost nothing there.
Each workload runs on a server with prefix caching and on one started with ``--no-prefix-caching``, in
alternation (``repeats`` times, the best pass kept), so that machine noise hits both alike.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loraplex.bench.adapters import ATTENTION, AdapterSpec, ensure_adapters
from loraplex.bench.clients import Client, RequestResult, scrape_metrics
from loraplex.bench.driver import LoadShape
from loraplex.bench.report import write_json
from loraplex.bench.run import Target, screened_prompts, serve, warm_adapters
from loraplex.bench.server import LaunchedServer
from loraplex.bench.stats import Summary, summarize
from loraplex.bench.workload import BenchRequest, Prompt, PromptMaker, build_requests

PREFIX_COUNTERS = ("loraplex_prefix_cache_queried_tokens_total", "loraplex_prefix_cache_hit_tokens_total")


@dataclass(frozen=True)
class PrefixConfig:
    model_dir: Path
    out: Path
    dtype: str = "bfloat16"
    requests: int = 64
    adapters: int = 8
    system_tokens: int = 512
    unique_tokens: int = 32
    max_new_tokens: int = 64
    conversations: int = 16
    turns: int = 4
    turn_tokens: int = 32
    turn_new_tokens: int = 32
    distinct_prompt_tokens: int = 128
    rank: int = 8
    repeats: int = 2
    progress: bool = True


QUICK = dict(
    requests=8, adapters=2, system_tokens=48, unique_tokens=8, max_new_tokens=4, conversations=2, turns=2,
    turn_tokens=8, turn_new_tokens=4, distinct_prompt_tokens=16, rank=4, repeats=1,
)  # fmt: skip


def quick(config: PrefixConfig) -> PrefixConfig:
    """A small version for tests: the same steps on a few short requests."""
    return replace(config, **QUICK)  # type: ignore[arg-type]


def shared_prefix_requests(maker: PromptMaker, c: PrefixConfig, adapter_ids: list[str]) -> list[BenchRequest]:
    """Every prompt is the one system prompt followed by its own words (each word one token, so the lengths are
    exact and the shared part tokenizes alike in every prompt)."""
    system = maker.prompt(c.system_tokens, seed=10_000)
    out = []
    for i in range(c.requests):
        own = maker.prompt(c.unique_tokens, seed=20_000 + i)
        prompt = Prompt(system.text + own.text, system.ids + own.ids)
        out.append(BenchRequest(i, prompt, adapter_ids[i % len(adapter_ids)], c.max_new_tokens))
    return out


async def _conversations(
    client: Client, maker: PromptMaker, c: PrefixConfig, adapter_ids: list[str]
) -> tuple[list[RequestResult], float, float]:
    """Conversations side by side; each turn is sent once the previous answer is back, with all of it."""
    results: list[RequestResult] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def talk(k: int) -> None:
        history = ""
        for turn in range(c.turns):
            message = maker.prompt(c.turn_tokens, seed=30_000 + 100 * k + turn).text
            text = history + message
            request = BenchRequest(len(results), Prompt(text, ()), adapter_ids[k % len(adapter_ids)], c.turn_new_tokens)
            result = await client.stream(request)
            results.append(result)
            if result.error:
                return
            history = text + maker.tokenizer.decode(result.token_ids)

    await asyncio.gather(*(talk(k) for k in range(c.conversations)))
    return results, started, loop.time()


def _multi_turn(target: Target, maker: PromptMaker, c: PrefixConfig, adapter_ids: list[str]) -> Summary:
    async def run() -> tuple[list[RequestResult], float, float]:
        client = target.client()
        try:
            return await _conversations(client, maker, c, adapter_ids)
        finally:
            await client.close()

    results, started, ended = asyncio.run(run())
    # perf_counter and the loop's clock are both monotonic seconds; summarize needs only the span
    return summarize("loraplex", "multi-turn", results, started, ended, c.turn_new_tokens)


def _prefix_counters(url: str) -> dict[str, float]:
    scraped = scrape_metrics(url)
    return {name: scraped.get(name, float("nan")) for name in PREFIX_COUNTERS}


def _one_server(
    args: list[str], log: Path, maker: PromptMaker, c: PrefixConfig, few_ids: list[str], distinct_ids: list[str]
) -> tuple[dict[str, Summary], dict[str, float]]:
    """Every workload once on one server started with ``args``; its summaries and prefix-cache counters."""
    with LaunchedServer(args, log) as server:
        target = Target(server.url)
        prompts = screened_prompts(target, maker, c.requests, c.distinct_prompt_tokens, c.max_new_tokens, c.progress)
        warm_adapters(target, few_ids + distinct_ids, prompts[0], c.progress)
        shape = LoadShape(c.requests)
        shared = shared_prefix_requests(maker, c, few_ids)
        distinct = build_requests(prompts, distinct_ids, c.max_new_tokens)
        out = {
            "shared-prefix": serve(target, shared, shape, "loraplex", "shared-prefix", c.progress).summary,
            "multi-turn": _multi_turn(target, maker, c, few_ids),
            "distinct": serve(target, distinct, shape, "loraplex", "distinct", c.progress).summary,
        }
        return out, _prefix_counters(server.url)


def run_prefix(config: PrefixConfig, work_dir: Path | None = None) -> dict[str, Any]:
    """Both servers, every workload, ``repeats`` alternations; writes ``prefix.json`` under ``config.out``."""
    c = config
    config.out.mkdir(parents=True, exist_ok=True)
    maker = PromptMaker(c.model_dir)
    passes: dict[str, dict[str, list[Summary]]] = {"on": {}, "off": {}}
    counters: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    longest = c.system_tokens + c.unique_tokens + c.turns * (c.turn_tokens + 2 * c.turn_new_tokens)
    with tempfile.TemporaryDirectory(prefix="loraplex-prefix-", dir=work_dir) as tmp:
        root = Path(tmp)
        few_ids = ensure_adapters(
            root, c.model_dir, AdapterSpec(f"prefix-r{c.rank}", c.rank, ATTENTION), range(c.adapters)
        )
        distinct_spec = AdapterSpec(f"distinct-r{c.rank}", c.rank, ATTENTION)
        distinct_ids = ensure_adapters(root, c.model_dir, distinct_spec, range(c.requests))
        args = [
            "--model-id", str(c.model_dir), "--dtype", c.dtype, "--adapter-dirs", str(root),
            "--max-active-adapters", str(max(64, c.requests)), "--max-cpu-adapters", "256",
            "--max-concurrent-requests", str(max(128, 2 * c.requests)),
            "--max-input-tokens", str(longest), "--max-total-tokens", str(longest + c.max_new_tokens + 64),
            # every request's whole length fits at once, with caching or without: the router counts no sharing
            "--max-batch-total-tokens", str(max(32768, 2 * c.requests * (longest + c.max_new_tokens))),
        ]  # fmt: skip
        for repeat in range(c.repeats):
            for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                extra = [] if mode == "on" else ["--no-prefix-caching"]
                summaries, seen = _one_server(
                    args + extra, c.out / f"server-{mode}.log", maker, c, few_ids, distinct_ids
                )
                for name, summary in summaries.items():
                    passes[mode].setdefault(name, []).append(summary)
                counters[mode].append(seen)
    best = {m: {w: max(ps, key=lambda s: s.tokens_per_s) for w, ps in by.items()} for m, by in passes.items()}
    ratios = {
        w: {
            "throughput_on_over_off": best["on"][w].tokens_per_s / best["off"][w].tokens_per_s,
            "ttft_p50_off_over_on": best["off"][w].ttft_p50 / best["on"][w].ttft_p50,
        }
        for w in best["on"]
    }
    payload = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(c).items()},
        "best": {m: {w: s.as_dict() for w, s in by.items()} for m, by in best.items()},
        "passes": {m: {w: [s.as_dict() for s in ps] for w, ps in by.items()} for m, by in passes.items()},
        "prefix_counters": counters,
        "ratios": ratios,
    }
    write_json(c.out / "prefix.json", payload)
    print(_table(best, ratios), flush=True)
    return payload


def _table(best: dict[str, dict[str, Summary]], ratios: dict[str, dict[str, float]]) -> str:
    lines = [
        "| workload | tok/s on | tok/s off | on ÷ off | TTFT p50 on (s) | TTFT p50 off (s) | off ÷ on |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, r in ratios.items():
        on, off = best["on"][w], best["off"][w]
        lines.append(
            f"| {w} | {on.tokens_per_s:.1f} | {off.tokens_per_s:.1f} | {r['throughput_on_over_off']:.2f} | "
            f"{on.ttft_p50:.3f} | {off.ttft_p50:.3f} | {r['ttft_p50_off_over_on']:.2f} |"
        )
    return "\n".join(lines)
