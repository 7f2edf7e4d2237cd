"""PNG plots: throughput per system, latency percentiles, and relative cost per token against adapters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from loraplex.bench.stats import Summary


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(s: Summary) -> str:
    return f"{s.system}\n{s.workload}"


def plot_throughput(summaries: Sequence[Summary], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(summaries)), 4.5))
    colors = ["#1f77b4" if s.system.startswith("loraplex") else "#aaaaaa" for s in summaries]
    bars = ax.bar(range(len(summaries)), [s.tokens_per_s for s in summaries], color=colors)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(summaries)), [_label(s) for s in summaries], fontsize=7, rotation=30)
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(summaries: Sequence[Summary], path: Path, title: str) -> Path:
    plt = _pyplot()
    shown = [s for s in summaries if not math.isnan(s.itl_p50)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(shown)), 4.5))
    for ax, (name, keys) in zip(
        axes,
        [
            ("time to first token", ("ttft_p50", "ttft_p90", "ttft_p99")),
            ("inter-token latency", ("itl_p50", "itl_p90", "itl_p99")),
        ],
        strict=True,
    ):
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            xs = [i + k * width for i in range(len(shown))]
            ax.bar(xs, [1e3 * getattr(s, key) for s in shown], width, label=key.split("_")[1])
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(shown))], [_label(s) for s in shown], fontsize=7, rotation=30
        )
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cost(
    adapters: Sequence[float],
    loraplex: Sequence[float],
    dedicated: Sequence[float],
    path: Path,
    title: str,
    measured: Sequence[tuple[float, float]] = (),
) -> Path:
    """Relative cost per token (1 = loraplex serving the base model alone) against the number of adapters."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(adapters, dedicated, "-", color="#d62728", label="one dedicated deployment per adapter")
    ax.plot(adapters, loraplex, "-", color="#1f77b4", label="loraplex: one deployment for all adapters")
    if measured:
        ax.plot([m[0] for m in measured], [m[1] for m in measured], "o", color="#1f77b4", label="loraplex, measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of adapters")
    ax.set_ylabel("relative cost per output token")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
