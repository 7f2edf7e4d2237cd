"""Pure-PyTorch SGMV: the CPU path and the oracle for the CUDA kernels.

Weights arrive stacked per chunk (``[num_chunks, in, rank]`` and ``[num_chunks, rank, out]``), so a
whole batch, whatever its mix of adapters, costs one ``bmm`` per half: there is no loop over adapters.
Decode batches, with one row per adapter, are the BGMV case of the same code (``chunk_len == 1``).
"""

from __future__ import annotations

import torch

from loraplex.kernels.segments import SegmentLayout


def gather_rows(x: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Rows of ``x`` ([T, in]) placed in the padded layout: ``[num_chunks, chunk_len, in]``."""
    shape = (layout.num_chunks, layout.chunk_len, x.shape[-1])
    if layout.identity:
        return x.reshape(shape)
    padded = x.new_zeros(layout.num_chunks * layout.chunk_len, x.shape[-1])
    padded[layout.slots] = x[layout.rows]
    return padded.view(shape)


def sgmv_shrink(x_padded: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``v = x · A`` per chunk: ``[C, L, in] × [C, in, R] → [C, L, R]``, in A's dtype."""
    return torch.bmm(x_padded.to(a.dtype), a)


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, layout: SegmentLayout) -> None:
    """``y[row] += v · B`` for every taking-part row, in place; other rows are left untouched.

    ``y`` may be a column slice of a wider output (q, k and v share one fused projection output).
    """
    out = torch.bmm(v, b).view(-1, b.shape[-1]).to(y.dtype)
    if layout.identity:
        y.add_(out)
    else:
        y.index_add_(0, layout.rows, out[layout.slots])


def lora_naive(
    x: torch.Tensor,
    keys: list[int],
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The obviously correct per-row loop, ``x[t] · A_k · B_k``: the test oracle for the batched path."""
    out_dim = next(iter(weights.values()))[1].shape[-1] if weights else 0
    y = torch.zeros(x.shape[0], out_dim, dtype=torch.float64)
    for row, key in enumerate(keys):
        if key >= 0:
            a, b = weights[key]
            y[row] = (x[row].double() @ a.double()) @ b.double()
    return y
