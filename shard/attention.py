"""Attention over the paged KV cache: packed ragged prefill, one-token decode, and new tokens after cached ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.shard.kv_cache import KVCache


@dataclass(frozen=True)
class ContextGroup:
    """Sequences of a step whose new tokens also attend to keys already in the cache (read by block table).

    ``queries`` new tokens at most per sequence; with one, the group runs as decode does. Query j of a
    sequence sits at position ``start + j`` and may see keys ``[0, start + j]`` (``key_mask``, which also
    keeps a sliding window); padded query slots copy the last real one's mask and are dropped.
    """

    token_index: torch.Tensor | None  # packed rows of this group's tokens; None: every token of the step
    block_tables: torch.Tensor  # [batch, max_blocks]
    # [batch, 1, queries, max_blocks * block_size]: True = attend for one query a sequence, else additive
    # (0 or -inf, in the queries' dtype)
    key_mask: torch.Tensor
    queries: int
    pad_index: torch.Tensor | None = None  # [group tokens] -> row in [batch * queries]; None: no padding


@dataclass(frozen=True)
class AttentionInput:
    """Where a forward pass's tokens sit: built once per step, shared by every layer.

    Tokens are packed (sequence after sequence).  Prefill pads them into ``[batch, max_len]`` through
    ``pad_index`` (None when every sequence has the same length, so a view suffices); decode reads each
    sequence's blocks through ``block_tables`` and masks keys past ``context_lens``.
    """

    is_prefill: bool
    positions: torch.Tensor  # [T]
    slot_blocks: torch.Tensor  # [T] block of each new token
    slot_offsets: torch.Tensor  # [T] offset of each new token inside its block
    seq_lens: tuple[int, ...]  # new tokens per sequence
    max_position: int  # largest entry of positions, known on the host without a device sync
    pad_index: torch.Tensor | None = None  # prefill: position of each packed token in [batch * max_len]
    block_tables: torch.Tensor | None = None  # decode: [batch, max_blocks]
    key_mask: torch.Tensor | None = None  # decode: [batch, 1, 1, max_blocks * block_size], True = attend
    sliding_window: int | None = None
    # Steps where some sequence has cached keys before its new tokens (a cached prefix, an earlier chunk)
    # and it is not a decode-only step: every token goes through one of these groups instead.
    context: tuple[ContextGroup, ...] = ()

    @property
    def max_len(self) -> int:
        return max(self.seq_lens)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: KVCache, meta: AttentionInput
) -> torch.Tensor:
    """Store this step's k/v in the cache and attend; q [T, heads, dim] → [T, heads * dim]."""
    cache.write(layer, meta.slot_blocks, meta.slot_offsets, k, v)
    if meta.context:
        out = _with_context(q, layer, cache, meta.context)
    else:
        out = _prefill(q, k, v, meta) if meta.is_prefill else _decode(q, layer, cache, meta)
    return out.reshape(q.shape[0], -1)


def _with_context(q: torch.Tensor, layer: int, cache: KVCache, groups: tuple[ContextGroup, ...]) -> torch.Tensor:
    out = torch.empty_like(q) if groups[0].token_index is not None else q
    for g in groups:
        gq = q if g.token_index is None else q.index_select(0, g.token_index)
        if g.queries == 1:
            res = _decode_rows(gq, layer, cache, g.block_tables, g.key_mask)
        else:
            res = _extend(gq, layer, cache, g)
        if g.token_index is None:
            return res
        out[g.token_index] = res
    return out


def _extend(q: torch.Tensor, layer: int, cache: KVCache, g: ContextGroup) -> torch.Tensor:
    """Several new tokens per sequence against all of its cached keys (the new ones were just written)."""
    keys, values = cache.gather(layer, g.block_tables)  # [batch, keys, kv_heads, dim]
    batch, heads, dim = keys.shape[0], q.shape[1], q.shape[2]
    if g.pad_index is None:
        padded = q.view(batch, g.queries, heads, dim)
    else:
        padded = q.new_zeros(batch * g.queries, heads, dim)
        padded[g.pad_index] = q
        padded = padded.view(batch, g.queries, heads, dim)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=g.key_mask,
        enable_gqa=heads != keys.shape[2],
    )
    out = out.transpose(1, 2).reshape(batch * g.queries, heads, dim)
    return out if g.pad_index is None else out[g.pad_index]


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionInput) -> torch.Tensor:
    batch, length = len(meta.seq_lens), meta.max_len

    def pad(x: torch.Tensor) -> torch.Tensor:
        if meta.pad_index is None:
            return x.view(batch, length, x.shape[1], x.shape[2]).transpose(1, 2)
        padded = x.new_zeros(batch * length, x.shape[1], x.shape[2])
        padded[meta.pad_index] = x
        return padded.view(batch, length, x.shape[1], x.shape[2]).transpose(1, 2)

    mask = None
    if meta.sliding_window is not None and length > meta.sliding_window:
        i = torch.arange(length, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - meta.sliding_window)
    # Sequences are right-padded, so the causal mask alone keeps real queries off padded keys.
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
    )
    out = out.transpose(1, 2).reshape(batch * length, q.shape[1], q.shape[2])
    return out if meta.pad_index is None else out[meta.pad_index]


def _decode(q: torch.Tensor, layer: int, cache: KVCache, meta: AttentionInput) -> torch.Tensor:
    assert meta.block_tables is not None and meta.key_mask is not None
    return _decode_rows(q, layer, cache, meta.block_tables, meta.key_mask)


def _decode_rows(
    q: torch.Tensor, layer: int, cache: KVCache, block_tables: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """One new token per sequence against its cached keys; q [B, heads, dim] -> same shape."""
    keys, values = cache.gather(layer, block_tables)  # [batch, keys, kv_heads, dim]
    if block_diagonal_pays(q, keys.shape[2]):
        return decode_block_diagonal(q, keys, values, key_mask)
    batch, kv_heads = keys.shape[0], keys.shape[2]
    # Query heads that share a KV head become that head's "query positions": no KV repetition needed.
    grouped = q.view(batch, kv_heads, q.shape[1] // kv_heads, q.shape[2])
    out = F.scaled_dot_product_attention(grouped, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=key_mask)
    return out.reshape(batch, q.shape[1], q.shape[2])


# Largest heads x kv_heads x head_dim for which the block-diagonal form beat CPU fused attention in bfloat16
# (batch 64, 160 keys, 2026-11-29): 0.15-0.85x its time at eight shapes from SmolLM2-135M (9 x 3 x 64)
# to 24 x 8 x 128, but 1.17x at Llama-8B's 32 x 8 x 128, where the wasted multiply-adds outgrow the copies.
_BLOCK_DIAGONAL_MAX_WORK = 24 * 8 * 128


def block_diagonal_pays(q: torch.Tensor, kv_heads: int) -> bool:
    """Whether decode attention of ``q`` [B, heads, dim] should take the block-diagonal form (CPU, 16-bit)."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return False
    return q.shape[1] * kv_heads * q.shape[2] <= _BLOCK_DIAGONAL_MAX_WORK


def decode_block_diagonal(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """Decode attention as two batched matmuls over all KV heads at once; q [B, heads, dim] → same shape.

    Why: on the CPU, PyTorch's fused attention takes 0.6 ms a layer for a bfloat16 SmolLM2 batch of 64
    (one query per sequence), and a plain matmul wants each head's keys contiguous, which the blocks-first
    cache does not give. Instead each query is spread into a block-diagonal row over all heads' dims
    (zeros off its own KV head), so ``[B, heads, kv_heads*dim] @ [B, kv_heads*dim, keys]`` reads the
    gathered keys in place; the kv_heads-fold multiply-adds (3x for SmolLM2) cost less than the copies
    they avoid (0.29 ms a layer), up to the size ``block_diagonal_pays`` allows. Softmax runs in float32
    and the probabilities are cast back before the value matmul, as transformers' eager attention does.
    In float32 the wasted work costs more than it saves: fused attention stays.
    """
    batch, length, kv_heads, dim = keys.shape
    group = q.shape[1] // kv_heads
    spread = q.new_zeros(batch, kv_heads, group, kv_heads, dim)
    spread.diagonal(dim1=1, dim2=3).copy_(q.view(batch, kv_heads, group, dim).permute(0, 2, 3, 1))
    scores = torch.matmul(spread.view(batch, q.shape[1], kv_heads * dim), keys.view(batch, length, -1).transpose(1, 2))
    scores = scores.float().mul_(dim**-0.5).masked_fill_(~key_mask.view(batch, 1, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values.view(batch, length, -1)).view(batch, kv_heads, group, kv_heads, dim)
    return out.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(batch, q.shape[1], dim)
