"""The PyTorch LoRA plan (the CPU path): short segments as one ``bmm`` over stacked slots, long ones as GEMMs."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from loraplex.kernels.bmm import ChunkLayout, Layout, gather_rows, sgmv_expand, sgmv_shrink
from loraplex.kernels.segments import Segments
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter, ProjectionWeights
from loraplex.shard.projections import SITES

# Costs in units of one padded row (a row of rank-sized work done on zeros), as in kernels/segments.py:
# a chunk reads one more copy of an adapter's weights; a segment run on its own also pays its own
# matmul calls at every site of every layer.
_CHUNK_COST_IN_ROWS = 8
_SEGMENT_COST_IN_ROWS = 24
# Past this, padding every stacked chunk to the longest short segment costs more than it saves.
_MAX_CHUNK_LEN = 16
# A bank or conversion that no plan has used in this many builds is dropped (its memory with it).
_IDLE_BUILDS = 32
# From this many long segments on, a plan copies them into stacks of its own (one bmm per site) rather than
# run each alone: 32 prompts of 128 tokens with distinct rank-16 all-projection adapters (bfloat16) took
# 0.59 s stacked against 0.80 s alone; a chunked-prefill step holds one to three.
_STACKED_LONG_SEGMENTS = 4

Widths = tuple[tuple[str, int], ...]  # the site's projections an adapter has, each with its slot width
Converted = dict[str, ProjectionWeights]


def _rank_bucket(rank: int) -> int:
    """Adapters of similar rank share slots: padding is then under 2x, and banks stay few."""
    return 1 << (rank - 1).bit_length()


class _Bank:
    """Slots of one site's weights for adapters of one shape: A ``[layers, cap, in, sum of widths]`` (the
    projections sharing a shrink side by side) and B ``[layers, cap, width, out]`` per projection.

    Layer-major, so that a run of slots is one contiguous ``[chunks, in, R]`` view per layer, which is what
    a plan's ``bmm`` reads: a plan over adapters already here copies nothing.
    """

    def __init__(self, widths: Widths, like: LoraAdapter, dtype: torch.dtype) -> None:
        self.widths = widths
        sample = like.projections[widths[0][0]]
        self.layers, self.in_features = sample.a.shape[:2]
        self.out = {p: like.projections[p].b.shape[-1] for p, _ in widths}
        self.dtype, self.device = dtype, sample.a.device
        self.cap = 0
        self.a = torch.empty(0)
        self.b: dict[str, torch.Tensor] = {}
        self.owners: list[weakref.ref[LoraAdapter] | None] = []
        self.serials: list[int] = []
        self.last_used: list[int] = []
        self.slot_of: dict[int, int] = {}  # by adapter serial
        self.used_at = 0

    def alive(self, slot: int) -> bool:
        owner = self.owners[slot]
        return owner is not None and owner() is not None

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + sum(b.nbytes for b in self.b.values()) if self.cap else 0

    def live(self) -> int:
        return sum(self.alive(s) for s in range(self.cap))

    def sweep(self) -> None:
        """Free the slots of adapters that are gone: an unloaded adapter's weights are never read again."""
        for s in range(self.cap):
            if self.owners[s] is not None and not self.alive(s):
                self.owners[s] = None
                self.slot_of.pop(self.serials[s], None)

    def assign(self, members: Sequence[LoraAdapter], build: int) -> tuple[list[int], int, bool]:
        """Each member's slot, copying in those not here; also how many were copied, and whether a live
        adapter's slot was taken over (plans built before then may read the wrong weights)."""
        self.used_at = build
        wanted = {m.serial for m in members}
        misses = [m for m in members if not (m.serial in self.slot_of and self.alive(self.slot_of[m.serial]))]
        taken_over = False
        if misses:
            free = [s for s in range(self.cap) if not self.alive(s)]
            if len(free) < len(misses):
                # Adapters not in this batch give their slots up, least recently used first, before the bank
                # grows: the bank stays as large as the largest batch, not as the set of adapters ever seen.
                spare = [s for s in range(self.cap) if self.alive(s) and self.serials[s] not in wanted]
                spare.sort(key=lambda s: (self.last_used[s], s))
                taken = spare[: len(misses) - len(free)]
                taken_over = bool(taken)
                free += taken
            if len(free) < len(misses):
                old = self.cap
                self._grow(max(old + len(misses) - len(free), 2 * old))
                free += range(old, self.cap)
            for m, s in zip(misses, sorted(free), strict=False):
                self.slot_of.pop(self.serials[s], None)
                self._write(s, m)
        slots = [self.slot_of[m.serial] for m in members]
        for s in slots:
            self.last_used[s] = build
        return slots, len(misses), taken_over

    def move(self, moves: Sequence[tuple[int, int]]) -> None:
        """Move slot contents (``(from, to)`` pairs forming a permutation of their slots) with their owners."""
        src = torch.tensor([f for f, _ in moves], device=self.device)
        dst = torch.tensor([t for _, t in moves], device=self.device)
        self.a[:, dst] = self.a[:, src]  # the right side is gathered first: cycles are safe
        for b in self.b.values():
            b[:, dst] = b[:, src]
        owners, serials, used = list(self.owners), list(self.serials), list(self.last_used)
        for f, t in moves:
            self.owners[t], self.serials[t], self.last_used[t] = owners[f], serials[f], used[f]
            if owners[f] is not None:
                self.slot_of[serials[f]] = t

    def _grow(self, cap: int) -> None:
        width = sum(w for _, w in self.widths)
        dtype, device = self.dtype, self.device
        a = torch.empty(self.layers, cap, self.in_features, width, dtype=dtype, device=device)
        b = {p: torch.empty(self.layers, cap, w, self.out[p], dtype=dtype, device=device) for p, w in self.widths}
        if self.cap:
            a[:, : self.cap] = self.a
            for p in b:
                b[p][:, : self.cap] = self.b[p]
        self.a, self.b = a, b
        grown = cap - self.cap
        self.owners += [None] * grown
        self.serials += [0] * grown
        self.last_used += [0] * grown
        self.cap = cap

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        col = 0
        for p, width in self.widths:
            w = adapter.projections[p]
            r = w.rank
            self.a[:, slot, :, col : col + r] = w.a
            self.b[p][:, slot, :r] = w.b
            if r < width:  # padding must be zeros: it is multiplied, not skipped
                self.a[:, slot, :, col + r : col + width] = 0
                self.b[p][:, slot, r:] = 0
            col += width
        self.owners[slot] = weakref.ref(adapter)
        self.serials[slot] = adapter.serial
        self.slot_of[adapter.serial] = slot


class StackPool:
    """Adapters' LoRA weights in a plan's dtype and stack layout, kept across plans, one slot per adapter.

    A batch whose composition changes at every step (chunked prefill ramping up) then copies only the
    adapters that newly join it, not all of them: plans view runs of slots. Entries are keyed by adapter
    serial (a reloaded adapter is a new object, never served the old weights) and hold only a weak
    reference to it: ``forget`` frees what belonged to adapters that are gone, and what no plan used lately.
    """

    def __init__(self) -> None:
        self._banks: dict[tuple[str, torch.dtype, torch.device, Widths], _Bank] = {}
        # An adapter's weights in another dtype, for plans that run it as a long segment: by (serial, dtype),
        # with the adapter's weak reference and the last build that used them.
        self._converted: dict[tuple[int, torch.dtype], tuple[weakref.ref[LoraAdapter], Converted, list[int]]] = {}
        self._lock = threading.Lock()
        self.builds = 0
        # Bumped whenever a live adapter's slot is taken over: a plan built before then is stale.
        self.epoch = 0
        self.slot_writes = 0  # an adapter's weights of one site copied into a slot, ever
        self.conversions = 0  # an adapter converted to another dtype for its long segments, ever

    @property
    def nbytes(self) -> int:
        with self._lock:
            banks = sum(b.nbytes for b in self._banks.values())
            converted = sum(p.a.nbytes + p.b.nbytes for _, copy, _ in self._converted.values() for p in copy.values())
        return banks + converted

    def live_slots(self) -> int:
        """Slots holding the weights of an adapter that still exists."""
        with self._lock:
            return sum(b.live() for b in self._banks.values())

    @contextmanager
    def building(self) -> Iterator[int]:
        """One plan's build: its number (for ageing), under the lock that ``forget`` takes from other threads."""
        with self._lock:
            self.builds += 1
            yield self.builds
            self._drop_idle(self.builds - _IDLE_BUILDS)

    def slots(
        self, key: tuple[str, torch.dtype, Widths], members: Sequence[LoraAdapter], build: int
    ) -> tuple[_Bank, list[int]]:
        """The bank for ``key`` and each member's slot there, copying in those not yet there (within ``building``)."""
        site, dtype, widths = key
        device = members[0].projections[widths[0][0]].a.device
        bank = self._banks.get((site, dtype, device, widths))
        if bank is None:
            bank = self._banks[(site, dtype, device, widths)] = _Bank(widths, members[0], dtype)
        slots, copied, taken_over = bank.assign(members, build)
        self.slot_writes += copied
        self.epoch += taken_over
        return bank, slots

    def move(self, bank: _Bank, moves: Sequence[tuple[int, int]]) -> None:
        """Permute slots of ``bank`` (within ``building``): plans built before read the wrong weights."""
        bank.move(moves)
        self.slot_writes += len(moves)
        self.epoch += 1

    def converted(self, adapter: LoraAdapter, dtype: torch.dtype, build: int) -> Converted:
        """The adapter's weights in ``dtype``, converted once for every plan that runs it as a long segment."""
        key = (adapter.serial, dtype)
        entry = self._converted.get(key)
        if entry is None or entry[0]() is None:
            copy = {n: ProjectionWeights(w.a.to(dtype), w.b.to(dtype), w.ranks) for n, w in adapter.projections.items()}
            entry = self._converted[key] = (weakref.ref(adapter), copy, [build])
            self.conversions += 1
        entry[2][0] = build
        return entry[1]

    def forget(self) -> None:
        """Drop what belongs to adapters that are gone, and whatever the latest plan did not use."""
        with self._lock:
            for bank in self._banks.values():
                bank.sweep()
            self._converted = {k: e for k, e in self._converted.items() if e[0]() is not None}
            self._drop_idle(self.builds)
            self._banks = {k: b for k, b in self._banks.items() if b.live()}

    def _drop_idle(self, before: int) -> None:
        self._banks = {k: b for k, b in self._banks.items() if b.used_at >= before}
        self._converted = {k: e for k, e in self._converted.items() if e[2][0] >= before}


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
                    widths = tuple(
                        (p, _rank_bucket(adapter.projections[p].rank)) for p in names if p in adapter.projections
                    )
                    if widths:
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
        expands = []
        col = 0
        for p, width in bank.widths:
            out = bank.out[p]
            expands.append(_Expand(bs[p], slice(col, col + width), slice(offsets[p], offsets[p] + out)))
            col += width
        return _Stacked(layout, a, tuple(expands))

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
            own = adapter.projections
            widths = tuple((p, _rank_bucket(own[p].rank)) for p in names if p in own)
            if widths:
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
            expands, col = [], 0
            for p, w in widths:
                out = bs[p].shape[-1]
                expands.append(_Expand(bs[p], slice(col, col + w), slice(offsets[p], offsets[p] + out)))
                col += w
            stacked.append(_Stacked(segs, a, tuple(expands)))
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
        if self._epoch != self._pool.epoch:
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
