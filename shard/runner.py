"""The model runner: turns sequences into forward passes (ragged prefill, one-token decode) on the paged cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.shard.attention import AttentionInput
from loraplex.shard.config import ModelConfig
from loraplex.shard.kv_cache import KVCache, KVCacheFull
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.plan import LoraPlan, make_plan
from loraplex.shard.model import CausalLM
from loraplex.shard.parallel import TensorParallel


@dataclass(eq=False)
class SequenceState:
    """One request's tokens and KV blocks; tokens past ``num_cached`` are waiting to be run."""

    request_id: int
    token_ids: list[int]
    adapter: LoraAdapter | None = None
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0

    @property
    def pending(self) -> int:
        return len(self.token_ids) - self.num_cached


class ModelRunner:
    """Runs batches of sequences through the model; owns the KV cache and caches the LoRA plan."""

    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        decode_lora_dtype: torch.dtype | None = None,
        prefill_lora_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        # dtype of the per-batch LoRA stacks in decode and in prefill (None: the adapters' own); decode's
        # one row per adapter is a batched GEMV, prefill's many rows a batched GEMM: see docs/architecture.md.
        self.decode_lora_dtype = decode_lora_dtype
        self.prefill_lora_dtype = prefill_lora_dtype
        self._plan_key: tuple[int, ...] | None = None
        self._plan: LoraPlan | None = None

    @torch.inference_mode()
    def prefill(self, seqs: Sequence[SequenceState], all_logits: bool = False) -> torch.Tensor:
        """Run every token of fresh sequences; logits of each last token ([B, V]) or of all tokens ([T, V])."""
        if any(s.num_cached for s in seqs) or any(not s.token_ids for s in seqs):
            raise ValueError("prefill takes fresh, non-empty sequences")
        device = self.model.device
        lens = [len(s.token_ids) for s in seqs]
        self._reserve(seqs)
        positions = torch.cat([torch.arange(n) for n in lens])
        blocks, offsets = self._slots(seqs, [range(n) for n in lens])
        longest = max(lens)
        pad_index = None
        if min(lens) != longest:
            pad_index = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lens)])
        meta = AttentionInput(
            is_prefill=True,
            positions=positions.to(device),
            slot_blocks=blocks,
            slot_offsets=offsets,
            seq_lens=tuple(lens),
            max_position=longest - 1,
            pad_index=pad_index.to(device) if pad_index is not None else None,
            sliding_window=self.model.config.sliding_window,
        )
        ids = torch.tensor([t for s in seqs for t in s.token_ids], device=device)
        rows = None if all_logits else torch.tensor(lens, device=device).cumsum(0) - 1
        lora = self._lora([s.adapter for s, n in zip(seqs, lens, strict=True) for _ in range(n)], cache=False)
        logits = self.model.forward(ids, meta, self.cache, lora, rows)
        for s in seqs:
            s.num_cached = len(s.token_ids)
        return logits

    @torch.inference_mode()
    def decode(self, seqs: Sequence[SequenceState]) -> torch.Tensor:
        """Run the one pending token of every sequence; logits [B, V]."""
        if any(s.pending != 1 or s.num_cached == 0 for s in seqs):
            raise ValueError("decode takes prefilled sequences with exactly one new token each")
        device = self.model.device
        self._reserve(seqs)
        positions = [s.num_cached for s in seqs]
        blocks, offsets = self._slots(seqs, [range(p, p + 1) for p in positions])
        width = max(len(s.blocks) for s in seqs)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=device)
        key_pos = torch.arange(width * self.cache.block_size, device=device)
        ctx = torch.tensor(positions, device=device)[:, None]
        mask = key_pos[None, :] <= ctx
        window = self.model.config.sliding_window
        if window is not None:
            mask &= key_pos[None, :] > ctx - window
        meta = AttentionInput(
            is_prefill=False,
            positions=ctx[:, 0],
            slot_blocks=blocks,
            slot_offsets=offsets,
            seq_lens=(1,) * len(seqs),
            max_position=max(positions),
            block_tables=tables,
            key_mask=mask[:, None, None, :],
        )
        ids = torch.tensor([s.token_ids[-1] for s in seqs], device=device)
        logits = self.model.forward(ids, meta, self.cache, self._lora([s.adapter for s in seqs], cache=True))
        for s in seqs:
            s.num_cached += 1
        return logits

    def release(self, seq: SequenceState) -> None:
        """Give a finished sequence's KV blocks back at once."""
        self.cache.allocator.free(seq.blocks)
        seq.num_cached = 0

    def _reserve(self, seqs: Sequence[SequenceState]) -> None:
        alloc = self.cache.allocator
        needed = sum(max(0, alloc.blocks_for(len(s.token_ids)) - len(s.blocks)) for s in seqs)
        if needed > alloc.num_free:
            raise KVCacheFull(f"the batch needs {needed} more KV blocks, {alloc.num_free} free")
        for s in seqs:
            alloc.grow(s.blocks, len(s.token_ids))

    def _slots(self, seqs: Sequence[SequenceState], spans: list[range]) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.cache.block_size
        blocks = [s.blocks[p // bs] for s, span in zip(seqs, spans, strict=True) for p in span]
        offsets = [p % bs for span in spans for p in span]
        device = self.model.device
        return torch.tensor(blocks, device=device), torch.tensor(offsets, device=device)

    def _lora(self, row_adapters: list[LoraAdapter | None], cache: bool) -> LoraPlan | None:
        if all(a is None for a in row_adapters):
            return None
        key = tuple(a.serial if a is not None else 0 for a in row_adapters)
        if cache and key == self._plan_key:
            return self._plan
        if cache:
            self.forget_plan()  # the old plan's weight copies go before the new ones are made, not after
        dtype = self.decode_lora_dtype if cache else self.prefill_lora_dtype
        plan = make_plan(row_adapters, self.model.config, dtype, self.model.device)
        if cache:
            self._plan_key, self._plan = key, plan
        return plan

    def forget_plan(self) -> None:
        """Drop the cached decode plan (it holds copies of adapter weights) so unloaded weights are freed."""
        self._plan_key, self._plan = None, None

    def generate_greedy(
        self,
        requests: Sequence[tuple[list[int], LoraAdapter | None]],
        max_new_tokens: int,
        prefill_batch: int | None = None,
    ) -> list[list[int]]:
        """Greedy continuation of every request in one decode batch (no stop condition but the length).

        Prefill takes ``prefill_batch`` requests a call (all of them when None), as the router's prefill
        token budget splits a burst of arrivals.
        """
        if not requests:
            raise ValueError("generate_greedy needs at least one request")
        if prefill_batch is not None and prefill_batch < 1:
            raise ValueError(f"prefill_batch must be at least 1, not {prefill_batch}")
        seqs = [SequenceState(i, list(ids), adapter) for i, (ids, adapter) in enumerate(requests)]
        size = prefill_batch or len(seqs)
        try:
            logits = torch.cat([self.prefill(seqs[i : i + size]) for i in range(0, len(seqs), size)])
            for step in range(max_new_tokens):
                for s, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                    s.token_ids.append(token)
                if step + 1 < max_new_tokens:
                    logits = self.decode(seqs)
        finally:
            for s in seqs:
                self.release(s)
        return [s.token_ids[len(ids) :] for s, (ids, _) in zip(seqs, requests, strict=True)]


def parse_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere, as the spec's ``--dtype`` says."""
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in choices:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(choices)}")
    return choices[name]


def build_runner(
    directory: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    kv_blocks: int = 1024,
    block_size: int = 16,
    tp: TensorParallel | None = None,
) -> ModelRunner:
    """Load a checkpoint directory (this rank's slice) and give it a KV cache of ``kv_blocks`` blocks."""
    config = ModelConfig.from_dir(directory)
    model = CausalLM.load(directory, config, dtype, device, tp)
    local = model.config
    cache = KVCache(local, kv_blocks, block_size, num_kv_heads=local.num_kv_heads, dtype=dtype, device=device)
    # PyTorch's CPU bfloat16 batched GEMV streams 2-3x fewer bytes/s than float32 (measured on an AVX-512
    # BF16 CPU), so on the CPU decode's LoRA runs in float32 whatever the base dtype; prefill's batched
    # GEMMs keep the adapters' dtype, where bfloat16 uses BF16 dot products (a third of float32's LoRA cost).
    return ModelRunner(model, cache, decode_lora_dtype=torch.float32 if device == "cpu" else None)
