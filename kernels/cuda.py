"""Typed launchers for ``lora_sgmv.cu`` through CuPy: checked arguments, the tensors' device and stream, no sync.

The ops that call them, with their PyTorch reference and fake implementations, are ``kernels/ops.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE = Path(__file__).with_name("lora_sgmv.cu")
THREADS = 128  # kWarps * 32 in the source
VEC = 8  # kVec: half-precision values per 16-byte load
MAX_RANK = 128  # kMaxRank
OPTIONS = ("-std=c++17",)  # what CuPy's NVRTC compiles with (it adds -arch itself); CI compiles with the same
_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
# Segments this long or longer use the 8-token tiles; decode (one token per segment) the 1-token GEMV.
LONG_SEGMENT = 4
# Enough shrink blocks to keep every multiprocessor streaming (132 on an H100/H200, a few blocks each): short
# batches split h_in over more blocks. A fixed number, not the device's, so that fake tensors (and graphs)
# see the same shapes everywhere.
TARGET_BLOCKS = 528
MIN_SPLIT = 512  # h_in values a split covers at least

# name expression -> (dtype, tokens per tile)
NAMES = {
    f"lora_{half}<{t}, {tok}>": (half, dtype, tok)
    for half in ("shrink", "expand")
    for dtype, t in _TYPES.items()
    for tok in (1, 8)
}


class KernelError(ValueError):
    """Arguments the kernels cannot take (the caller fixes its call, or chooses ``--lora-backend torch``)."""


# launch(name, device, grid, block, args): the one place that reaches CuPy. Tests put a double here that
# runs the kernels' arithmetic from the very pointers and scalars (tests/kernels/emulator.py).
Launch = Callable[[str, torch.device, tuple[int, int, int], tuple[int, int, int], tuple[Any, ...]], None]


def missing() -> str | None:
    """Why the kernels cannot run here (one line), or None when CUDA is present and CuPy imports."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); pip install 'loraplex[cuda]'"
    return None


def available() -> bool:
    """CUDA is present and CuPy imports: the kernels can run here."""
    return missing() is None


@cache
def _module(device_index: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=SOURCE.read_text(), options=OPTIONS, name_expressions=list(NAMES))


def _cupy_launch(
    name: str, device: torch.device, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple[Any, ...]
) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    # The tensors' device and torch's current stream on it: the launch orders with the surrounding torch
    # work, and a CUDA graph capturing that stream captures it too; nothing here waits for the device.
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        _module(index).get_function(name)(grid, block, args)  # the module is loaded in that device's context


_launch: Launch = _cupy_launch
_accepts = "cuda"  # the device type the current launcher runs on


def set_launcher(launch: Launch | None, device_type: str = "cuda") -> None:
    """Replace CuPy by ``launch`` for tensors of ``device_type`` (tests); None restores CuPy."""
    global _launch, _accepts
    _launch, _accepts = (launch, device_type) if launch is not None else (_cupy_launch, "cuda")


def warm_up(device: torch.device | str = "cuda") -> None:
    """Compile every instance now (outside any timing or graph capture); CuPy caches them on disk.

    Raises whatever CuPy raises when a kernel does not compile: the shard then refuses to start.
    """
    import cupy

    index = torch.device(device).index
    index = index if index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        module = _module(index)
        for name in NAMES:
            module.get_function(name)


def _check(x: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    if x.device.type != _accepts:
        raise KernelError(f"{name} must be on a CUDA device, got {x.device}")
    if dtype is not None and x.dtype != dtype:
        raise KernelError(f"{name} must be {dtype}, got {x.dtype}")


def _row_major(t: torch.Tensor, name: str) -> int:
    """Leading dimension of a 2-D tensor whose rows may be strided but whose columns are contiguous, with
    every row 16-byte aligned (the kernels' vector loads)."""
    if t.dim() != 2 or t.stride(1) != 1:
        raise KernelError(f"{name} must be 2-D with contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}")
    if t.stride(0) % VEC or t.shape[1] % VEC or t.storage_offset() % VEC:
        raise KernelError(f"{name} rows must start and end on 16-byte boundaries, got {tuple(t.shape)} {t.stride()}")
    return int(t.stride(0))


def splits_for(num_blocks: int, h_in: int) -> int:
    """How many parts the shrink cuts h_in into, for ``num_blocks`` (segment, token tile) pairs."""
    return max(1, min(-(-TARGET_BLOCKS // max(num_blocks, 1)), h_in // MIN_SPLIT))


def tile_for(longest: int) -> int:
    return 8 if longest >= LONG_SEGMENT else 1


def launch_shrink(
    x: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, ptrs: torch.Tensor, ranks: torch.Tensor,
    vp: torch.Tensor, longest: int,
) -> None:  # fmt: skip
    """``vp[p, i, :ranks[s]]`` = split p of ``x[rows[i]] · A_s`` for segment s of row i; every other element of
    ``vp`` ([splits, n, ldv], contiguous float32) is left as it was. All tensors on one device."""
    if x.dtype not in _TYPES:
        raise KernelError(f"x must be float16 or bfloat16, got {x.dtype}")
    for t, n in ((x, "x"), (rows, "rows"), (indptr, "indptr"), (ranks, "ranks"), (ptrs, "pointers"), (vp, "v")):
        _check(t, n)
        if t.device != x.device:
            raise KernelError(f"{n} is on {t.device}, x on {x.device}")
    ldx = _row_major(x, "x")
    if not vp.is_contiguous() or vp.dtype != torch.float32 or vp.dim() != 3:
        raise KernelError(f"v must be contiguous float32 [splits, rows, ldv], got {vp.dtype} {tuple(vp.shape)}")
    segments = int(ranks.shape[0])
    if segments == 0 or vp.shape[1] == 0:
        return
    tok = tile_for(longest)
    grid = (segments, int(vp.shape[0]), -(-longest // tok))
    args = (
        x.data_ptr(), np.int32(ldx), rows.data_ptr(), indptr.data_ptr(), ptrs.data_ptr(), ranks.data_ptr(),
        vp.data_ptr(), np.int32(vp.shape[2]), np.int32(vp.shape[1]), np.int32(x.shape[1]),
    )  # fmt: skip
    _launch(f"lora_shrink<{_TYPES[x.dtype]}, {tok}>", x.device, grid, (THREADS, 1, 1), args)


def launch_expand(
    y: torch.Tensor, vp: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, ptrs: torch.Tensor,
    ranks: torch.Tensor, longest: int,
) -> None:  # fmt: skip
    """``y[rows[i]] += (sum_p vp[p, i, :r]) · B_s`` in place; ``vp`` may be a column slice ([splits, n, r] of a
    wider float32 buffer, columns contiguous); rows of rank-0 segments and rows in no segment stay untouched."""
    if y.dtype not in _TYPES:
        raise KernelError(f"y must be float16 or bfloat16, got {y.dtype}")
    for t, n in ((y, "y"), (rows, "rows"), (indptr, "indptr"), (ranks, "ranks"), (ptrs, "pointers"), (vp, "v")):
        _check(t, n)
        if t.device != y.device:
            raise KernelError(f"{n} is on {t.device}, y on {y.device}")
    ldy = _row_major(y, "y")
    if vp.dtype != torch.float32 or vp.dim() != 3 or vp.stride(2) != 1 or vp.shape[2] > MAX_RANK:
        raise KernelError(f"v must be float32 [splits, rows, <= {MAX_RANK}] with contiguous columns")
    segments = int(ranks.shape[0])
    if segments == 0 or vp.shape[1] == 0:
        return
    tok = tile_for(longest)
    grid = (segments, -(-y.shape[1] // (THREADS * VEC)), -(-longest // tok))
    args = (
        vp.data_ptr(), np.int32(vp.stride(1)), np.int64(vp.stride(0)), np.int32(vp.shape[0]), rows.data_ptr(),
        indptr.data_ptr(), ptrs.data_ptr(), ranks.data_ptr(), y.data_ptr(), np.int32(ldy), np.int32(y.shape[1]),
    )  # fmt: skip
    _launch(f"lora_expand<{_TYPES[y.dtype]}, {tok}>", y.device, grid, (THREADS, 1, 1), args)
