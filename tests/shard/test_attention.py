"""Attention: the CPU block-diagonal decode against fused attention, which one runs, and chunks after cached keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraplex.shard.attention import AttentionInput, attention, block_diagonal_pays, decode_block_diagonal
from loraplex.shard.kv_cache import KVCache
from loraplex.shard.runner import SequenceState, build_runner
from tests.factories import attention_config, tiny_model


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 fused attention with every KV head repeated for its query heads."""
    group = q.shape[1] // keys.shape[2]
    k = keys.float().repeat_interleave(group, dim=2).transpose(1, 2)
    v = values.float().repeat_interleave(group, dim=2).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k, v, attn_mask=mask)
    return out.squeeze(2)


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    return {"atol": tol, "rtol": tol}


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_diagonal_decode_matches_fused_attention(heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    batch, length, dim = 5, 24, 16
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    keys = torch.randn(batch, length, kv_heads, dim, generator=gen).to(dtype)
    values = torch.randn(batch, length, kv_heads, dim, generator=gen).to(dtype)
    # Ragged lengths, and one row whose early keys fall outside a sliding window.
    lens = torch.tensor([1, 7, 24, 13, 20])
    pos = torch.arange(length)
    mask = pos[None, :] < lens[:, None]
    mask[4, :9] = False
    mask = mask[:, None, None, :]
    out = decode_block_diagonal(q, keys, values, mask)
    assert out.shape == q.shape and out.dtype == dtype
    ref = _reference(q, keys, values, mask)
    torch.testing.assert_close(out.float(), ref, **_tolerance(dtype))
    # A masked key must not count: changing it changes nothing.
    keys[4, 3] += 100
    values[4, 3] -= 100
    assert torch.equal(decode_block_diagonal(q, keys, values, mask), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_through_the_cache_matches_the_reference(dtype: torch.dtype) -> None:
    config = attention_config(num_layers=1, num_heads=6, num_kv_heads=2, head_dim=8)
    cache = KVCache(config, num_blocks=8, block_size=4, num_kv_heads=2, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    # Two sequences already hold 5 and 2 tokens; this step writes the 6th and 3rd.
    tables = torch.tensor([[3, 6], [1, 0]])
    history = [torch.randn(n, 2, 2, 8, generator=gen).to(dtype) for n in (5, 2)]
    for table, kv in zip(tables, history, strict=True):
        p = torch.arange(len(kv))
        cache.write(0, table[p // 4], p % 4, kv[:, 0], kv[:, 1])
    q = torch.randn(2, 6, 8, generator=gen).to(dtype)
    k_new, v_new = torch.randn(2, 2, 2, 8, generator=gen).to(dtype).unbind(1)
    mask = torch.arange(8)[None, :] <= torch.tensor([5, 2])[:, None]
    meta = AttentionInput(
        is_prefill=False,
        positions=torch.tensor([5, 2]),
        slot_blocks=torch.tensor([6, 1]),
        slot_offsets=torch.tensor([1, 2]),
        seq_lens=(1, 1),
        max_position=5,
        block_tables=tables,
        key_mask=mask[:, None, None, :],
    )
    out = attention(q, k_new, v_new, 0, cache, meta)
    assert out.shape == (2, 48)
    for row, (kv, n) in enumerate(zip(history, (5, 2), strict=True)):
        keys = torch.cat([kv[:, 0], k_new[row : row + 1]])[None]
        values = torch.cat([kv[:, 1], v_new[row : row + 1]])[None]
        ref = _reference(q[row : row + 1], keys, values, torch.ones(1, 1, 1, n + 1, dtype=torch.bool))
        torch.testing.assert_close(out[row].float().view(6, 8), ref[0], **_tolerance(dtype))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "dtype", "device", "expected"),
    [
        (9, 3, 64, torch.bfloat16, "cpu", True),  # SmolLM2-135M: 0.49x fused attention's time
        (16, 16, 64, torch.float16, "cpu", True),  # multi-head: 0.15x
        (24, 8, 128, torch.bfloat16, "cpu", True),  # the largest measured win: 0.78x
        (32, 8, 128, torch.bfloat16, "cpu", False),  # Llama-8B: 1.17x, fused attention stays
        (9, 3, 64, torch.float32, "cpu", False),  # float32: fused attention is faster
        (9, 3, 64, torch.bfloat16, "meta", False),  # any accelerator keeps fused attention
    ],
)
def test_block_diagonal_is_taken_where_it_was_measured_to_pay(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str, expected: bool
) -> None:
    q = torch.empty(2, heads, dim, dtype=dtype, device=device)
    assert block_diagonal_pays(q, kv_heads) is expected


@pytest.mark.parametrize("kind", ["llama", "mistral_sliding", "qwen2"])
def test_chunks_after_cached_keys_match_transformers(tmp_path: Path, kind: str) -> None:
    """New tokens at [start, end) attending to cached keys through the block table, beside a decode and a
    fresh prompt in the same step: every row's logits against transformers' own on the whole sequence."""
    hf = tiny_model(tmp_path, kind)
    runner = build_runner(tmp_path, kv_blocks=32, block_size=4)
    gen = torch.Generator().manual_seed(2)
    vocab = hf.config.vocab_size
    chunked = SequenceState(0, torch.randint(vocab, (19,), generator=gen).tolist())
    decoding = SequenceState(1, torch.randint(vocab, (6,), generator=gen).tolist())
    runner.prefill([decoding])
    decoding.token_ids.append(5)
    late = SequenceState(2, torch.randint(vocab, (3,), generator=gen).tolist())  # padded to the chunk beside it
    steps = [[(chunked, 7)], [(chunked, 5), (decoding, 1), (late, 3)], [(decoding, 1), (chunked, 7)]]
    with torch.no_grad():
        for work in steps:
            starts = [s.num_cached for s, _ in work]
            logits = runner.step(work, [True] * len(work))
            row = 0
            for (s, n), start in zip(work, starts, strict=True):
                ref = hf(input_ids=torch.tensor([s.token_ids[: start + n]])).logits[0, start:]
                torch.testing.assert_close(logits[row : row + n], ref, atol=1e-4, rtol=1e-4)
                row += n
            if decoding.num_cached == len(decoding.token_ids):
                decoding.token_ids.append(9)
    assert chunked.num_cached == 19 and late.num_cached == 3
