"""SGMV as one ``bmm`` per half over chunks of one adapter each (``Segments``' chunk layout): the CPU path."""

from __future__ import annotations

import torch

from loraplex.kernels.segments import Segments


def gather_rows(x: torch.Tensor, segs: Segments) -> torch.Tensor:
    """Rows of ``x`` ([T, in]) placed in the padded chunk layout: ``[num_chunks, chunk_len, in]``."""
    shape = (segs.num_chunks, segs.chunk_len, x.shape[-1])
    if segs.identity:
        return x.reshape(shape)
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


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, segs: Segments) -> None:
    """``y[row] += v · B`` for every taking-part row, in place; other rows are left untouched.

    ``y`` may be a column slice of a wider output (q, k and v share one fused projection output).
    """
    out = torch.bmm(v, b).view(-1, b.shape[-1]).to(y.dtype)
    if segs.identity:
        y.add_(out)
    else:
        y.index_add_(0, segs.rows.to(y.device), out[segs.slots.to(y.device, torch.long)])
