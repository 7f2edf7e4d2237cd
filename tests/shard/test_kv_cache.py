"""The paged KV cache: block accounting, and keys read back from scattered blocks in the order written."""

from __future__ import annotations

import pytest
import torch

from loraplex.shard.kv_cache import BlockAllocator, KVCache, KVCacheFull
from tests.factories import attention_config


def test_allocator_grows_tables_frees_them_and_refuses_what_it_lacks() -> None:
    alloc = BlockAllocator(num_blocks=5, block_size=4)
    a: list[int] = []
    b: list[int] = []
    alloc.grow(a, 9)  # 9 tokens need 3 blocks of 4
    alloc.grow(b, 4)
    assert len(a) == 3 and len(b) == 1 and alloc.num_free == 1
    assert len(set(a) | set(b)) == 4
    with pytest.raises(KVCacheFull, match="need 2 more KV blocks, 1 free"):
        alloc.grow(b, 12)
    assert len(b) == 1  # a refused grow takes nothing
    alloc.free(a)
    assert a == [] and alloc.num_free == 4 and alloc.num_used == 1


def test_gather_returns_each_sequence_keys_in_token_order_from_scattered_blocks() -> None:
    config = attention_config(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    cache = KVCache(config, num_blocks=16, block_size=4, num_kv_heads=2, dtype=torch.float32)
    lengths = [7, 2, 12]
    # Interleave the allocations so that every sequence's blocks are scattered and out of order.
    tables: list[list[int]] = [[] for _ in lengths]
    for upto in range(1, 13):
        for table, n in zip(tables, lengths, strict=True):
            cache.allocator.grow(table, min(upto, n))
    torch.manual_seed(0)
    written = [torch.randn(n, 2, config.head_dim) for n in lengths]
    for table, keys in zip(tables, written, strict=True):
        pos = torch.arange(len(keys))
        blocks = torch.tensor(table)[pos // 4]
        cache.write(1, blocks, pos % 4, keys, -keys)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    k, v = cache.gather(1, padded)
    assert k.shape == (3, width * 4, 2, config.head_dim)
    for i, keys in enumerate(written):
        n = len(keys)
        assert torch.equal(k[i, :n], keys)
        assert torch.equal(v[i, :n], -keys)
    assert torch.count_nonzero(cache.k[0]) == 0  # layer 0 untouched
