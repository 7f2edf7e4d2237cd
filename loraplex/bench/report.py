"""Text tables and the JSON report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraplex.bench.stats import Summary


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1e3:.0f}"


def summary_table(summaries: Sequence[Summary]) -> str:
    """One row per (system, workload): counts, throughput, TTFT and ITL percentiles in milliseconds."""
    head = (
        f"{'system':<18}{'workload':<16}{'req':>5}{'fail':>5}{'short':>6}{'tokens':>8}{'s':>8}{'req/s':>8}"
        f"{'tok/s':>8}{'ttft p50/p90/p99 ms':>22}{'itl p50/p90/p99 ms':>21}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        ttft = f"{_ms(s.ttft_p50)}/{_ms(s.ttft_p90)}/{_ms(s.ttft_p99)}"
        itl = f"{_ms(s.itl_p50)}/{_ms(s.itl_p90)}/{_ms(s.itl_p99)}"
        lines.append(
            f"{s.system:<18}{s.workload:<16}{s.requests:>5}{s.failed:>5}{s.short:>6}{s.output_tokens:>8}"
            f"{s.seconds:>8.1f}{s.req_per_s:>8.2f}{s.tokens_per_s:>8.1f}{ttft:>22}{itl:>21}"
        )
    return "\n".join(lines)


def ratio_lines(reference: Summary, others: Sequence[Summary]) -> list[str]:
    """``reference`` tokens/s divided by each other system's, on the same requests."""
    return [
        f"{reference.system} ÷ {o.system} ({o.workload}): "
        f"{reference.tokens_per_s / o.tokens_per_s:.2f}x output tokens/s"
        for o in others
        if o.tokens_per_s > 0
    ]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n")
