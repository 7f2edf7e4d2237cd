"""Typed launchers for ``lora_sgmv.cu`` through CuPy: checked arguments, PyTorch's stream, no host sync."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex.kernels.segments import Segments, SegmentWeights

SOURCE = Path(__file__).with_name("lora_sgmv.cu")
THREADS = 256  # kWarps * 32 in the source
CHUNK = 1024  # kChunk
MAX_RANK = 128  # kMaxRank
_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
# Segments this long or longer use the 8-token tiles; decode (one token per segment) the 1-token GEMV.
LONG_SEGMENT = 4


class KernelError(ValueError):
    """Arguments the kernels cannot take (the caller falls back to the PyTorch plan, or fixes its call)."""


def available() -> bool:
    """CUDA is present and CuPy imports: the kernels can run here."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _module() -> Any:
    import cupy

    names = [f"lora_{half}<{t}, {tok}>" for half in ("shrink", "expand") for t in _TYPES.values() for tok in (1, 8)]
    return cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",), name_expressions=names)


def _function(half: str, dtype: torch.dtype, tok: int) -> Any:
    return _module().get_function(f"lora_{half}<{_TYPES[dtype]}, {tok}>")


def warm_up() -> None:
    """Compile every instance now (outside any timing or graph capture); CuPy caches them on disk."""
    for dtype in _TYPES:
        for tok in (1, 8):
            _function("shrink", dtype, tok)
            _function("expand", dtype, tok)


def _check(x: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    if not x.is_cuda:
        raise KernelError(f"{name} must be on a CUDA device")
    if dtype is not None and x.dtype != dtype:
        raise KernelError(f"{name} must be {dtype}, got {x.dtype}")


def _check_segments(segs: Segments, weights: SegmentWeights, layer: int) -> torch.Tensor:
    """The layer's pointer row, after checking what the kernels cannot take."""
    if segs.max_rank > MAX_RANK:
        raise KernelError(f"ranks must be 1..{MAX_RANK}, got {segs.max_rank}")
    pointers = weights.pointers[layer]
    _check(pointers, "weight pointers", torch.int64)
    return pointers


def _row_major(t: torch.Tensor, name: str) -> int:
    """Leading dimension of a 2-D tensor whose rows may be strided but whose columns are contiguous."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise KernelError(f"{name} must be 2-D with contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}")
    return int(t.stride(0))


def shrink(x: torch.Tensor, segs: Segments, a: SegmentWeights, layer: int) -> torch.Tensor:
    """``v[i, :r_s] = x[rows[i]] · A_s`` for every listed row; returns float32 ``[n, max_rank]``.

    ``a`` holds each segment's ``A^T`` ([layers, rank, h_in], contiguous, x's dtype) on the device.
    """
    a_ptrs = _check_segments(segs, a, layer)
    if x.dtype not in _TYPES:
        raise KernelError(f"x must be float16 or bfloat16, got {x.dtype}")
    _check(x, "x")
    ldx = _row_major(x, "x")
    v = torch.zeros(segs.num_rows, segs.max_rank, dtype=torch.float32, device=x.device)
    if segs.num_rows == 0:
        return v
    tok = 8 if segs.longest >= LONG_SEGMENT else 1
    h_in = x.shape[1]
    grid = (segs.num_segments, -(-h_in // CHUNK), -(-segs.longest // tok))
    args = (
        x.data_ptr(), np.int32(ldx), segs.rows.data_ptr(), segs.indptr.data_ptr(), a_ptrs.data_ptr(),
        segs.ranks.data_ptr(), v.data_ptr(), np.int32(segs.max_rank), np.int32(h_in),
    )  # fmt: skip
    _launch(_function("shrink", x.dtype, tok), grid, args)
    return v


def expand(y: torch.Tensor, v: torch.Tensor, segs: Segments, b: SegmentWeights, layer: int) -> None:
    """``y[rows[i]] += v[i, :r_s] · B_s`` in place; rows in no segment are left untouched.

    ``y`` may be a column slice of a wider output (its rows strided); ``b`` holds each segment's ``B``
    ([layers, rank, h_out], contiguous, y's dtype, scaling folded in) on the device.
    """
    b_ptrs = _check_segments(segs, b, layer)
    if y.dtype not in _TYPES:
        raise KernelError(f"y must be float16 or bfloat16, got {y.dtype}")
    _check(y, "y")
    _check(v, "v", torch.float32)
    ldy = _row_major(y, "y")
    if not v.is_contiguous() or v.shape != (segs.num_rows, segs.max_rank):
        raise KernelError(f"v must be contiguous [{segs.num_rows}, {segs.max_rank}], got {tuple(v.shape)}")
    if segs.num_rows == 0:
        return
    tok = 8 if segs.longest >= LONG_SEGMENT else 1
    h_out = y.shape[1]
    grid = (segs.num_segments, -(-h_out // THREADS), -(-segs.longest // tok))
    args = (
        v.data_ptr(), np.int32(segs.max_rank), segs.rows.data_ptr(), segs.indptr.data_ptr(), b_ptrs.data_ptr(),
        segs.ranks.data_ptr(), y.data_ptr(), np.int32(ldy), np.int32(h_out),
    )  # fmt: skip
    _launch(_function("expand", y.dtype, tok), grid, args)


def _launch(function: Any, grid: tuple[int, int, int], args: tuple[Any, ...]) -> None:
    import cupy

    # PyTorch's current stream, so the launch orders with the surrounding torch work and a CUDA graph
    # capturing that stream captures it too; nothing here waits for the device.
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with stream:
        function(grid, (THREADS,), args)
