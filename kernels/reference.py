"""SGMV and BGMV in plain PyTorch, with the kernels' arguments and semantics: their oracle and the ops' CPU code."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """float32, as in the kernels, unless the inputs are wider (float64 makes this an exact oracle)."""
    return torch.promote_types(dtype, torch.float32)


def sgmv_shrink(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    layer: int,
    rows: torch.Tensor,
    indptr: torch.Tensor,
    ranks: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """``v[0, i, :r_s] = x[rows[i]] · A_s`` for every listed row i of segment s; ``[1, n, max_rank]``, zero past
    each rank (one split: the kernels' split partial sums add up to it). ``weights[s]`` is segment s's
    ``A^T`` stacked over layers, ``[layers, >= r_s, h_in]``.

    One matmul per segment: slow on mixed batches, which is why the CPU path is ``kernels/bmm.py``.
    """
    acc = accumulator(x.dtype)
    v = torch.zeros(1, rows.shape[0], max_rank, dtype=acc, device=x.device)
    # Indices on the data's device (the segments may live on the host): index ops refuse a mix.
    where, bounds, rank_list = rows.to(x.device, torch.long), indptr.tolist(), ranks.tolist()
    for s, (start, stop) in enumerate(pairwise(bounds)):
        r = rank_list[s]
        if start < stop and r > 0:
            a_t = weights[s][layer, :r].to(x.device, acc)
            v[0, start:stop, :r] = x[where[start:stop]].to(acc) @ a_t.t()
    return v


def sgmv_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[torch.Tensor],
    layer: int,
    rows: torch.Tensor,
    indptr: torch.Tensor,
    ranks: torch.Tensor,
) -> None:
    """``y[rows[i]] += (sum_p v[p, i, :r_s]) · B_s`` in place, rounded to ``y``'s dtype once; rows in no
    segment, or in one of rank 0, are left bit-identical. ``weights[s]``: ``B_s`` over layers,
    ``[layers, >= r_s, h_out]``; ``v`` may be a column slice of a wider shrink output."""
    acc = accumulator(v.dtype)
    parts = v.sum(0).to(acc)
    where, bounds, rank_list = rows.to(y.device, torch.long), indptr.tolist(), ranks.tolist()
    for s, (start, stop) in enumerate(pairwise(bounds)):
        r = rank_list[s]
        if start < stop and r > 0:
            part = where[start:stop]
            delta = parts[start:stop, :r] @ weights[s][layer, :r].to(y.device, acc)
            y[part] = (y[part].to(acc) + delta).to(y.dtype)


def _row_ranks(ranks: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's slot (clamped to a valid one) and its rank there (0 for rows without adapter, idx < 0)."""
    safe = idx.clamp(min=0).long()
    return safe, torch.where(idx >= 0, ranks[safe], 0).to(torch.int32)


def bgmv_shrink(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``v[0, t, :r] = x[t] · A_{idx[t]}`` with r = ``ranks[idx[t]]``, zero past it; ``a`` ``[slots, R, h_in]``.

    Written without data-dependent control flow, so that ``torch.compile(fullgraph=True)`` takes it."""
    safe, row_ranks = _row_ranks(ranks, idx)
    acc = accumulator(x.dtype)
    v = torch.bmm(a[safe].to(acc), x.to(acc).unsqueeze(-1)).squeeze(-1)
    keep = torch.arange(a.shape[1], device=x.device)[None, :] < row_ranks[:, None]
    return torch.where(keep, v, 0).unsqueeze(0)


def bgmv_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> None:
    """``y[t] += (sum_p v[p, t, :r]) · B_{idx[t]}`` in place; rows with idx < 0 or rank 0 stay bit-identical."""
    safe, row_ranks = _row_ranks(ranks, idx)
    acc = accumulator(v.dtype)
    keep = torch.arange(b.shape[1], device=y.device)[None, :] < row_ranks[:, None]
    vs = torch.where(keep, v.sum(0).to(acc), 0)
    delta = torch.bmm(vs.unsqueeze(1), b[safe].to(acc)).squeeze(1)
    y.copy_(torch.where((row_ranks > 0)[:, None], (y.to(acc) + delta).to(y.dtype), y))
