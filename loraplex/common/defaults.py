"""Defaults of settings that more than one process reads, so that each is written once."""

from __future__ import annotations

# The shard's KV cache in tokens; the router plans batches against the same number.
MAX_BATCH_TOTAL_TOKENS = 32768
