"""Per-row adapter keys turned into segments: rows grouped by adapter, cut into equal-length chunks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Cost of one extra chunk (reading one more copy of an adapter's weights) in units of one padded row
# (a row of rank-sized work done on zeros).  Weight bytes dominate on every target we run on.
_CHUNK_COST_IN_ROWS = 8


@dataclass(frozen=True)
class SegmentLayout:
    """Where each taking-part batch row sits in a padded ``[num_chunks, chunk_len]`` layout.

    Every chunk holds rows of one segment key (one adapter), so one weight matrix serves a chunk and
    the whole batch is one batched matmul.  ``identity`` says that the layout is the batch itself
    (every row takes part, in order, one row per chunk or one chunk), so no gather is needed.
    """

    rows: torch.Tensor
    slots: torch.Tensor
    chunk_keys: tuple[int, ...]
    chunk_len: int
    num_rows: int
    identity: bool

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_keys)


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


def segment_layout(keys: Sequence[int], device: torch.device | str = "cpu") -> SegmentLayout:
    """Group rows by key (negative keys take no part) into chunks of one key each.

    Segments keep the order in which their keys first appear, and rows keep batch order inside a segment.
    """
    order: dict[int, list[int]] = {}
    for row, key in enumerate(keys):
        if key >= 0:
            order.setdefault(key, []).append(row)
    num_rows = len(keys)
    if not order:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return SegmentLayout(empty, empty, (), 1, num_rows, False)
    chunk_len = _best_chunk_len([len(r) for r in order.values()])
    rows: list[int] = []
    slots: list[int] = []
    chunk_keys: list[int] = []
    for key, members in order.items():
        for start in range(0, len(members), chunk_len):
            part = members[start : start + chunk_len]
            base = len(chunk_keys) * chunk_len
            rows.extend(part)
            slots.extend(range(base, base + len(part)))
            chunk_keys.append(key)
    # Rows in order and no padding anywhere: the batch already is the layout.
    identity = len(chunk_keys) * chunk_len == num_rows and rows == list(range(num_rows)) and slots == rows
    return SegmentLayout(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        chunk_keys=tuple(chunk_keys),
        chunk_len=chunk_len,
        num_rows=num_rows,
        identity=identity,
    )
