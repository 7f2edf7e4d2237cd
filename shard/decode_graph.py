"""Capturable decode: static shapes per batch-size bucket, slot-stacked LoRA, one CUDA graph (or compiled step) each.

Eager decode on a GPU is host-bound: every layer pays Python, allocator and launch overhead (three to four
times a 7B step's GPU work at batch 64 on an H200). Here a step's shapes depend only on its bucket (the
batch padded to 1, 2, 4, ... rows), every input lives in a preallocated buffer, and adapters sit in
per-slot stacks read through a per-row slot index (BGMV): which adapters a batch holds changes buffer
contents, never the graph, so one captured graph per bucket serves every mix. Nothing in the step reads a
tensor's value on the host or branches on one.

Wiring (``shard/runner.py`` owns decode): after ``_reserve``, ``runner.decode`` may call
``DecodeGraph.step(seqs)`` instead of building metadata and calling the model, when ``fits(seqs)``; its
``_advance`` then runs as today. ``DecodeGraph.decode`` does the reserve and the count itself (without the
prefix-cache registration) for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

import loraplex.kernels.ops  # noqa: F401  (registers torch.ops.loraplex.bgmv_*)
from loraplex.shard.attention import AttentionInput
from loraplex.shard.kv_cache import KVCache, KVCacheFull
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.model import CausalLM
from loraplex.shard.projections import PROJECTIONS, SITES
from loraplex.shard.runner import SequenceState

Mode = Literal["eager", "compile", "graph"]


class SlotLora:
    """Every resident adapter's weights in preallocated per-slot stacks, on the model's device.

    Per site one ``A^T`` stack ``[slots, layers, R_site, h_in]`` whose rows hold the site's projections side
    by side (``max_rank`` rows each), so projections that read the same input (q/k/v, gate/up) share one
    shrink; per projection a ``B`` stack ``[slots, layers, max_rank, h_out]`` (scaling folded in) and each
    slot's rank there (0: the adapter does not adapt it). Loading an adapter copies into its slot.
    """

    def __init__(self, model: CausalLM, slots: int, max_rank: int, targets: Sequence[str] = tuple(PROJECTIONS)) -> None:
        cfg, layers, dtype, device = model.config, model.config.num_layers, model.dtype, model.device
        self.slots, self.max_rank = slots, max_rank
        self.targets = tuple(p for p in PROJECTIONS if p in targets)
        self.a: dict[str, torch.Tensor] = {}
        self.site_ranks: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, torch.Tensor] = {}
        self.rows: dict[str, slice] = {}  # a projection's rows in its site's stack (and columns of the shrink)
        self.cols: dict[str, slice] = {}  # its columns in the site's fused output
        for site, projs in SITES.items():
            mine = [p for p in projs if p.name in self.targets]
            if not mine:
                continue
            h_in = projs[0].shape(cfg)[0]
            self.a[site] = torch.zeros(slots, layers, max_rank * len(mine), h_in, dtype=dtype, device=device)
            self.site_ranks[site] = torch.zeros(slots, dtype=torch.int32, device=device)
            for i, p in enumerate(mine):
                out = p.shape(cfg)[1]
                self.b[p.name] = torch.zeros(slots, layers, max_rank, out, dtype=dtype, device=device)
                self.ranks[p.name] = torch.zeros(slots, dtype=torch.int32, device=device)
                self.rows[p.name] = slice(i * max_rank, (i + 1) * max_rank)
                offset = p.offset(cfg)
                self.cols[p.name] = slice(offset, offset + out)

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy ``adapter`` into ``slot`` (whatever was there is overwritten or zeroed)."""
        extra = set(adapter.projections) - set(self.targets)
        if extra:
            raise ValueError(f"adapter {adapter.adapter_id!r} adapts {sorted(extra)}, outside this graph's targets")
        too_big = {n: p.rank for n, p in adapter.projections.items() if p.rank > self.max_rank}
        if too_big:
            raise ValueError(f"adapter {adapter.adapter_id!r} has ranks {too_big} above the graph's {self.max_rank}")
        for site, a in self.a.items():
            a[slot].zero_()
            present = False
            for p in SITES[site]:
                if p.name not in self.targets:
                    continue
                w = adapter.projections.get(p.name)
                b = self.b[p.name]
                b[slot].zero_()
                if w is None:
                    self.ranks[p.name][slot] = 0
                    continue
                rows = self.rows[p.name]
                a[slot, :, rows.start : rows.start + w.rank].copy_(w.a.transpose(1, 2))
                b[slot, :, : w.rank].copy_(w.b)
                self.ranks[p.name][slot] = w.rank
                present = True
            self.site_ranks[site][slot] = a.shape[2] if present else 0

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        """Every row's LoRA delta for ``site`` at ``layer`` into ``y`` (rows with idx < 0 have none)."""
        a = self.a.get(site)
        if a is None:
            return
        v = torch.ops.loraplex.bgmv_shrink(x, a[:, layer], self.site_ranks[site], idx)
        for p in SITES[site]:
            if p.name in self.targets:
                rows = self.rows[p.name]
                torch.ops.loraplex.bgmv_expand(
                    y[:, self.cols[p.name]], v[:, :, rows], self.b[p.name][:, layer], self.ranks[p.name], idx
                )


class _SlotPlan:
    """The ``LoraPlan`` a graphed step hands the model: the slot stacks, read through the step's slot index."""

    def __init__(self, lora: SlotLora, idx: torch.Tensor) -> None:
        self.lora, self.idx = lora, idx

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.lora.apply(site, layer, x, y, self.idx)


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... and ``max_batch`` itself: a batch pads to at most twice its rows."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


class DecodeGraph:
    """Decode steps of up to ``max_batch`` sequences of up to ``max_len`` tokens, one graph per bucket.

    ``mode``: ``graph`` (CUDA graphs; the default on CUDA), ``compile`` (``torch.compile(fullgraph=True)``,
    the capturability check available without a GPU) or ``eager`` (the same step, run as is).
    """

    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        *,
        max_batch: int = 64,
        max_len: int = 4096,
        slots: int = 64,
        max_rank: int = 16,
        targets: Sequence[str] = tuple(PROJECTIONS),
        mode: Mode | None = None,
    ) -> None:
        self.model, self.cache = model, cache
        self.mode: Mode = mode or ("graph" if model.device.type == "cuda" else "eager")
        if self.mode == "graph" and model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.buckets = buckets_up_to(max_batch)
        bs = cache.block_size
        self.width = -(-max_len // bs)  # block-table columns
        self.max_len = self.width * bs
        self.lora = SlotLora(model, slots, max_rank, targets)
        self._slot_of: dict[int, int] = {}  # adapter serial -> slot, least recently used first
        # Padded rows write their k/v into a block of their own, never into a sequence's.
        self._scratch: list[int] = []
        cache.allocator.grow(self._scratch, 1)
        model.rotary.tables(torch.zeros(1, dtype=torch.long, device=model.device), self.max_len - 1)  # grown once
        dev, n = model.device, max_batch
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.blocks = torch.zeros(n, dtype=torch.long, device=dev)
        self.offsets = torch.zeros(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, self.width, dtype=torch.long, device=dev)
        self.idx = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self._key_pos = torch.arange(self.max_len, device=dev)
        self._runners: dict[int, Callable[[], torch.Tensor]] = {}
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pad(0)
        self._pool = torch.cuda.graph_pool_handle() if self.mode == "graph" else None

    def fits(self, seqs: Sequence[SequenceState]) -> bool:
        """The graph can run this batch: few enough rows, short enough, adapters within its slots and targets."""
        adapters = {s.adapter.serial: s.adapter for s in seqs if s.adapter is not None}
        return (
            0 < len(seqs) <= self.buckets[-1]
            and all(len(s.token_ids) <= self.max_len for s in seqs)
            and len(adapters) <= self.lora.slots
            and all(
                set(a.projections) <= set(self.lora.targets) and a.rank <= self.lora.max_rank for a in adapters.values()
            )
        )

    def _forward(self, b: int) -> torch.Tensor:
        """The step itself on the first ``b`` rows of the buffers: device work only, the same every call."""
        ctx = self.positions[:b, None]
        mask = self._key_pos[None, :] <= ctx
        window = self.model.config.sliding_window
        if window is not None:
            mask = mask & (self._key_pos[None, :] > ctx - window)
        meta = AttentionInput(
            is_prefill=False,
            positions=self.positions[:b],
            slot_blocks=self.blocks[:b],
            slot_offsets=self.offsets[:b],
            seq_lens=(1,) * b,
            max_position=self.max_len - 1,  # the tables were grown to it: no growth, no host read
            block_tables=self.tables[:b],
            key_mask=mask[:, None, None, :],
        )
        return self.model.forward(self.ids[:b], meta, self.cache, _SlotPlan(self.lora, self.idx[:b]))

    def _runner(self, b: int) -> Callable[[], torch.Tensor]:
        run = self._runners.get(b)
        if run is not None:
            return run
        if self.mode == "eager":
            run = lambda: self._forward(b)  # noqa: E731
        elif self.mode == "compile":
            compiled = torch.compile(self._forward, fullgraph=True, dynamic=False)
            run = lambda: compiled(b)  # noqa: E731
        else:
            run = self._capture(b)
        self._runners[b] = run
        return run

    def _capture(self, b: int) -> Callable[[], torch.Tensor]:
        buffers = (self.ids, self.positions, self.blocks, self.offsets, self.tables, self.idx)
        saved = [t.clone() for t in buffers]
        self._pad(0)  # capture runs write only the scratch block
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # allocator and kernels warm, outside the graph
                self._forward(b)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(b)
        # The graph reads these tables by address: an eager step that grows them later must not free them.
        self._kept.append(self.model.rotary.current())
        for t, s in zip(buffers, saved, strict=True):
            t.copy_(s)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def _pad(self, start: int) -> None:
        """Rows from ``start`` on: no adapter, position 0, writing into the scratch block."""
        self.ids[start:] = 0
        self.positions[start:] = 0
        self.blocks[start:] = self._scratch[0]
        self.offsets[start:] = 0
        self.tables[start:] = self._scratch[0]
        self.idx[start:] = -1

    def _slots(self, seqs: Sequence[SequenceState]) -> list[int]:
        """Each row's slot (-1: no adapter), loading adapters not resident into the least recently used slots."""
        wanted = {s.adapter.serial: s.adapter for s in seqs if s.adapter is not None}
        if len(wanted) > self.lora.slots:
            raise ValueError(f"{len(wanted)} adapters in one step, the graph has {self.lora.slots} slots")
        for serial in wanted:
            if serial in self._slot_of:  # most recently used last
                self._slot_of[serial] = self._slot_of.pop(serial)
        for serial, adapter in wanted.items():
            if serial in self._slot_of:
                continue
            used = set(self._slot_of.values())
            free = [i for i in range(self.lora.slots) if i not in used]
            if free:
                slot = free[0]
            else:
                victim = next(k for k in self._slot_of if k not in wanted)
                slot = self._slot_of.pop(victim)
            self.lora.load(slot, adapter)
            self._slot_of[serial] = slot
        return [self._slot_of[s.adapter.serial] if s.adapter is not None else -1 for s in seqs]

    def forget(self, serial: int) -> None:
        """An adapter was unloaded: its slot is free (its weights are overwritten by the next load)."""
        self._slot_of.pop(serial, None)

    @torch.inference_mode()
    def step(self, seqs: Sequence[SequenceState]) -> torch.Tensor:
        """Logits ``[B, V]`` of the one pending token of every sequence, whose KV blocks are reserved already."""
        if not self.fits(seqs):
            raise ValueError("this batch does not fit the decode graph (size, length, adapters or ranks)")
        n = len(seqs)
        b = next(size for size in self.buckets if size >= n)
        bs = self.cache.block_size
        slots = self._slots(seqs)
        positions = [s.num_cached for s in seqs]
        host = torch.zeros(5 + self.width, n, dtype=torch.long)
        host[0] = torch.tensor([s.token_ids[-1] for s in seqs])
        host[1] = torch.tensor(positions)
        host[2] = torch.tensor([s.blocks[p // bs] for s, p in zip(seqs, positions, strict=True)])
        host[3] = torch.tensor([p % bs for p in positions])
        host[4] = torch.tensor(slots)
        for row, s in enumerate(seqs):
            host[5 : 5 + len(s.blocks), row] = torch.tensor(s.blocks)
        dev = host.to(self.model.device, non_blocking=True)  # one copy for the whole step's metadata
        self._pad(n)
        self.ids[:n], self.positions[:n], self.blocks[:n], self.offsets[:n] = dev[0], dev[1], dev[2], dev[3]
        self.idx[:n] = dev[4].to(torch.int32)
        self.tables[:n] = dev[5:].t()
        return self._runner(b)()[:n].clone()

    def decode(self, seqs: Sequence[SequenceState]) -> torch.Tensor:
        """``step`` with its KV blocks reserved first and each sequence's count advanced after (no prefix-cache
        registration: ``runner.decode`` does that part when it calls ``step``)."""
        alloc = self.cache.allocator
        needed = sum(max(0, alloc.blocks_for(len(s.token_ids)) - len(s.blocks)) for s in seqs)
        if needed > alloc.num_free:
            raise KVCacheFull(f"the batch needs {needed} more KV blocks, {alloc.num_free} free")
        for s in seqs:
            alloc.grow(s.blocks, len(s.token_ids))
        logits = self.step(seqs)
        for s in seqs:
            s.num_cached += 1
        return logits
