"""Adapters' LoRA weights kept across the CPU plans, in a plan's dtype and stack layout: one slot per adapter."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from loraplex.shard.lora.adapter import LoraAdapter, ProjectionWeights

# A bank or conversion that no plan has used in this many builds is dropped (its memory with it).
_IDLE_BUILDS = 32
Widths = tuple[tuple[str, int], ...]  # the site's projections an adapter has, each with its slot width
Converted = dict[str, ProjectionWeights]


def rank_bucket(rank: int) -> int:
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
