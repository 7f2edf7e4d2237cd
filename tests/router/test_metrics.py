"""/metrics: the model-server protocol's metrics, adapter labels bounded by --metrics-top-adapters, the
prefix cache's counters, all as Prometheus' own parser reads them."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.proto.shard.v1 import shard_pb2 as pb
from loraplex.router.ledger import RequestLedger
from loraplex.router.metrics import OTHER, Metrics
from loraplex.router.service import RouterService
from loraplex.router.settings import RouterSettings, settings_from_args
from loraplex.router.views import ModelInfo

SETTINGS = RouterSettings(max_input_tokens=24, max_total_tokens=40, max_batch_total_tokens=4096)
# Every per-adapter metric: its adapter label is what --metrics-top-adapters bounds.
PER_ADAPTER = ("loraplex_adapter_requests", "loraplex_adapter_tokens", "loraplex_adapter_load_seconds")


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def adapter_labels(text: str) -> set[str]:
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return {s.labels["adapter"] for s in samples if "adapter" in s.labels}


def serve_request(metrics: Metrics, adapter: str, tokens: int = 4) -> None:
    """What the router records for one request: RouterService.prepare, the adapter load, Scheduler's tokens."""
    metrics.adapter_names.requested(adapter)
    metrics.adapter_requests.labels(adapter).inc()
    metrics.adapter_load_seconds.labels(adapter).set(0.01)
    for _ in range(tokens):
        metrics.adapter_tokens.labels(adapter).inc()


def test_5000_adapters_requested_once_each_keep_metrics_under_1mb_and_labels_within_the_bound() -> None:
    metrics = Metrics(named_adapters=50)
    ids = [f"tenant-{i % 7}/adapter-{i:05d}" for i in range(5000)]
    for adapter in ids:
        serve_request(metrics, adapter)
    serve_request(metrics, "base")
    # The LoRA info gauge names what is held and awaited (ids a picker needs), bounded by the tiers, not the bound.
    metrics.lora_state(64, ids[-320:], ids[-128:])
    text = metrics.render().decode()
    assert len(text.encode()) < 1_000_000
    labels = adapter_labels(text)
    assert len(labels - {"base", OTHER}) <= 50 and {"base", OTHER} <= labels
    requests = families(text)["loraplex_adapter_requests"]
    assert sum(s.value for s in requests.samples if s.name.endswith("_total")) == 5001  # nobody lost, nobody demoted


def test_the_most_requested_adapters_take_the_names_and_the_rest_are_other() -> None:
    metrics = Metrics(named_adapters=3)
    for adapter in ("a", "b", "c", "d"):  # first come: a, b, c named while there is room; d is other
        serve_request(metrics, adapter)
    text = metrics.render().decode()
    assert adapter_labels(text) == {"a", "b", "c", OTHER}
    for adapter in ("a", "b", "c"):  # loaded: the tier gauge names them too (named adapters only)
        metrics.adapter_tier.labels(adapter, "host").set(1)
    for _ in range(3):
        serve_request(metrics, "d")  # d overtakes the least requested (a tie among a, b, c: one goes)
    text = metrics.render().decode()
    labels = adapter_labels(text)
    assert "d" in labels and len(labels - {OTHER}) == 3
    demoted = ({"a", "b", "c"} - labels).pop()
    metrics.adapter_tokens.labels(demoted).inc()  # its request still running: counted as other from now on
    after = families(metrics.render().decode())
    for name in (*PER_ADAPTER, "loraplex_adapter_tier"):  # its own series are gone
        assert demoted not in {s.labels.get("adapter") for s in after[name].samples}
    requests = {s.labels["adapter"]: s.value for s in after["loraplex_adapter_requests"].samples if "_total" in s.name}
    assert requests["d"] == 3  # its series starts when it is named (its first request counted as other)
    assert requests[OTHER] == 1
    tokens = {s.labels["adapter"]: s.value for s in after["loraplex_adapter_tokens"].samples if "_total" in s.name}
    assert tokens[OTHER] == 4 + 1
    serve_request(metrics, demoted)  # two requests now: it overtakes a named one with one, and is named again
    assert demoted in adapter_labels(metrics.render().decode())


def test_zero_names_no_adapter_and_hidden_ids_name_none() -> None:
    nothing = Metrics(named_adapters=0)
    hidden = Metrics(adapter_ids=False)
    for m in (nothing, hidden):
        serve_request(m, "team-a/secret")
        serve_request(m, "base")
    assert adapter_labels(nothing.render().decode()) == {OTHER, "base"}
    assert adapter_labels(hidden.render().decode()) == {"adapter", "base"}


def test_the_flag_and_its_bounds() -> None:
    assert RouterSettings().metrics_top_adapters == 100
    assert settings_from_args(["--metrics-top-adapters", "7"]).metrics_top_adapters == 7
    with pytest.raises(SystemExit):
        settings_from_args(["--metrics-top-adapters", "-1"])


def test_shard_counters_survive_a_shard_restart() -> None:
    metrics = Metrics()
    for running_total in (10, 15, 3, 9):  # the shard restarted after 15: it counts from 0 again
        metrics.prefix_queries.update(running_total)
    got = families(metrics.render().decode())
    for name in ("loraplex_prefix_cache_queried_tokens", "vllm:prefix_cache_queries"):
        assert got[name].type == "counter"
        assert [s.value for s in got[name].samples if s.name.endswith("_total")] == [24.0]


class _Shards:
    def __init__(self, health: pb.HealthResponse) -> None:
        self.answer = health

    async def health(self, timeout: float) -> pb.HealthResponse:
        return self.answer

    async def list_adapters(self) -> list[Any]:
        return []


def _service(
    health: pb.HealthResponse, ids_shown: bool = True, model: ModelInfo | None = None
) -> tuple[RouterService, SimpleNamespace, SimpleNamespace]:
    """A service over stand-ins of exactly what /metrics reads: the queue, the batch, the adapters held."""
    metrics = Metrics(adapter_ids=ids_shown)

    async def loop() -> None:
        return None

    scheduler = SimpleNamespace(
        shards=_Shards(health), metrics=metrics, waiting=[], running={}, adapter_slots=8, run=loop, in_flight=0
    )
    registry = SimpleNamespace(loaded={}, refs=Counter(), capacity=16)
    ledger = RequestLedger(registry, 0, 0)  # type: ignore[arg-type]
    model = model or ModelInfo("m", "float32", "cpu", 1, kv_block_size=16, kv_blocks=8, prefix_caching=True)
    return RouterService(scheduler, None, SETTINGS, model, registry, ledger), scheduler, registry  # type: ignore[arg-type]


def _request(adapter: str) -> SimpleNamespace:
    return SimpleNamespace(params=SimpleNamespace(adapter_id=adapter))


@pytest.mark.parametrize("ids_shown", [True, False])
def test_protocol_metrics_types_values_and_labels(ids_shown: bool) -> None:
    health = pb.HealthResponse(
        kv_blocks_used=6, kv_blocks_free=2, prefix_queried_tokens=640, prefix_hit_tokens=512, prefix_cached_blocks=5
    )
    service, scheduler, registry = _service(health, ids_shown)
    registry.loaded.update({"old": 1.0, "new": 2.0})  # held in memory, most recently used first
    registry.refs.update({"new": 1, "loading": 2, "queued": 1})
    scheduler.waiting.extend([_request("queued"), _request(""), _request("new")])
    scheduler.running.update({1: _request("new")})

    async def scrape() -> str:
        await service.run()  # sets what is fixed at start: the cache's configuration
        return (await service.render_metrics()).decode()

    got = families(asyncio.run(scrape()))
    for name, value in (
        ("vllm:num_requests_waiting", 3),
        ("loraplex_queue_size", 3),
        ("vllm:num_requests_running", 1),
        ("loraplex_running_requests", 1),
        ("vllm:kv_cache_usage_perc", 0.75),  # 6 of the shards' 8 blocks
        ("loraplex_kv_cache_usage_perc", 0.75),
        ("loraplex_prefix_cache_blocks", 5),
    ):
        assert got[name].type == "gauge" and [s.value for s in got[name].samples] == [value], name
    for name, value in (
        ("vllm:prefix_cache_queries", 640),
        ("vllm:prefix_cache_hits", 512),
        ("loraplex_prefix_cache_queried_tokens", 640),
        ("loraplex_prefix_cache_hit_tokens", 512),
    ):
        assert got[name].type == "counter" and got[name].samples[0].value == value, name
    for name in ("vllm:lora_requests_info", "loraplex_lora_requests_info"):
        (sample,) = got[name].samples
        assert got[name].type == "gauge" and sample.value > 1.7e9  # the reading's Unix time
        assert sample.labels == {
            "max_lora": "8",
            "running_lora_adapters": "new,old" if ids_shown else "",
            "waiting_lora_adapters": "loading,queued,new" if ids_shown else "",
        }
    for name in ("vllm:cache_config_info", "loraplex_cache_config_info"):
        (sample,) = got[name].samples
        assert sample.value == 1
        assert sample.labels == {"block_size": "16", "num_gpu_blocks": "8", "enable_prefix_caching": "True"}
    assert service.info().prefix_caching is True and service.info().kv_block_size == 16


def test_kv_usage_returns_to_zero_and_the_lists_empty_when_idle() -> None:
    service, _, registry = _service(pb.HealthResponse(kv_blocks_used=0, kv_blocks_free=8))
    registry.loaded["kept"] = 1.0
    got = families(asyncio.run(service.render_metrics()).decode())
    assert got["vllm:kv_cache_usage_perc"].samples[0].value == 0
    assert got["vllm:num_requests_waiting"].samples[0].value == 0
    (sample,) = got["vllm:lora_requests_info"].samples
    assert sample.labels["running_lora_adapters"] == "kept" and sample.labels["waiting_lora_adapters"] == ""
