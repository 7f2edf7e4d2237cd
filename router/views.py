"""The router's own answer types: what RouterService returns and each API translates to its wire format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What the shards said about the model they serve, as the router reports it."""

    model_id: str
    dtype: str
    device: str
    num_shard: int
    kv_block_size: int = 0  # the shards' KV blocks the router admits into (0: not reported)
    kv_blocks: int = 0
    prefix_caching: bool = False  # the shards reuse the KV blocks of a prefix seen before (per adapter)


@dataclass(frozen=True)
class ServerInfo:
    """The answer of HTTP ``/info`` (these keys, in this order) and of gRPC ``Info`` (the fields it has)."""

    model_id: str
    model_dtype: str
    model_device_type: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int
    max_stop_sequences: int
    max_best_of: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    num_shard: int
    router: str
    version: str
    # The KV cache in the shards' blocks; max_batch_total_tokens is the same budget in tokens.
    kv_block_size: int
    kv_blocks: int
    # Full KV blocks of a prompt prefix seen before are reused (per adapter); a gateway's prefix-aware
    # routing matches prefixes in kv_block_size-token units.
    prefix_caching: bool


@dataclass(frozen=True)
class Health:
    """The answer of HTTP ``/health`` and gRPC ``Health``: ready, or why not (an error type and message)."""

    ok: bool
    error_type: str = ""
    message: str = ""


@dataclass(frozen=True)
class AdapterView:
    """One adapter the shards know, with the requests in flight that need it (0 where the router has none)."""

    id: str
    tier: str
    bytes: int
    rank: int
    targets: tuple[str, ...]
    requests: int
    load_seconds: float
    in_flight: int = 0
