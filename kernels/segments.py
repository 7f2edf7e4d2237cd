"""A batch's rows grouped by adapter (segments), and each segment's weights: what every LoRA op reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Cost of one extra chunk (reading one more copy of an adapter's weights) in units of one padded row
# (a row of rank-sized work done on zeros).  Weight bytes dominate on every target we run on.
_CHUNK_COST_IN_ROWS = 8


@dataclass(frozen=True)
class Segments:
    """Batch rows grouped by adapter: segment ``s`` is ``rows[indptr[s]:indptr[s + 1]]``, of rank ``ranks[s]``.

    Rows keep batch order inside a segment; rows in no segment take no part. The CUDA kernels read
    ``rows``/``indptr``/``ranks``; the batched-matmul path reads the chunk layout: each segment cut into
    chunks of ``chunk_len`` rows, one adapter a chunk, so one weight matrix serves a chunk and the whole
    batch is one ``bmm``. ``slots[i]`` is where row ``rows[i]`` sits in the padded ``[num_chunks *
    chunk_len]`` layout; ``identity`` says that layout is the batch itself (every row takes part, in
    order, with no padding), so no gather is needed.
    """

    rows: torch.Tensor  # int32 [n]
    indptr: torch.Tensor  # int32 [S + 1]
    ranks: torch.Tensor  # int32 [S]
    longest: int  # rows in the longest segment
    max_rank: int
    num_batch_rows: int
    chunk_len: int
    chunk_segments: tuple[int, ...]  # the segment of each chunk
    slots: torch.Tensor  # int32 [n]
    identity: bool

    @property
    def num_segments(self) -> int:
        return int(self.ranks.shape[0])

    @property
    def num_rows(self) -> int:
        """Rows that take part (the batch may hold more)."""
        return int(self.rows.shape[0])

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_segments)

    @classmethod
    def build(
        cls,
        members: Sequence[Sequence[int]],
        ranks: Sequence[int],
        device: torch.device | str = "cpu",
        num_batch_rows: int | None = None,
    ) -> Segments:
        """``members[s]`` are the batch rows of segment s, ``ranks[s]`` its rank; the batch has
        ``num_batch_rows`` rows (by default one past the highest member)."""
        if len(members) != len(ranks):
            raise ValueError(f"{len(members)} segments but {len(ranks)} ranks")
        if any(r < 1 for r in ranks):
            raise ValueError(f"ranks must be at least 1, got {list(ranks)}")
        flat = [r for m in members for r in m]
        batch = num_batch_rows if num_batch_rows is not None else max(flat, default=-1) + 1
        indptr = np.zeros(len(members) + 1, dtype=np.int32)
        indptr[1:] = np.cumsum([len(m) for m in members])
        lengths = [len(m) for m in members if m]
        chunk_len = _best_chunk_len(lengths) if lengths else 1
        slots: list[int] = []
        chunk_segments: list[int] = []
        for s, rows in enumerate(members):
            for start in range(0, len(rows), chunk_len):
                base = len(chunk_segments) * chunk_len
                slots.extend(range(base, base + len(rows[start : start + chunk_len])))
                chunk_segments.append(s)
        # Rows in order and no padding anywhere: the batch already is the layout.
        identity = bool(flat) and len(chunk_segments) * chunk_len == batch and flat == list(range(batch)) == slots
        pinned = torch.cuda.is_available() and torch.device(device).type == "cuda"

        def upload(values: Sequence[int] | np.ndarray) -> torch.Tensor:
            host = torch.as_tensor(np.asarray(values, dtype=np.int32))
            return host.pin_memory().to(device, non_blocking=True) if pinned else host.to(device)

        return cls(
            rows=upload(flat),
            indptr=upload(indptr),
            ranks=upload(list(ranks)),
            longest=max(lengths, default=0),
            max_rank=max(ranks, default=0),
            num_batch_rows=batch,
            chunk_len=chunk_len,
            chunk_segments=tuple(chunk_segments),
            slots=upload(slots),
            identity=identity,
        )

    @classmethod
    def from_keys(
        cls, keys: Sequence[int], ranks: Mapping[int, int] | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Segments, list[int]]:
        """Rows grouped by ``keys[row]`` (negative: no segment), segments in order of their key's first
        appearance; returns the segments and the key of each. ``ranks`` by key (default 1)."""
        order: dict[int, list[int]] = {}
        for row, key in enumerate(keys):
            if key >= 0:
                order.setdefault(key, []).append(row)
        seg_keys = list(order)
        rank_of = ranks or {}
        segs = cls.build(list(order.values()), [rank_of.get(k, 1) for k in seg_keys], device, len(keys))
        return segs, seg_keys


def _best_chunk_len(lengths: Sequence[int]) -> int:
    """Chunk length that minimises padded rows plus weighted chunk count (powers of two up to the longest)."""
    longest = max(lengths)
    best, best_cost = 1, None
    c = 1
    while True:
        chunks = sum(-(-n // c) for n in lengths)
        cost = chunks * (c + _CHUNK_COST_IN_ROWS)
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
        if c >= longest:
            return best
        c = min(2 * c, longest)


@dataclass(frozen=True)
class SegmentWeights:
    """One half (A or B) of every segment's LoRA over all layers, as the ops read it: the tensors, for the
    PyTorch reference, and each layer's matrix address on the device, for the kernels. Nothing is copied.

    ``stacks[s]`` is segment s's ``[num_layers, rank_s, features]`` tensor, contiguous: ``A^T`` (features
    = the input's) for the shrink, ``B`` with the scaling folded in (features = the output's) for the expand.
    """

    stacks: tuple[torch.Tensor, ...]
    pointers: torch.Tensor  # int64 [num_layers, S], on the stacks' device

    @classmethod
    def of(cls, stacks: Sequence[torch.Tensor], device: torch.device | str | None = None) -> SegmentWeights:
        """Weights of ``stacks`` (one per segment, all with the same number of layers)."""
        rows = []
        for t in stacks:
            if t.dim() != 3 or not t.is_contiguous():
                raise ValueError(f"segment weights must be contiguous [layers, rank, features], got {tuple(t.shape)}")
            step = t.stride(0) * t.element_size()
            rows.append([t.data_ptr() + layer * step for layer in range(t.shape[0])])
        where = device if device is not None else (stacks[0].device if stacks else "cpu")
        table = torch.tensor(rows, dtype=torch.int64) if rows else torch.zeros(0, 0, dtype=torch.int64)
        pointers = table.t().contiguous().to(where)
        return cls(tuple(stacks), pointers)
