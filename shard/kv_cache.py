"""Paged KV cache: a block allocator that never touches tensors, and the per-layer block tensors."""

from __future__ import annotations

import torch

from loraplex.shard.config import ModelConfig
from loraplex.shard.prefix_cache import PrefixIndex


class KVCacheFull(RuntimeError):
    """Not enough free KV blocks for the tokens asked for."""


def plan_kv_blocks(token_budget: int, block_size: int, device: str) -> int:
    """How many KV blocks this shard has; the shard alone decides, and reports it to the router (Warmup).

    Every device takes the token budget (``--max-batch-total-tokens``) in whole blocks today. This is the
    hook for sizing a GPU's cache from its free memory instead (as TGI and vLLM do: run the largest
    prefill once, then give what memory is left to blocks); the router needs no change for that.
    """
    del device  # the hook's input: a CUDA shard would size from torch.cuda.mem_get_info() here
    return token_budget // block_size


class BlockAllocator:
    """Fixed-size KV blocks handed out by id, refcounted so that sequences can share a cached prefix.

    Without a ``PrefixIndex`` a block is free again the moment its last user lets go. With one, a block
    that holds a named prefix stays cached when unreferenced (``prefix.unused``, LRU) and counts as free:
    it is handed out again only when no truly free block is left, its name forgotten then.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix: PrefixIndex | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix = prefix
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        """Blocks a sequence may take now: truly free ones and unreferenced cached ones."""
        return len(self._free) + (len(self.prefix.unused) if self.prefix is not None else 0)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend a block table in place so that it holds ``num_tokens`` tokens."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > self.num_free:
            raise KVCacheFull(f"need {missing} more KV blocks, {self.num_free} free")
        for _ in range(missing):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            table.append(block)

    def _evict(self) -> int:
        assert self.prefix is not None
        block = self.prefix.evict()
        assert block is not None, "num_free counted an unused cached block that is not there"
        return block

    def share(self, blocks: list[int]) -> None:
        """Take one more reference on each (cached) block; an unused one leaves the LRU."""
        for block in blocks:
            if self._refs[block] == 0:
                assert self.prefix is not None
                del self.prefix.unused[block]
            self._refs[block] += 1

    def free(self, table: list[int]) -> None:
        """Drop one reference on each block of ``table`` and empty it.

        The table's tail goes to the LRU first: a chain's last blocks are evicted before its first ones,
        which every longer prefix needs.
        """
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self.prefix is not None and self.prefix.is_cached(block):
                    self.prefix.unused[block] = None
                else:
                    self._free.append(block)
        table.clear()


class KVCache:
    """Keys and values of every layer, laid out ``[num_blocks, block_size, kv_heads, head_dim]`` per layer.

    Blocks first, so that a decode step gathers a batch's blocks with one ``index_select`` on the leading
    dimension (whole blocks copied as rows) and attention reads the result in the layout it needs; a
    heads-first layout would need advanced indexing on an inner dimension, which costs three times as
    much as attention itself.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        *,
        num_kv_heads: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        prefix_caching: bool = False,
    ) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size, PrefixIndex() if prefix_caching else None)
        self.block_size = block_size
        shape = (config.num_layers, num_blocks, block_size, num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` [T, kv_heads, dim] of T tokens at their (block, offset) slots."""
        self.k[layer][blocks, offsets] = k
        self.v[layer][blocks, offsets] = v

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a batch as contiguous ``[batch, blocks*block_size, kv_heads, dim]`` (padded tables)."""
        batch, width = block_tables.shape
        flat = block_tables.reshape(-1)
        shape = (batch, width * self.block_size, self.k.shape[3], self.k.shape[4])
        return self.k[layer].index_select(0, flat).view(shape), self.v[layer].index_select(0, flat).view(shape)
