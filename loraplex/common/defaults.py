"""Defaults of settings that more than one process reads, so that each is written once."""

from __future__ import annotations

# --max-batch-total-tokens: the shard sizes its KV cache from it (in whole blocks); the router caps its token
# budget with it, and admits into the blocks the shard reports (docs/serving.md).
MAX_BATCH_TOTAL_TOKENS = 32768
