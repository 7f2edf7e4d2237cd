"""The driver against a real server: what it counts is what the server's /metrics counted, over HTTP and gRPC."""

from __future__ import annotations

from collections import Counter

import pytest

from loraplex.bench.driver import LoadShape
from loraplex.bench.run import Target, screened_prompts, serve
from loraplex.bench.workload import PromptMaker, adapter_indices, build_requests
from tests.loraplex.bench.conftest import SPEC, BenchWorld

NEW = 6


def _requests(world: BenchWorld, count: int, popularity: str = "uniform") -> list:  # type: ignore[type-arg]
    maker = PromptMaker(world.model_dir)
    prompts = screened_prompts(Target(world.server.url), maker, 4, 12, NEW, progress=False)
    idx = adapter_indices(count, len(world.adapters), popularity, seed=4)  # type: ignore[arg-type]
    return build_requests(prompts, [SPEC.adapter_id(i) if i is not None else None for i in idx], NEW)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_counts_match_the_server_metrics(world: BenchWorld, protocol: str) -> None:
    requests = _requests(world, 14)
    requests[3] = type(requests[3])(3, requests[3].prompt, None, NEW)  # one base-model request too
    target = Target(world.server.url, world.server.grpc_address if protocol == "grpc" else "")
    p = serve(target, requests, LoadShape(concurrency=5), "loraplex", "uniform", progress=False)
    s = p.summary
    assert (s.requests, s.failed) == (14, 0)
    assert p.metrics["loraplex_requests_total{status=success}"] == 14
    assert p.metrics["loraplex_output_tokens_total"] == s.output_tokens
    assert p.metrics["loraplex_input_tokens_total"] == 14 * 12
    wanted = Counter(r.adapter or "base" for r in requests)
    served = {k.split("adapter=")[1][:-1]: v for k, v in p.metrics.items() if k.startswith("loraplex_adapter_requests")}
    assert served == wanted
    for r in p.results:
        assert len(r.token_ids) == r.tokens
        assert r.tokens == NEW if r.finish_reason == "length" else r.tokens < NEW
        assert r.sent < r.token_times[0] <= r.token_times[-1] <= r.done
        assert len(r.itls) == r.tokens - 1
    assert s.tokens_per_s == pytest.approx(s.output_tokens / s.seconds)
    assert 0 < s.ttft_p50 <= s.ttft_p90 <= s.ttft_p99
    assert 0 < s.itl_p50 <= s.itl_p90 <= s.itl_p99


def test_screened_prompts_run_their_full_length(world: BenchWorld) -> None:
    requests = _requests(world, 8)
    p = serve(Target(world.server.url), requests, LoadShape(concurrency=8), "loraplex", "x", progress=False)
    base = [r for r in p.results if r.adapter is None]
    assert p.summary.failed == 0 and all(r.tokens == NEW for r in base)


def test_poisson_rate_spreads_the_sends(world: BenchWorld) -> None:
    requests = _requests(world, 12)
    p = serve(Target(world.server.url), requests, LoadShape(rate=10.0, seed=3), "loraplex", "poisson", False)
    sends = sorted(r.sent for r in p.results)
    assert len(sends) == 12 and p.metrics["loraplex_requests_total{status=success}"] == 12
    assert 0.3 < sends[-1] - sends[0] < 4.0  # 11 gaps of 0.1 s on average


def test_duration_keeps_sending_until_time_is_up(world: BenchWorld) -> None:
    requests = _requests(world, 4)
    shape = LoadShape(concurrency=2, duration=1.5)
    p = serve(Target(world.server.url), requests, shape, "loraplex", "duration", progress=False)
    n = p.summary.requests
    assert n > 4  # cycled through the workload
    assert sorted(r.index for r in p.results) == list(range(n))
    assert max(r.sent for r in p.results) - min(r.sent for r in p.results) < 1.5
    assert p.metrics["loraplex_requests_total{status=success}"] == n
