"""Prometheus metrics of the router (a private registry per process, served at /metrics)."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

M = TypeVar("M", Counter, Gauge)


class AdapterLabelled(Generic[M]):
    """A metric with an ``adapter`` label that names the adapter only where ids may be shown.

    /metrics is open (scrapers carry no key): under tenancy an id would tell anyone which adapters every
    tenant has and how much each is used, so there every adapter is counted as ``adapter`` (the base model
    stays ``base``) unless --metrics-adapter-labels says otherwise (docs/serving.md).
    """

    def __init__(self, metric: M, show_ids: bool) -> None:
        self.metric: M = metric
        self.show_ids = show_ids

    def labels(self, adapter: str, *rest: str) -> M:
        return self.metric.labels(adapter if self.show_ids or adapter == "base" else "adapter", *rest)

    def clear(self) -> None:
        self.metric.clear()


class Metrics:
    def __init__(self, adapter_ids: bool = True) -> None:
        """``adapter_ids``: per-adapter series carry the adapter's id (False: ``adapter`` for every adapter)."""
        self.adapter_ids = adapter_ids
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
            Counter("loraplex_adapter_requests", "Requests per adapter", ["adapter"], registry=r), adapter_ids
        )
        self.adapter_tokens = AdapterLabelled(
            Counter("loraplex_adapter_tokens", "Generated tokens per adapter", ["adapter"], registry=r), adapter_ids
        )
        self.adapter_load_seconds = AdapterLabelled(
            Gauge("loraplex_adapter_load_seconds", "Seconds the adapter's last load took", ["adapter"], registry=r),
            adapter_ids,
        )
        # Per adapter only where ids are shown (a 1 per adapter would add up to nothing useful otherwise).
        self.adapter_tier = Gauge(
            "loraplex_adapter_tier",
            "1 for the tier each loaded adapter is in (host or device)",
            ["adapter", "tier"],
            registry=r,
        )
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
