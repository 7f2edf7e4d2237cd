"""The PyTorch LoRA plan (the CPU path): short segments as one ``bmm`` over stacked slots, long ones as GEMMs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from loraplex.kernels.bmm import ChunkLayout, Layout, gather_rows, sgmv_expand, sgmv_shrink
from loraplex.kernels.segments import Segments
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.stack_pool import StackPool, Widths, rank_bucket
from loraplex.shard.projections import SITES

# Costs in units of one padded row (a row of rank-sized work done on zeros), as in kernels/segments.py:
# a chunk reads one more copy of an adapter's weights; a segment run on its own also pays its own
# matmul calls at every site of every layer.
_CHUNK_COST_IN_ROWS = 8
_SEGMENT_COST_IN_ROWS = 24
# Past this, padding every stacked chunk to the longest short segment costs more than it saves.
_MAX_CHUNK_LEN = 16
# From this many long segments on, a plan copies them into stacks of its own (one bmm per site) rather than
# run each alone: 32 prompts of 128 tokens with distinct rank-16 all-projection adapters (bfloat16) took
# 0.59 s stacked against 0.80 s alone; a chunked-prefill step holds one to three.
_STACKED_LONG_SEGMENTS = 4


@dataclass(frozen=True)
class _Expand:
    b: torch.Tensor  # [num_layers, chunks, rank, out]
    v_cols: slice
    y_cols: slice


@dataclass(frozen=True)
class _Stacked:
    layout: Layout
    a: torch.Tensor  # [num_layers, chunks, in, sum of the widths of the site's projections]
    expands: tuple[_Expand, ...]


@dataclass(frozen=True)
class _Solo:
    """One adapter's long segment, run as plain matmuls on its own (unstacked) weights."""

    rows: slice | torch.Tensor
    parts: tuple[tuple[torch.Tensor, torch.Tensor, slice], ...]  # A [layers, in, r], B [layers, r, out], y cols


class TorchLoraPlan:
    """LoRA work of one batch, prepared once and reused by every decode step of that batch.

    Rows are grouped by adapter. Short segments (decode's one row per adapter) run as one batched matmul
    per site over stacked weights, however many distinct adapters the batch holds; the stacks are slots
    of a ``StackPool``, so an adapter is copied when it first joins, not at every change of the batch.
    Long segments (prompt chunks) are GEMMs worth a call each, and run on the adapter's own weights
    (in ``long_dtype``; ``"stacks"``: the stacks' dtype).

    Without a pool the plan keeps a private one: every adapter is then copied once per plan. With a shared
    one, the plan is valid until the next plan built from that pool takes a slot over (``apply`` checks).
    """

    def __init__(
        self,
        row_adapters: Sequence[LoraAdapter | None],
        config: ModelConfig,
        dtype: torch.dtype | None = None,
        *,
        pool: StackPool | None = None,
        long_dtype: torch.dtype | Literal["stacks"] | None = "stacks",
        reuse: bool = True,
    ) -> None:
        self.row_adapters = tuple(row_adapters)
        self.dtype = dtype
        self._pool = pool or StackPool()
        rows_of: dict[int, list[int]] = {}
        adapters: dict[int, LoraAdapter] = {}
        for row, adapter in enumerate(self.row_adapters):
            if adapter is not None:
                rows_of.setdefault(adapter.serial, []).append(row)
                adapters[adapter.serial] = adapter
        chunk_len = _chunk_len([len(r) for r in rows_of.values()])
        self.chunk_len = chunk_len
        short = [adapters[k] for k, r in rows_of.items() if len(r) <= chunk_len]
        long = [adapters[k] for k, r in rows_of.items() if len(r) > chunk_len]
        self._stacked: dict[str, list[_Stacked]] = {}
        self._solo: dict[str, list[_Solo]] = {}
        with self._pool.building() as build:
            for site, projs in SITES.items():
                offsets = {p.name: p.offset(config) for p in projs}
                names = tuple(p.name for p in projs)
                banks: dict[Widths, list[LoraAdapter]] = {}
                for adapter in short:
                    if widths := _widths(adapter, names):
                        banks.setdefault(widths, []).append(adapter)
                self._stacked[site] = []
                for widths, members in banks.items():
                    key = (site, dtype or members[0].projections[widths[0][0]].a.dtype, widths)
                    self._stacked[site].append(self._stack(key, members, rows_of, offsets, build, reuse))
                if len(long) >= _STACKED_LONG_SEGMENTS:
                    resolved = self.dtype if long_dtype == "stacks" else long_dtype
                    self._stacked[site] += self._stack_long(long, rows_of, names, offsets, resolved)
                    self._solo[site] = []
                    continue
                self._solo[site] = [
                    solo
                    for adapter in long
                    if (solo := self._solo_of(adapter, rows_of[adapter.serial], names, offsets, long_dtype, build))
                ]
            self._epoch = self._pool.epoch

    def _stack(
        self,
        key: tuple[str, torch.dtype, Widths],
        members: list[LoraAdapter],
        rows_of: dict[int, list[int]],
        offsets: dict[str, int],
        build: int,
        reuse: bool,
    ) -> _Stacked:
        bank, slots = self._pool.slots(key, members, build)
        lo, hi = min(slots), max(slots) + 1
        batch = len(self.row_adapters)
        if reuse and self.chunk_len == 1 and len(members) == batch == hi - lo:
            # A decode plan over a run of slots in another order than its rows: put the slots in row order
            # once (a copy of the misplaced ones) rather than reorder activations at every step.
            want = [lo + rows_of[m.serial][0] for m in members]
            moves = [(s, w) for s, w in zip(slots, want, strict=True) if s != w]
            if moves:
                self._pool.move(bank, moves)
                slots = want
        idle = hi - lo - len(members)  # slots in the run that no row uses, read for nothing at every step
        # A plan used for many steps pays a gather once rather than idle reads at every step.
        gather = idle > (len(members) // 4 if reuse else len(members))
        if gather:
            picked = torch.tensor(slots, device=bank.device)
            chunk_of = {m.serial: i for i, m in enumerate(members)}
            a = bank.a.index_select(1, picked)
            bs = {p: b.index_select(1, picked) for p, b in bank.b.items()}
        else:
            chunk_of = {m.serial: s - lo for m, s in zip(members, slots, strict=True)}
            a = bank.a[:, lo:hi]
            bs = {p: b[:, lo:hi] for p, b in bank.b.items()}
        rows, places = [], []
        for m in members:
            for j, row in enumerate(rows_of[m.serial]):
                rows.append(row)
                places.append(chunk_of[m.serial] * self.chunk_len + j)
        chunks = a.shape[1]
        # Every batch row in its own chunk, in order: then no chunk is idle, and no gather is needed.
        identity = self.chunk_len == 1 and chunks == len(rows) == len(self.row_adapters) and rows == places
        order = back = None
        if not identity and sorted(places) == list(range(chunks * self.chunk_len)):
            order = [0] * len(places)
            for row, place in zip(rows, places, strict=True):
                order[place] = row
        # Decode rows are usually a run of the batch (a step's prompt chunks follow them): results go back there.
        first = min(rows)
        if not identity and max(rows) - first + 1 == len(rows):
            back = [0] * len(rows)
            for row, place in zip(rows, places, strict=True):
                back[row - first] = place

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=bank.device)

        layout = ChunkLayout(
            index(rows),
            index(places),
            chunks,
            self.chunk_len,
            identity,
            None if order is None else index(order),
            None if back is None else index(back),
            first,
        )
        return _Stacked(layout, a, _expands(bank.widths, bs, offsets))

    def _stack_long(
        self,
        long: list[LoraAdapter],
        rows_of: dict[int, list[int]],
        names: tuple[str, ...],
        offsets: dict[str, int],
        dtype: torch.dtype | None,
    ) -> list[_Stacked]:
        """Long segments stacked for this plan alone, cut into chunks of equal length (``Segments``), each
        chunk a copy of its adapter's weights: many prompts in one step are then one ``bmm`` per site."""
        groups: dict[Widths, list[LoraAdapter]] = {}
        for adapter in long:
            if widths := _widths(adapter, names):
                groups.setdefault(widths, []).append(adapter)
        stacked = []
        for widths, members in groups.items():
            like = members[0].projections[widths[0][0]]
            keys = [-1] * len(self.row_adapters)
            for k, m in enumerate(members):
                for row in rows_of[m.serial]:
                    keys[row] = k
            segs, seg_keys = Segments.from_keys(keys, None, like.a.device)
            kind = dtype or like.a.dtype
            padded = any(m.projections[p].rank < w for m in members for p, w in widths)
            alloc = torch.zeros if padded else torch.empty  # only padding needs zeros
            chunks, (layers, n_in) = segs.num_chunks, like.a.shape[:2]
            a = alloc(layers, chunks, n_in, sum(w for _, w in widths), dtype=kind, device=like.a.device)
            bs = {
                p: alloc(layers, chunks, w, members[0].projections[p].b.shape[-1], dtype=kind, device=like.a.device)
                for p, w in widths
            }
            for chunk, seg in enumerate(segs.chunk_segments):
                col = 0
                for p, w in widths:
                    weights = members[seg_keys[seg]].projections[p]
                    a[:, chunk, :, col : col + weights.rank] = weights.a
                    bs[p][:, chunk, : weights.rank] = weights.b
                    col += w
            stacked.append(_Stacked(segs, a, _expands(widths, bs, offsets)))
        return stacked

    def _solo_of(
        self,
        adapter: LoraAdapter,
        rows: list[int],
        names: tuple[str, ...],
        offsets: dict[str, int],
        long_dtype: torch.dtype | Literal["stacks"] | None,
        build: int,
    ) -> _Solo | None:
        present = [p for p in names if p in adapter.projections]
        if not present:
            return None
        dtype = self.dtype if long_dtype == "stacks" else long_dtype
        source = adapter.projections
        if dtype is not None and dtype != adapter.projections[present[0]].a.dtype:
            source = self._pool.converted(adapter, dtype, build)
        where = adapter.projections[present[0]].a.device
        span: slice | torch.Tensor
        if rows == list(range(rows[0], rows[-1] + 1)):
            span = slice(rows[0], rows[-1] + 1)
        else:
            span = torch.tensor(rows, dtype=torch.long, device=where)
        parts = []
        for p in present:
            w = source[p]
            parts.append((w.a, w.b, slice(offsets[p], offsets[p] + w.b.shape[-1])))
        return _Solo(span, tuple(parts))

    @property
    def stale(self) -> bool:
        """A later plan from the same pool took over a slot this one reads."""
        return self._epoch != self._pool.epoch

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every row's LoRA delta for ``site`` at ``layer`` into the fused base output ``y``."""
        if self.stale:
            raise RuntimeError("this LoRA plan's stacks were reused by a later plan; build it again")
        for group in self._stacked[site]:
            v = sgmv_shrink(gather_rows(x, group.layout), group.a[layer])
            for ex in group.expands:
                sgmv_expand(y[:, ex.y_cols], v[..., ex.v_cols], ex.b[layer], group.layout)
        for solo in self._solo[site]:
            xs = x[solo.rows].to(solo.parts[0][0].dtype)
            for a, b, cols in solo.parts:
                out = torch.mm(torch.mm(xs, a[layer]), b[layer]).to(y.dtype)
                if isinstance(solo.rows, slice):
                    y[solo.rows, cols].add_(out)
                else:
                    y[:, cols].index_add_(0, solo.rows, out)


def _widths(adapter: LoraAdapter, names: tuple[str, ...]) -> Widths:
    """The site's projections the adapter has, each with its stack width: what adapters sharing a stack share."""
    return tuple((p, rank_bucket(adapter.projections[p].rank)) for p in names if p in adapter.projections)


def _expands(widths: Widths, bs: dict[str, torch.Tensor], offsets: dict[str, int]) -> tuple[_Expand, ...]:
    """Each projection's B stack, its columns in the shared shrink's output and in the site's fused output."""
    expands, col = [], 0
    for p, width in widths:
        expands.append(_Expand(bs[p], slice(col, col + width), slice(offsets[p], offsets[p] + bs[p].shape[-1])))
        col += width
    return tuple(expands)


def _chunk_len(lengths: Sequence[int]) -> int:
    """Rows a stacked chunk holds: segments up to that long are stacked (each padded to it), longer ones run
    alone; chosen to minimise padded rows plus weighted chunk and per-segment costs."""
    best, best_cost = 1, None
    for c in sorted({n for n in lengths if n <= _MAX_CHUNK_LEN} | {1}):
        cost = sum(
            c + _CHUNK_COST_IN_ROWS if n <= c else n + _CHUNK_COST_IN_ROWS + _SEGMENT_COST_IN_ROWS for n in lengths
        )
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
    return best
