"""The router's settings: one dataclass, filled from flags and their environment twins."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from loraplex.common.defaults import MAX_BATCH_TOTAL_TOKENS
from loraplex.common.flags import FlagParser
from loraplex.common.shutdown import DRAIN_TIMEOUT, add_drain_timeout_flag


@dataclass(frozen=True)
class RouterSettings:
    shard_uds: tuple[str, ...] = ("unix:///tmp/loraplex-shard-0.sock",)
    hostname: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 50051
    tokenizer_dir: Path | None = None
    model_id: str = ""
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_batch_prefill_tokens: int = 4096
    # Prompt tokens one step runs beside its decodes (chunked prefill); 0: whole prompts, no chunking.
    prefill_chunk_tokens: int = 256
    max_batch_total_tokens: int = MAX_BATCH_TOTAL_TOKENS
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_batch_size: int = 256
    waiting_served_ratio: float = 1.2
    adapter_slot_patience: float = 2.0
    # With prefix caching, requests expected to find their prompt's prefix cached overtake those that arrived
    # less than this many seconds before them (router/admission.py ``cached_first``); 0: arrival order.
    cached_prefix_patience: float = 2.0
    drain_timeout: float = DRAIN_TIMEOUT
    connect_timeout: float = 120.0
    max_body_bytes: int = 1 << 20
    max_connections: int = 1024
    api_keys_file: Path | None = None
    admin_token: str = ""
    max_concurrent_requests_per_tenant: int = 0  # 0: no limit but --max-concurrent-requests
    max_adapter_loads_per_tenant: int = 0
    metrics_adapter_labels: bool = False
    # Adapters with series of their own in /metrics (the most requested); the rest count as ``other``.
    metrics_top_adapters: int = 100
    json_output: bool = False


def add_serving_flags(p: FlagParser) -> None:
    """Flags shared by the router and the launcher (which passes them on)."""
    d = RouterSettings()
    p.flag("--max-input-tokens", type=int, default=d.max_input_tokens)
    p.flag("--max-total-tokens", type=int, default=d.max_total_tokens)
    p.flag("--max-batch-prefill-tokens", type=int, default=d.max_batch_prefill_tokens)
    p.flag(
        "--prefill-chunk-tokens",
        type=int,
        default=d.prefill_chunk_tokens,
        help="prompt tokens a step runs beside its decodes (chunked prefill, at most --max-batch-prefill-tokens); "
        "0: whole prompts",
    )
    p.flag("--max-batch-total-tokens", type=int, default=d.max_batch_total_tokens)
    p.flag("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    p.flag("--max-stop-sequences", type=int, default=d.max_stop_sequences)
    p.flag("--max-top-n-tokens", type=int, default=d.max_top_n_tokens)
    p.flag("--max-batch-size", type=int, default=d.max_batch_size)
    p.flag("--hostname", env="LORAPLEX_HOSTNAME", default=d.hostname)
    p.flag("--port", type=int, default=d.port)
    p.flag("--grpc-port", type=int, default=d.grpc_port, help="public gRPC port; 0 disables it")
    p.flag(
        "--adapter-slot-patience",
        type=float,
        default=d.adapter_slot_patience,
        help="seconds a request for an adapter not on the device lets others overtake it",
    )
    p.flag(
        "--cached-prefix-patience",
        type=float,
        default=d.cached_prefix_patience,
        help="with prefix caching, requests whose prompt prefix is cached overtake those that arrived less than "
        "this many seconds before them; 0 keeps arrival order",
    )
    add_drain_timeout_flag(p, "on SIGTERM, seconds to let in-flight requests finish (new ones get 503) before exiting")
    p.flag("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger HTTP bodies get 413")
    p.flag(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="open HTTP connections at once; beyond it a request gets 503 (0: no limit)",
    )
    p.flag("--api-keys-file", type=Path, default=None)
    p.flag("--admin-token", default="")
    p.flag(
        "--max-concurrent-requests-per-tenant",
        type=int,
        default=d.max_concurrent_requests_per_tenant,
        help="requests one tenant (API key entry) may have in flight; beyond it that tenant gets 429 (0: no limit)",
    )
    p.flag(
        "--max-adapter-loads-per-tenant",
        type=int,
        default=d.max_adapter_loads_per_tenant,
        help="requests of one tenant waiting for an adapter load at once; beyond it 429 (0: no limit)",
    )
    p.flag(
        "--metrics-adapter-labels",
        action="store_true",
        help="name adapters in /metrics even with --api-keys-file (/metrics is open: ids are hidden by default)",
    )
    p.flag(
        "--metrics-top-adapters",
        type=int,
        default=d.metrics_top_adapters,
        help="adapters named in /metrics' per-adapter series (the most requested); the rest count as `other`",
    )
    p.flag("--json-output", action="store_true")


def router_parser() -> FlagParser:
    p = FlagParser(prog="loraplex-router", description="The loraplex router: public APIs in front of the shards.")
    p.flag(
        "--shard-uds",
        env="SHARD_UDS",
        default=",".join(RouterSettings.shard_uds),
        help="comma list of shard addresses, rank 0 first",
    )
    p.flag("--tokenizer-dir", type=Path, default=None, help="default: the model directory rank 0 reports")
    p.flag("--model-id", default="", help="name reported by /info and /v1/models")
    p.flag(
        "--connect-timeout",
        type=float,
        default=RouterSettings.connect_timeout,
        help="seconds to wait at start-up for every shard to answer (they may still be loading the model)",
    )
    add_serving_flags(p)
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> RouterSettings:
    p = router_parser()
    args = p.parse(argv)
    values = {f.name: getattr(args, f.name) for f in fields(RouterSettings) if hasattr(args, f.name)}
    values["shard_uds"] = tuple(a.strip() for a in args.shard_uds.split(",") if a.strip())
    s = RouterSettings(**values)
    problems = []
    if s.max_input_tokens >= s.max_total_tokens:
        problems.append("--max-input-tokens must be less than --max-total-tokens")
    if s.max_batch_prefill_tokens < s.max_input_tokens:
        problems.append("--max-batch-prefill-tokens must be at least --max-input-tokens")
    if s.max_batch_total_tokens < s.max_total_tokens:
        problems.append("--max-batch-total-tokens must be at least --max-total-tokens")
    if min(s.max_concurrent_requests, s.max_batch_size, s.max_input_tokens) < 1:
        problems.append("limits must be positive")
    if s.prefill_chunk_tokens < 0:
        problems.append("--prefill-chunk-tokens must be 0 (no chunking) or positive")
    if min(s.adapter_slot_patience, s.cached_prefix_patience) < 0:
        problems.append("--adapter-slot-patience and --cached-prefix-patience must be 0 or positive")
    if min(s.max_concurrent_requests_per_tenant, s.max_adapter_loads_per_tenant) < 0:
        problems.append("per-tenant limits must be 0 (no limit) or positive")
    if s.metrics_top_adapters < 0:
        problems.append("--metrics-top-adapters must be 0 (every adapter is `other`) or positive")
    if s.connect_timeout <= 0:
        problems.append("--connect-timeout must be positive")
    if not s.shard_uds:
        problems.append("--shard-uds names no shard")
    if problems:
        p.error(problems[0])
    return s
