"""SGMV as one ``bmm`` per half over chunks of one adapter each (a padded chunk layout): the CPU path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Layout(Protocol):
    """Where each taking-part row sits in a padded ``[num_chunks * chunk_len]`` layout, one adapter a chunk.

    ``Segments`` is one (chunks in segment order); ``ChunkLayout`` is any other order, such as one that
    follows the slots of weights already stacked elsewhere.
    """

    @property
    def rows(self) -> torch.Tensor: ...  # [n] batch rows that take part
    @property
    def slots(self) -> torch.Tensor: ...  # [n] their places in the padded layout
    @property
    def num_chunks(self) -> int: ...
    @property
    def chunk_len(self) -> int: ...
    @property
    def identity(self) -> bool: ...  # the layout is the batch itself: no gather, no scatter


@dataclass(frozen=True)
class ChunkLayout:
    """A ``Layout`` built by its user: ``rows`` and ``slots`` as int64 on the data's device.

    Two shortcuts for layouts that are batch rows reordered: ``order`` (the batch row at each place, when
    every place holds one) gathers with one ``index_select``; ``back`` (the place of each of the rows
    ``back_start, back_start + 1, ...``, when the taking-part rows are such a run) puts the results back
    with one and an ``add_`` on that run. A bfloat16 ``index_add_`` of 64 rows took 80 us against 24 us
    for ``index_select`` and ``add_``, at each of seven expands in every layer.
    """

    rows: torch.Tensor
    slots: torch.Tensor
    num_chunks: int
    chunk_len: int
    identity: bool
    order: torch.Tensor | None = None
    back: torch.Tensor | None = None
    back_start: int = 0


def gather_rows(x: torch.Tensor, segs: Layout) -> torch.Tensor:
    """Rows of ``x`` ([T, in]) placed in the padded chunk layout: ``[num_chunks, chunk_len, in]``."""
    shape = (segs.num_chunks, segs.chunk_len, x.shape[-1])
    if segs.identity:
        return x.reshape(shape)
    if isinstance(segs, ChunkLayout) and segs.order is not None:
        return x.index_select(0, segs.order).view(shape)
    padded = x.new_zeros(segs.num_chunks * segs.chunk_len, x.shape[-1])
    # Indices on the data's device: the segments may have been built on the host.
    padded[segs.slots.to(x.device, torch.long)] = x[segs.rows.to(x.device, torch.long)]
    return padded.view(shape)


def sgmv_shrink(x_padded: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``v = x · A`` per chunk: ``[C, L, in] × [C, in, R] → [C, L, R]``, in A's dtype.

    Weights come stacked per chunk, so a batch costs one ``bmm`` whatever its mix of adapters (no loop
    over adapters); decode, one row per adapter, is the BGMV case of the same code (``chunk_len == 1``).
    """
    return torch.bmm(x_padded.to(a.dtype), a)


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, segs: Layout) -> None:
    """``y[row] += v · B`` for every taking-part row, in place; other rows are left untouched.

    ``y`` may be a column slice of a wider output (q, k and v share one fused projection output). Chunks
    holding no row (padding) are computed and never read, so their weights may hold anything.
    """
    out = torch.bmm(v, b).view(-1, b.shape[-1]).to(y.dtype)
    if segs.identity:
        y.add_(out)
    elif isinstance(segs, ChunkLayout) and segs.back is not None:
        y[segs.back_start : segs.back_start + segs.back.shape[0]].add_(out.index_select(0, segs.back))
    else:
        y.index_add_(0, segs.rows.to(y.device, torch.long), out[segs.slots.to(y.device, torch.long)])
