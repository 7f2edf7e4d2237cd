"""The router's light endpoints: OpenAPI docs, /info and /metrics (its imports: tests/test_import_root.py)."""

from __future__ import annotations

import httpx

from tests.servers import Server


def test_docs_info_metrics(server: Server) -> None:
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/generate", "/generate_stream", "/v1/chat/completions", "/tokenize"} <= set(spec["paths"])
    info = httpx.get(server.url + "/info", timeout=10).json()
    assert info["max_total_tokens"] == 300 and info["max_input_tokens"] == 200
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "loraplex_queue_size",
        "loraplex_time_to_first_token_seconds",
        "loraplex_inter_token_latency_seconds",
        "loraplex_adapter_requests_total",
        "loraplex_batch_size",
        "loraplex_output_tokens_total",
    ):
        assert name in metrics
