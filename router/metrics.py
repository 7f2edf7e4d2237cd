"""Prometheus metrics of the router (a private registry per process, served at /metrics)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DEFAULT_NAMED_ADAPTERS = 100  # --metrics-top-adapters
OTHER = "other"  # every adapter past the named ones
HIDDEN = "adapter"  # every adapter where ids may not be shown

M = TypeVar("M", Counter, Gauge)


class AdapterNames:
    """Which adapter ids /metrics may write as label values: at most ``limit`` of them, the most requested.

    With thousands of adapters one series each would make /metrics grow without limit (and every scraper's
    storage with it). So the ``limit`` adapters with the most requests are named, every other one is
    ``other``; an adapter that overtakes the least requested named one takes its place (the demoted one's
    series are dropped and it counts as ``other`` from then on). ``base`` is always named. Where ids may not
    be shown (``show_ids`` False: tenancy without --metrics-adapter-labels), every adapter is ``adapter``.
    """

    def __init__(self, limit: int = DEFAULT_NAMED_ADAPTERS, show_ids: bool = True) -> None:
        self.limit = max(0, limit)
        self.show_ids = show_ids
        self.requests: Tally[str] = Tally()  # every adapter's requests since start (memory, not series)
        self.named: set[str] = set()
        self._droppers: list[Callable[[str], None]] = []  # each removes a demoted adapter's series

    def label(self, adapter: str) -> str:
        if adapter == "base":
            return adapter
        if not self.show_ids:
            return HIDDEN
        if adapter not in self.named and len(self.named) < self.limit:
            self.named.add(adapter)  # room left: any adapter seen is named until the most requested need it
        return adapter if adapter in self.named else OTHER

    def requested(self, adapter: str) -> None:
        """One more request for ``adapter``: it may enter the named ones, and push the weakest out."""
        if adapter == "base" or not self.show_ids:
            return
        self.requests[adapter] += 1
        if adapter in self.named or self.limit == 0:
            return
        if len(self.named) < self.limit:
            self.named.add(adapter)
            return
        weakest = min(self.named, key=self.requests.__getitem__)
        if self.requests[adapter] > self.requests[weakest]:  # strictly: ties never churn series
            self.named.discard(weakest)
            for drop in self._droppers:
                drop(weakest)
            self.named.add(adapter)

    def on_demotion(self, drop: Callable[[str], None]) -> None:
        self._droppers.append(drop)


class AdapterLabelled(Generic[M]):
    """A metric with an ``adapter`` label whose values ``AdapterNames`` bounds.

    /metrics is open (scrapers carry no key): under tenancy an id would tell anyone which adapters every
    tenant has and how much each is used, so there every adapter is counted as ``adapter`` (the base model
    stays ``base``) unless --metrics-adapter-labels says otherwise (docs/serving.md).
    """

    def __init__(self, metric: M, names: AdapterNames) -> None:
        self.metric: M = metric
        self.names = names
        names.on_demotion(self.drop)

    def labels(self, adapter: str, *rest: str) -> M:
        return self.metric.labels(self.names.label(adapter), *rest)

    def drop(self, adapter: str) -> None:
        """Remove ``adapter``'s own series (it is no longer named); these metrics have no other label."""
        with contextlib.suppress(KeyError):
            self.metric.remove(adapter)

    def clear(self) -> None:
        self.metric.clear()


class ShardTotals(Collector):
    """Counters the shards keep since they started, exported under each name in ``names`` as counters.

    The shards answer running totals; a restarted shard starts again from 0, so what it counted before
    is kept here and the exported counters never go down."""

    def __init__(self, names: dict[str, str]) -> None:
        """``names``: each exported counter name (without ``_total``) → its help text."""
        self.names = names
        self.total = 0.0
        self._last = 0.0

    def update(self, running_total: float) -> None:
        self.total += running_total - self._last if running_total >= self._last else running_total
        self._last = running_total

    def collect(self) -> Iterator[Metric]:
        for name, help_text in self.names.items():
            yield CounterMetricFamily(name, help_text, value=self.total)


class Twins:
    """One value under loraplex's name and vLLM's (the name most gateways' pickers read by default)."""

    def __init__(self, metrics: Sequence[Gauge]) -> None:
        self.metrics = tuple(metrics)

    def set(self, value: float) -> None:
        for m in self.metrics:
            m.set(value)

    def set_labels(self, labels: dict[str, str], value: float) -> None:
        """The one series of an info gauge: earlier label values are dropped (a picker reads the newest)."""
        for m in self.metrics:
            m.clear()
            m.labels(**labels).set(value)


def _twin_gauges(
    registry: CollectorRegistry, names: Iterable[str], help_text: str, labels: Sequence[str] = ()
) -> Twins:
    return Twins([Gauge(n, help_text, list(labels), registry=registry) for n in names])


class Metrics:
    def __init__(self, adapter_ids: bool = True, named_adapters: int = DEFAULT_NAMED_ADAPTERS) -> None:
        """``adapter_ids``: per-adapter series carry the adapter's id (False: ``adapter`` for every adapter);
        ``named_adapters``: how many adapters at most have series of their own (the rest: ``other``)."""
        self.adapter_ids = adapter_ids
        self.adapter_names = names = AdapterNames(named_adapters, adapter_ids)
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loraplex_requests", "Requests received, by outcome", ["status"], registry=r)
        self.request_duration = Histogram(
            "loraplex_request_duration_seconds", "Request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds", "Queue + prefill", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "loraplex_inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.forward_duration = Histogram(
            "loraplex_batch_forward_duration_seconds",
            "Wall time of one Prefill or Decode call to the shards, as the router sees it (TGI's metric)",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_size = Gauge("loraplex_queue_size", "Requests waiting for prefill", registry=r)
        self.running_requests = Gauge("loraplex_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Histogram(
            "loraplex_batch_size", "Requests per forward step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.kv_blocks_used = Gauge("loraplex_kv_blocks_used", "KV cache blocks in use on rank 0", registry=r)
        self.kv_blocks = Gauge("loraplex_kv_blocks", "KV cache blocks the router admits into", registry=r)
        self.preemptions = Counter(
            "loraplex_preemptions", "Running requests whose KV blocks went to older ones (recomputed)", registry=r
        )
        self.input_tokens = Counter("loraplex_input_tokens", "Prompt tokens", registry=r)
        self.output_tokens = Counter("loraplex_output_tokens", "Generated tokens", registry=r)
        self.adapter_requests = AdapterLabelled(
            Counter("loraplex_adapter_requests", "Requests per adapter", ["adapter"], registry=r), names
        )
        self.adapter_tokens = AdapterLabelled(
            Counter("loraplex_adapter_tokens", "Generated tokens per adapter", ["adapter"], registry=r), names
        )
        self.adapter_load_seconds = AdapterLabelled(
            Gauge("loraplex_adapter_load_seconds", "Seconds the adapter's last load took", ["adapter"], registry=r),
            names,
        )
        # Named adapters only (a 1 per adapter would add up to nothing useful otherwise).
        self.adapter_tier = Gauge(
            "loraplex_adapter_tier",
            "1 for the tier each loaded adapter is in (host or device)",
            ["adapter", "tier"],
            registry=r,
        )
        names.on_demotion(self._drop_tiers)
        self.adapters_loaded = Gauge(
            "loraplex_adapters_loaded", "Adapters loaded, by tier (host or device)", ["tier"], registry=r
        )
        self.adapter_loads = Counter("loraplex_adapter_loads", "Adapter loads from disk (all adapters)", registry=r)
        self.adapter_evictions = Counter(
            "loraplex_adapter_evictions", "Adapters unloaded to make room (all adapters)", registry=r
        )
        self.queue_wait = Histogram(
            "loraplex_queue_wait_seconds", "Time from queueing to prefill", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.longest_queue_wait = Gauge(
            "loraplex_queue_wait_longest_seconds", "Longest time any request waited for prefill", registry=r
        )
        self._protocol(r)

    def _drop_tiers(self, adapter: str) -> None:
        for tier in ("host", "device"):
            with contextlib.suppress(KeyError):
                self.adapter_tier.remove(adapter, tier)

    def _protocol(self, r: CollectorRegistry) -> None:
        """The model-server protocol's metrics (what gateways' endpoint pickers read), each under loraplex's
        name and vLLM's (docs/metrics.md). Set at scrape time by RouterService.render_metrics."""
        self.requests_waiting = Twins(
            [self.queue_size, Gauge("vllm:num_requests_waiting", "Requests waiting for prefill", registry=r)]
        )
        self.requests_running = Twins(
            [self.running_requests, Gauge("vllm:num_requests_running", "Requests in the running batch", registry=r)]
        )
        self.kv_usage = _twin_gauges(
            r,
            ("loraplex_kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
            "KV cache blocks in use as a fraction of the shards' blocks (0 to 1)",
        )
        self.lora_info = _twin_gauges(
            r,
            ("loraplex_lora_requests_info", "vllm:lora_requests_info"),
            "Adapters by state (value: the Unix time of the reading); max_lora: device slots; running: adapters "
            "served without a disk read (device or host memory); waiting: adapters of queued or loading requests",
            ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
        )
        self.cache_config = _twin_gauges(
            r,
            ("loraplex_cache_config_info", "vllm:cache_config_info"),
            "The KV cache's configuration (value 1)",
            ("block_size", "num_gpu_blocks", "enable_prefix_caching"),
        )
        self.prefix_cached_blocks = Gauge(
            "loraplex_prefix_cache_blocks", "KV blocks holding a reusable prefix (in use or cached)", registry=r
        )
        self.prefix_queries = ShardTotals(
            {
                "loraplex_prefix_cache_queried_tokens": "Prompt tokens looked up in the prefix cache",
                "vllm:prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
            }
        )
        self.prefix_hits = ShardTotals(
            {
                "loraplex_prefix_cache_hit_tokens": "Prompt tokens found in the prefix cache (KV reused)",
                "vllm:prefix_cache_hits": "Prompt tokens found in the prefix cache (KV reused)",
            }
        )
        r.register(self.prefix_queries)
        r.register(self.prefix_hits)

    def cache_configured(self, block_size: int, num_blocks: int, prefix_caching: bool) -> None:
        self.cache_config.set_labels(
            {
                "block_size": str(block_size),
                "num_gpu_blocks": str(num_blocks),
                "enable_prefix_caching": str(prefix_caching),
            },
            1,
        )

    def lora_state(self, max_lora: int, running: Iterable[str], waiting: Iterable[str]) -> None:
        """The LoRA info gauge's one series: ids joined by commas, none where ids may not be shown."""
        show = self.adapter_ids
        self.lora_info.set_labels(
            {
                "max_lora": str(max_lora),
                "running_lora_adapters": ",".join(running) if show else "",
                "waiting_lora_adapters": ",".join(waiting) if show else "",
            },
            time.time(),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
