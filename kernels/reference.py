"""``shrink`` and ``expand`` in plain PyTorch, with ``kernels/cuda.py``'s signature and semantics: its oracle."""

from __future__ import annotations

from itertools import pairwise

import torch

from loraplex.kernels.segments import Segments, SegmentWeights


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float32, as in the kernels, unless the inputs are wider (float64 makes this an exact oracle)."""
    return torch.promote_types(dtype, torch.float32)


def shrink(x: torch.Tensor, segs: Segments, a: SegmentWeights, layer: int) -> torch.Tensor:
    """``v[i, :r_s] = x[rows[i]] · A_s`` for every listed row; ``v`` is ``[n, max_rank]``, zero past each rank.

    One matmul per segment: slow on mixed batches, which is why the CPU path is ``kernels/bmm.py``.
    """
    acc = _accumulator(x.dtype)
    v = torch.zeros(segs.num_rows, segs.max_rank, dtype=acc, device=x.device)
    # Indices on the data's device (the segments may live on the host): index ops refuse a mix.
    rows, bounds, ranks = segs.rows.to(x.device, torch.long), segs.indptr.tolist(), segs.ranks.tolist()
    for s, (start, stop) in enumerate(pairwise(bounds)):
        if start < stop:
            a_t = a.stacks[s][layer, : ranks[s]].to(x.device, acc)
            v[start:stop, : ranks[s]] = x[rows[start:stop]].to(acc) @ a_t.t()
    return v


def expand(y: torch.Tensor, v: torch.Tensor, segs: Segments, b: SegmentWeights, layer: int) -> None:
    """``y[rows[i]] += v[i, :r_s] · B_s`` in place, rounded to ``y``'s dtype once; other rows untouched."""
    acc = v.dtype
    rows, bounds, ranks = segs.rows.to(y.device, torch.long), segs.indptr.tolist(), segs.ranks.tolist()
    for s, (start, stop) in enumerate(pairwise(bounds)):
        if start < stop:
            part = rows[start:stop]
            delta = v[start:stop, : ranks[s]] @ b.stacks[s][layer, : ranks[s]].to(y.device, acc)
            y[part] = (y[part].to(acc) + delta).to(y.dtype)
