"""BGMV as PyTorch custom ops: the capturable LoRA of a decode step (slot-stacked weights, a slot per row).

``torch.ops.loraplex.bgmv_shrink`` / ``bgmv_expand``: a CPU implementation (plain PyTorch, the reference),
a CUDA one (the CuPy kernels on the tensors' device and torch's current stream, launched from device-side
index arithmetic only: no host sync, so a CUDA graph can capture it) and a fake one (shapes for
``torch.compile`` and fake tensors). Weights sit in per-slot stacks ``[slots, R, features]`` whose contents
change when adapters come and go, never their addresses: a captured graph stays valid.
"""

from __future__ import annotations

import torch

from loraplex.kernels import cuda


def _row_ranks(ranks: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's slot (clamped to a valid one) and its rank there (0 for rows without adapter, idx < 0)."""
    safe = idx.clamp(min=0).long()
    return safe, torch.where(idx >= 0, ranks[safe], 0).to(torch.int32)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _splits(x: torch.Tensor) -> int:
    """Partial sums the shrink returns: the kernels split h_in; the reference does not."""
    return cuda.splits_for(x.shape[0], x.shape[1]) if x.device.type == "cuda" else 1


@torch.library.custom_op("loraplex::bgmv_shrink", mutates_args=())
def bgmv_shrink(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Partial sums ``v[p, t, j]`` of ``x[t] · A_{idx[t]}`` over split p of h_in, for ``j < ranks[idx[t]]``.

    x ``[T, h_in]``; a ``[slots, R, h_in]`` (each slot's ``A^T``); ranks ``[slots]`` int32; idx ``[T]`` int32,
    -1 for rows without adapter. Returns float32 ``[P, T, R]``; ``bgmv_expand`` adds the P parts up. Elements
    past a row's rank are unspecified (the reference zeroes them; the kernels leave them unwritten).
    """
    safe, row_ranks = _row_ranks(ranks, idx)
    acc = _acc(x.dtype)
    v = torch.bmm(a[safe].to(acc), x.to(acc).unsqueeze(-1)).squeeze(-1)
    keep = torch.arange(a.shape[1], device=x.device)[None, :] < row_ranks[:, None]
    return torch.where(keep, v, 0).unsqueeze(0)


@bgmv_shrink.register_fake
def _(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(_splits(x), x.shape[0], a.shape[1], dtype=_acc(x.dtype))


@bgmv_shrink.register_kernel("cuda")
def bgmv_shrink_cuda(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The kernels: one one-token segment per row, its weight pointer computed on the device."""
    rows, indptr, ptrs, row_ranks = _segments(a, ranks, idx)
    vp = torch.empty(_splits(x), x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    cuda.launch_shrink(x, rows, indptr, ptrs, row_ranks, vp, 1)
    return vp


@torch.library.custom_op("loraplex::bgmv_expand", mutates_args=("y",))
def bgmv_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> None:
    """``y[t] += (sum_p v[p, t, :r]) · B_{idx[t]}`` in place, with r = ``ranks[idx[t]]``; rows with idx < 0 or
    rank 0 are left bit-identical. y ``[T, h_out]`` (rows may be strided: a column slice of a fused output);
    v ``[P, T, R]`` float32 (may be a column slice of a shared shrink's output); b ``[slots, R, h_out]``."""
    safe, row_ranks = _row_ranks(ranks, idx)
    acc = _acc(v.dtype)
    keep = torch.arange(b.shape[1], device=y.device)[None, :] < row_ranks[:, None]
    vs = torch.where(keep, v.sum(0).to(acc), 0)
    delta = torch.bmm(vs.unsqueeze(1), b[safe].to(acc)).squeeze(1)
    y.copy_(torch.where((row_ranks > 0)[:, None], (y.to(acc) + delta).to(y.dtype), y))


@bgmv_expand.register_fake
def _(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> None:
    return None


@bgmv_expand.register_kernel("cuda")
def bgmv_expand_cuda(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> None:
    rows, indptr, ptrs, row_ranks = _segments(b, ranks, idx)
    cuda.launch_expand(y, v, rows, indptr, ptrs, row_ranks, 1)


def _segments(
    w: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' segment arguments for one row per segment: rows, indptr, each row's weight pointer
    (``w``'s base address plus its slot's offset, computed on the device) and rank."""
    if w.dim() != 3 or w.stride(2) != 1 or w.stride(1) != w.shape[2]:
        raise cuda.KernelError(f"slot weights must be [slots, R, features] with contiguous rows, got {w.stride()}")
    if (w.stride(0) * w.element_size()) % 16 or w.data_ptr() % 16:
        raise cuda.KernelError("slot weights must start on 16-byte boundaries")
    n = idx.shape[0]
    safe, row_ranks = _row_ranks(ranks, idx)
    ptrs = safe * (w.stride(0) * w.element_size()) + w.data_ptr()
    rows = torch.arange(n, dtype=torch.int32, device=idx.device)
    indptr = torch.arange(n + 1, dtype=torch.int32, device=idx.device)
    return rows, indptr, ptrs, row_ranks
