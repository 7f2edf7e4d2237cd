"""Prefix caching: full KV blocks named by a chain hash of (adapter identity, every token up to the block's end)."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.shard.lora.adapter import LoraAdapter

BASE_IDENTITY = b"base"


def adapter_identity(adapter: LoraAdapter | None) -> bytes:
    """Who computed a block's KV: the base model, or one load of one adapter.

    The serial is new for every adapter object the store makes (a reload from changed files included), so
    blocks computed under an unloaded adapter can never be read under its successor; the id is there
    for readability of a collision-free key only.
    """
    if adapter is None:
        return BASE_IDENTITY
    return f"lora\0{adapter.adapter_id}\0{adapter.serial}".encode()


def chain_seed(identity: bytes) -> bytes:
    """The hash every chain of ``identity`` starts from: two identities never share a block hash."""
    return hashlib.sha256(b"loraplex-prefix\0" + identity).digest()


def chain_next(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a block given its parent's: it names every token before and inside it.

    sha256 rather than Python's ``hash``: that one is salted per process (tensor-parallel ranks must agree
    on what is reused) and 64 bits wide, where one collision would serve another prompt's keys.
    """
    return hashlib.sha256(previous + struct.pack(f"<{len(tokens)}I", *tokens)).digest()


def block_hashes(identity: bytes, tokens: Sequence[int], block_size: int, num_blocks: int) -> list[bytes]:
    """Chain hashes of the first ``num_blocks`` full blocks of ``tokens``."""
    out: list[bytes] = []
    h = chain_seed(identity)
    for i in range(num_blocks):
        h = chain_next(h, tokens[i * block_size : (i + 1) * block_size])
        out.append(h)
    return out


class PrefixIndex:
    """Which blocks hold a reusable prefix, and which of those no sequence uses (LRU, oldest first).

    The allocator asks it for a victim only when no block is truly free; a block in use is never in
    ``unused``, so it is never evicted. Counters follow vLLM's prefix_cache_queries / hits, in tokens.
    """

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.unused: OrderedDict[int, None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._hash_of)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Blocks of the longest run of ``hashes`` that is cached, from the first."""
        found = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def register(self, block: int, h: bytes) -> bool:
        """Name ``block`` by ``h``; False when another block already holds that prefix (this one stays private)."""
        if h in self._block_of or block in self._hash_of:
            return False
        self._block_of[h] = block
        self._hash_of[block] = h
        return True

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def evict(self) -> int | None:
        """Forget the least recently used unreferenced block and return it (None when there is none)."""
        if not self.unused:
            return None
        block, _ = self.unused.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def record(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit
