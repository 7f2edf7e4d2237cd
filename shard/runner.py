"""The model runner: turns sequences into forward passes (ragged prefill, one-token decode) on the paged cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraplex.shard.attention import AttentionInput, ContextGroup
from loraplex.shard.config import ModelConfig
from loraplex.shard.kv_cache import KVCache, KVCacheFull
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.plan import Backend, LoraPlan, make_plan, resolve_backend
from loraplex.shard.lora.stack_pool import StackPool
from loraplex.shard.model import CausalLM
from loraplex.shard.parallel import TensorParallel
from loraplex.shard.prefix_cache import PrefixIndex, adapter_identity, block_hashes, chain_next, chain_seed

if TYPE_CHECKING:
    from loraplex.shard.decode_graph import DecodeGraph


@dataclass(eq=False)
class SequenceState:
    """One request's tokens and KV blocks; tokens past ``num_cached`` are waiting to be run."""

    request_id: int
    token_ids: list[int]
    adapter: LoraAdapter | None = None
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    # Chain hashes of its first full blocks, each named in the prefix cache (or found there).
    hashes: list[bytes] = field(default_factory=list)
    # Who computes its KV, for the prefix cache; None: its adapter object's (``adapter_identity``).
    identity: bytes | None = None

    @property
    def cache_identity(self) -> bytes:
        return self.identity if self.identity is not None else adapter_identity(self.adapter)

    @property
    def pending(self) -> int:
        return len(self.token_ids) - self.num_cached


Work = Sequence[tuple[SequenceState, int]]


class ModelRunner:
    """Runs batches of sequences through the model; owns the KV cache and caches the LoRA plan."""

    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        decode_lora_dtype: torch.dtype | None = None,
        prefill_lora_dtype: torch.dtype | None = None,
        lora_backend: Backend | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        # dtype of the per-batch LoRA stacks in decode and in prefill (None: the adapters' own); decode's
        # one row per adapter is a batched GEMV, prefill's many rows a batched GEMM: see docs/architecture.md.
        self.decode_lora_dtype = decode_lora_dtype
        self.prefill_lora_dtype = prefill_lora_dtype
        self.lora_backend = lora_backend  # --lora-backend, resolved (None: auto for the model's device)
        self._plan_key: tuple[int, ...] | None = None
        self._plan: LoraPlan | None = None
        # The PyTorch plans' stacked adapter weights, kept across plans: see TorchLoraPlan.
        self.lora_stacks = StackPool()
        # A capturable decode (shard/decode_graph.py), used for the decode-only steps it fits when set.
        self.decode_graph: DecodeGraph | None = None

    @property
    def prefix(self) -> PrefixIndex | None:
        """The prefix cache's index (None when prefix caching is off)."""
        return self.cache.allocator.prefix

    def reuse_prefix(self, seq: SequenceState) -> int:
        """Point a fresh sequence at the longest cached prefix of its tokens; how many tokens that skips.

        Only full blocks, and never the last token: it is always run, so the first sampled token comes
        from fresh logits. The blocks are shared (refcounted), never written: the sequence's own tokens
        start in a block of its own.
        """
        prefix = self.prefix
        if prefix is None or seq.blocks or seq.num_cached:
            return 0
        bs = self.cache.block_size
        hashes = block_hashes(seq.cache_identity, seq.token_ids, bs, (len(seq.token_ids) - 1) // bs)
        found = prefix.lookup(hashes)
        self.cache.allocator.share(found)
        seq.blocks, seq.hashes, seq.num_cached = found, hashes[: len(found)], len(found) * bs
        return seq.num_cached

    def share_in_step(self, seqs: Sequence[SequenceState], chunks: Sequence[int], lookup: Sequence[bool]) -> list[int]:
        """Fresh sequences joining one step, in order, each to run ``chunks`` tokens (0: all) after its cached
        prefix: how many each runs. With prefix caching, a later one whose next full blocks are blocks an
        earlier one fills in this very step points at them and skips those tokens (every layer writes the
        step's keys before any query reads them), and each sequence's blocks are taken here.
        """
        runs = [min(c or s.pending, s.pending) for s, c in zip(seqs, chunks, strict=True)]
        if self.prefix is None or sum(lookup) < 2:
            return runs
        alloc, bs = self.cache.allocator, self.cache.block_size
        planned: dict[bytes, int] = {}  # a block an earlier sequence fills in this step, by its name
        for k, (s, may) in enumerate(zip(seqs, lookup, strict=True)):
            h = s.hashes[-1] if s.hashes else chain_seed(s.cache_identity)
            if may:
                for i in range(len(s.hashes), (len(s.token_ids) - 1) // bs):  # never the last token
                    following = chain_next(h, s.token_ids[i * bs : (i + 1) * bs])
                    if following not in planned:
                        break
                    h = following
                    alloc.share([planned[h]])
                    s.blocks.append(planned[h])
                    s.hashes.append(h)
                    s.num_cached += bs
                runs[k] = min(chunks[k] or s.pending, s.pending)
            alloc.grow(s.blocks, s.num_cached + runs[k])
            for i in range(len(s.hashes), (s.num_cached + runs[k]) // bs):
                h = chain_next(h, s.token_ids[i * bs : (i + 1) * bs])
                planned.setdefault(h, s.blocks[i])
        return runs

    @torch.inference_mode()
    def prefill(self, seqs: Sequence[SequenceState], all_logits: bool = False) -> torch.Tensor:
        """Run every token of fresh sequences; logits of each last token ([B, V]) or of all tokens ([T, V])."""
        if any(s.num_cached for s in seqs) or any(not s.token_ids for s in seqs):
            raise ValueError("prefill takes fresh, non-empty sequences")
        work = [(s, len(s.token_ids)) for s in seqs]
        return self._packed(work, None if all_logits else self._rows(work, [False] * len(work)))

    @torch.inference_mode()
    def step(self, work: Work, full: Sequence[bool] | None = None) -> torch.Tensor:
        """Run the next ``n`` tokens of each ``(sequence, n)`` in one forward pass (decodes, prompts, chunks).

        Logits [R, V] come back, in order, for every token of the sequences flagged in ``full`` and for the
        last token of each other sequence whose tokens are all run after this step; none for a chunk that
        leaves part of its prompt for later. A decode-only step takes the decode path (its metadata and
        cached LoRA plan), fresh prompts the packed causal one; the rest attends through block tables.
        """
        full = list(full) if full is not None else [False] * len(work)
        if not work or any(not 1 <= n <= s.pending for s, n in work):
            raise ValueError("a step runs between 1 and all of each sequence's pending tokens")
        seqs = [s for s, _ in work]
        if not any(full) and all(n == 1 == s.pending and s.num_cached for s, n in work):
            return self.decode(seqs)
        rows = self._rows(work, full)
        if all(s.num_cached == 0 for s in seqs):
            return self._packed(work, rows)
        return self._with_context(work, rows)

    def _rows(self, work: Work, full: Sequence[bool]) -> torch.Tensor:
        rows: list[int] = []
        start = 0
        for (s, n), everything in zip(work, full, strict=True):
            if everything:
                rows.extend(range(start, start + n))
            elif s.num_cached + n == len(s.token_ids):
                rows.append(start + n - 1)
            start += n
        return torch.tensor(rows, dtype=torch.long, device=self.model.device)

    def _packed(self, work: Work, rows: torch.Tensor | None) -> torch.Tensor:
        """Sequences with nothing cached yet: their new tokens attend only to each other (causal, packed)."""
        device = self.model.device
        seqs = [s for s, _ in work]
        lens = [n for _, n in work]
        self._reserve(seqs, lens)
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
        ids = torch.tensor([t for s, n in work for t in s.token_ids[:n]], device=device)
        lora = self._lora([s.adapter for s, n in work for _ in range(n)], cache=False)
        logits = self.model.forward(ids, meta, self.cache, lora, rows)
        self._advance(work)
        return logits

    def _with_context(self, work: Work, rows: torch.Tensor) -> torch.Tensor:
        """A general step: new tokens at positions [start, end) of a sequence see its keys [0, end)."""
        device = self.model.device
        seqs = [s for s, _ in work]
        spans = [range(s.num_cached, s.num_cached + n) for s, n in work]
        self._reserve(seqs, [span.stop for span in spans])
        blocks, offsets = self._slots(seqs, spans)
        starts = [0]
        for _, n in work:
            starts.append(starts[-1] + n)
        # One-token rows (decodes, a last token after a cached prefix) attend as decode does; longer chunks
        # are padded to the longest of their length class only (a 3-token tail never to a 512-token chunk).
        groups = tuple(self._group(work, members, starts) for members in _length_classes(work))
        meta = AttentionInput(
            is_prefill=True,  # never the decode-only layout: a capturable decode path keys on is_prefill=False
            positions=torch.tensor([p for span in spans for p in span], device=device),
            slot_blocks=blocks,
            slot_offsets=offsets,
            seq_lens=tuple(n for _, n in work),
            max_position=max(span.stop for span in spans) - 1,
            sliding_window=self.model.config.sliding_window,
            context=groups,
        )
        ids = torch.tensor([t for s, n in work for t in s.token_ids[s.num_cached : s.num_cached + n]])
        lora = self._lora([s.adapter for s, n in work for _ in range(n)], cache=False)
        logits = self.model.forward(ids.to(device), meta, self.cache, lora, rows)
        self._advance(work)
        return logits

    def _group(self, work: Work, members: list[int], starts: list[int]) -> ContextGroup:
        device = self.model.device
        seqs = [work[i][0] for i in members]
        lens = [work[i][1] for i in members]
        queries = max(lens)
        width = max(len(s.blocks) for s in seqs)
        tables = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=device)
        # Padded query slots take the last real query's position: every row sees at least one key.
        last = torch.tensor([s.num_cached + n - 1 for s, n in zip(seqs, lens, strict=True)])
        first = torch.tensor([s.num_cached for s in seqs])
        qpos = torch.minimum(first[:, None] + torch.arange(queries)[None, :], last[:, None])
        key_pos = torch.arange(width * self.cache.block_size)
        mask = key_pos[None, None, :] <= qpos[:, :, None]
        window = self.model.config.sliding_window
        if window is not None:
            mask &= key_pos[None, None, :] > qpos[:, :, None] - window
        token_index = None
        if len(members) < len(work):
            token_index = torch.tensor([starts[i] + j for i in members for j in range(work[i][1])], device=device)
        pad_index = None
        if min(lens) != queries:
            pad_index = torch.tensor([k * queries + j for k, n in enumerate(lens) for j in range(n)], device=device)
        mask = mask[:, None]
        if queries > 1:  # an additive mask: CPU fused attention takes 0.7-0.9x the time it takes with a boolean one
            mask = torch.zeros(mask.shape, dtype=self.model.dtype).masked_fill_(~mask, float("-inf"))
        return ContextGroup(token_index, tables, mask.to(device), queries, pad_index)

    @torch.inference_mode()
    def decode(self, seqs: Sequence[SequenceState]) -> torch.Tensor:
        """Run the one pending token of every sequence; logits [B, V]."""
        if any(s.pending != 1 or s.num_cached == 0 for s in seqs):
            raise ValueError("decode takes prefilled sequences with exactly one new token each")
        device = self.model.device
        self._reserve(seqs, [len(s.token_ids) for s in seqs])
        if self.decode_graph is not None and self.decode_graph.fits(seqs):
            logits = self.decode_graph.step(seqs)
            self._advance([(s, 1) for s in seqs])
            return logits
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
        self._advance([(s, 1) for s in seqs])
        return logits

    def release(self, seq: SequenceState) -> None:
        """Drop a finished sequence's hold on its KV blocks at once (cached prefix blocks stay cached)."""
        self.cache.allocator.free(seq.blocks)
        seq.num_cached = 0
        seq.hashes = []

    def _advance(self, work: Work) -> None:
        """Count the tokens just run, and name in the prefix cache every block they filled."""
        prefix = self.prefix
        bs = self.cache.block_size
        for s, n in work:
            s.num_cached += n
            if prefix is None or len(s.hashes) >= s.num_cached // bs:
                continue
            h = s.hashes[-1] if s.hashes else chain_seed(s.cache_identity)
            for i in range(len(s.hashes), s.num_cached // bs):
                h = chain_next(h, s.token_ids[i * bs : (i + 1) * bs])
                s.hashes.append(h)
                prefix.register(s.blocks[i], h)

    def _reserve(self, seqs: Sequence[SequenceState], ends: Sequence[int]) -> None:
        """Blocks for each sequence up to ``ends`` tokens, all or none."""
        alloc = self.cache.allocator
        needed = sum(max(0, alloc.blocks_for(e) - len(s.blocks)) for s, e in zip(seqs, ends, strict=True))
        if needed > alloc.num_free:
            raise KVCacheFull(f"the batch needs {needed} more KV blocks, {alloc.num_free} free")
        for s, e in zip(seqs, ends, strict=True):
            alloc.grow(s.blocks, e)

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
        torch_plan = (self.lora_backend or resolve_backend("auto", self.model.device)) == "torch"
        # A PyTorch plan may take over pool slots the cached one reads (rebuilding it costs no copies); the
        # kernels' cached plan goes before the new one is made, not after.
        if cache or torch_plan:
            self._drop_plan()
        # Short segments (decode rows, in prefill steps too) are batched GEMVs and use decode's dtype, and the
        # same pool slots in every kind of step; long ones (prompt chunks) are GEMMs: prefill's dtype.
        plan = make_plan(
            row_adapters,
            self.model.config,
            self.model.device,
            self.lora_backend,
            dtype=self.decode_lora_dtype,
            long_dtype="stacks" if cache else self.prefill_lora_dtype,
            pool=self.lora_stacks,
            reuse=cache,
        )
        if cache:
            self._plan_key, self._plan = key, plan
        return plan

    def _drop_plan(self) -> None:
        self._plan_key, self._plan = None, None

    def forget_plan(self) -> None:
        """Drop the cached decode plan and the stacked copies of adapters that are gone or unused lately:
        the store's ``on_evict`` hook, so that unloaded weights are freed."""
        self._drop_plan()
        self.lora_stacks.forget()

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


def _length_classes(work: Work) -> list[list[int]]:
    """Indices of ``work`` by how many tokens each runs: one-token rows together, longer ones in classes
    within a factor of two, so that padding a class to its longest at most doubles its attention work."""
    classes: dict[int, list[int]] = {}
    for i, (_, n) in enumerate(work):
        classes.setdefault(0 if n == 1 else (n - 1).bit_length(), []).append(i)
    return [classes[k] for k in sorted(classes)]


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
    prefix_caching: bool = True,
    lora_backend: Backend | None = None,
) -> ModelRunner:
    """Load a checkpoint directory (this rank's slice) and give it a KV cache of ``kv_blocks`` blocks."""
    config = ModelConfig.from_dir(directory)
    model = CausalLM.load(directory, config, dtype, device, tp)
    local = model.config
    cache = KVCache(
        local,
        kv_blocks,
        block_size,
        num_kv_heads=local.num_kv_heads,
        dtype=dtype,
        device=device,
        prefix_caching=prefix_caching,
    )
    # PyTorch's CPU bfloat16 batched GEMV streams 2-3x fewer bytes/s than float32 (measured on an AVX-512
    # BF16 CPU), so on the CPU decode's LoRA runs in float32 whatever the base dtype; prefill's batched
    # GEMMs keep the adapters' dtype, where bfloat16 uses BF16 dot products (a third of float32's LoRA cost).
    decode_dtype = torch.float32 if device == "cpu" else None
    return ModelRunner(model, cache, decode_lora_dtype=decode_dtype, lora_backend=lora_backend)
