"""Summaries of a run: throughput (req/s, tokens/s), time to first token and inter-token latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loraplex.bench.clients import RequestResult


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0 … 100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Summary:
    """What one system did with one workload."""

    system: str
    workload: str
    requests: int
    failed: int
    output_tokens: int
    short: int  # requests that ended before max_new_tokens (EOS)
    seconds: float
    req_per_s: float
    tokens_per_s: float
    ttft_p50: float = math.nan
    ttft_p90: float = math.nan
    ttft_p99: float = math.nan
    itl_p50: float = math.nan
    itl_p90: float = math.nan
    itl_p99: float = math.nan
    latency_p50: float = math.nan
    latency_p99: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def summarize(
    system: str, workload: str, results: Sequence[RequestResult], started: float, ended: float, max_new_tokens: int
) -> Summary:
    ok = [r for r in results if not r.error]
    seconds = max(ended - started, 1e-9)
    tokens = sum(r.tokens for r in ok)
    ttfts = [t for r in ok if (t := r.ttft) is not None]
    itls = [x for r in ok for x in r.itls]
    latencies = [r.done - r.sent for r in ok]
    return Summary(
        system=system,
        workload=workload,
        requests=len(results),
        failed=len(results) - len(ok),
        output_tokens=tokens,
        short=sum(1 for r in ok if r.tokens < max_new_tokens),
        seconds=seconds,
        req_per_s=len(ok) / seconds,
        tokens_per_s=tokens / seconds,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(itls, 50),
        itl_p90=percentile(itls, 90),
        itl_p99=percentile(itls, 99),
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
    )
