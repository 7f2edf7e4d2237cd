"""What the router expects the shards' prefix cache to hold: an estimate for token budgets, never for results."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixEstimate:
    """Full blocks of prompts the shards have run, per adapter, remembered as the shards' cache would be (LRU,
    as many blocks as the shards have).

    Why: the step's prompt-token budget (``--prefill-chunk-tokens``, ``--max-batch-prefill-tokens``) counts the
    tokens a request will really compute. Without this, 64 requests that share a 512-token system prompt
    each take 544 tokens of budget although the shard, finding 512 of them cached, computes 32: one request
    a step instead of eight. An estimate that is wrong costs time only: a request the shard found less of
    takes its further chunks from the budget as its prompt goes on (the router never counts a prompt done
    before its first token comes), one it found more of ends its prompt early. The shards stay the only
    judges of what is reused (``shard/prefix_cache.py``). Python's ``hash`` is fine here: a collision only
    misjudges a budget.
    """

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        self.block_size = block_size
        self.capacity = max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def hashes(self, adapter: str, tokens: Sequence[int]) -> list[int]:
        """Chain hashes of the full blocks of ``tokens`` under ``adapter`` ("" for the base)."""
        out, h, bs = [], hash(("loraplex-prefix", adapter)), self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            h = hash((h, tuple(tokens[start : start + bs])))
            out.append(h)
        return out

    def cached(self, hashes: Sequence[int], length: int) -> int:
        """Tokens of a ``length``-token prompt expected in the cache: its longest remembered run of blocks,
        short of its last token (which the shard always computes)."""
        found = 0
        for h in hashes[: (length - 1) // self.block_size]:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            found += 1
        return found * self.block_size

    def record(self, hashes: Sequence[int], tokens: int) -> None:
        """The shards now hold the blocks of the first ``tokens`` tokens (their KV is computed)."""
        for h in hashes[: tokens // self.block_size]:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
