"""A stand-in for CuPy's launch that runs the kernels' arithmetic in numpy from the very launch arguments.

It reads the pointers and scalars the launcher passes (host memory here: the tensors live on the CPU), so a
wrong pointer, leading dimension, argument order or scalar width gives a wrong answer or an assertion, as on
the device. The arithmetic is the kernels' documented contract (lora_sgmv.cu's header), not a copy of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from loraplex.kernels import cuda, ops

_SHRINK = ("ptr", np.int32, "ptr", "ptr", "ptr", "ptr", "ptr", np.int32, np.int32, np.int32)
_EXPAND = ("ptr", np.int32, np.int64, np.int32, "ptr", "ptr", "ptr", "ptr", "ptr", np.int32, np.int32)


def _view(ptr: int, dtype: Any, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    assert ptr % np.dtype(dtype).itemsize == 0, f"misaligned pointer {ptr:#x}"
    buf = (ctypes.c_uint8 * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype)


def _read_half(ptr: int, count: int, kind: str) -> np.ndarray:
    raw = _view(ptr, np.uint16, count)
    if kind == "__half":
        return raw.view(np.float16).astype(np.float32)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _write_half(ptr: int, values: np.ndarray, kind: str) -> None:
    out = _view(ptr, np.uint16, values.size)
    if kind == "__half":
        out[:] = values.astype(np.float16).view(np.uint16)
        return
    bits = values.astype(np.float32).view(np.uint32)
    out[:] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


class Emulator:
    """Callable as ``kernels.cuda``'s launch function; counts the launches it ran."""

    def __init__(self) -> None:
        self.launches: list[str] = []

    def __call__(
        self, name: str, device: torch.device, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple
    ) -> None:
        half, kind, tok = cuda.NAMES[name][0], name.split("<")[1].split(",")[0], cuda.NAMES[name][2]
        assert block == (cuda.THREADS, 1, 1)
        spec = _SHRINK if half == "shrink" else _EXPAND
        assert len(args) == len(spec), (name, len(args))
        for value, want in zip(args, spec, strict=True):
            # A bare Python int would be passed as 64 bits and shift every later argument on the device.
            assert type(value) is (int if want == "ptr" else want), (name, type(value), want)
        self.launches.append(name)
        (self._shrink if half == "shrink" else self._expand)(kind, tok, grid, args)

    @staticmethod
    def _segments(grid: tuple[int, int, int], tok: int, indptr_p: int, ranks_p: int, ptrs_p: int) -> tuple:
        segments = grid[0]
        indptr = _view(indptr_p, np.int32, segments + 1)
        lengths = np.diff(indptr)
        assert grid[2] * tok >= (lengths.max() if segments else 0), "token tiles do not cover the longest segment"
        return indptr, _view(ranks_p, np.int32, segments), _view(ptrs_p, np.int64, segments)

    def _shrink(self, kind: str, tok: int, grid: tuple[int, int, int], args: tuple) -> None:
        x, ldx, rows_p, indptr_p, ptrs_p, ranks_p, vp, ldv, n_rows, h_in = args
        indptr, ranks, ptrs = self._segments(grid, tok, indptr_p, ranks_p, ptrs_p)
        rows = _view(rows_p, np.int32, int(indptr[-1]))
        splits = grid[1]
        span = -(-h_in // (splits * cuda.VEC)) * cuda.VEC
        out = _view(vp, np.float32, splits * int(n_rows) * int(ldv)).reshape(splits, n_rows, ldv)
        for s in range(grid[0]):
            r = int(ranks[s])
            if r == 0:
                continue
            a = _read_half(int(ptrs[s]), r * h_in, kind).reshape(r, h_in)
            for i in range(indptr[s], indptr[s + 1]):
                xr = _read_half(x + 2 * int(rows[i]) * int(ldx), h_in, kind)
                for p in range(splits):
                    lo, hi = p * span, min(h_in, (p + 1) * span)
                    out[p, i, :r] = a[:, lo:hi].astype(np.float64) @ xr[lo:hi].astype(np.float64)

    def _expand(self, kind: str, tok: int, grid: tuple[int, int, int], args: tuple) -> None:
        vp, ldv, split_stride, splits, rows_p, indptr_p, ptrs_p, ranks_p, y, ldy, h_out = args
        indptr, ranks, ptrs = self._segments(grid, tok, indptr_p, ranks_p, ptrs_p)
        assert grid[1] * cuda.THREADS * cuda.VEC >= h_out, "column blocks do not cover h_out"
        rows = _view(rows_p, np.int32, int(indptr[-1]))
        for s in range(grid[0]):
            r = min(int(ranks[s]), cuda.MAX_RANK)
            if r == 0:
                continue
            b = _read_half(int(ptrs[s]), r * h_out, kind).reshape(r, h_out).astype(np.float64)
            for i in range(indptr[s], indptr[s + 1]):
                parts = [_view(vp + 4 * (p * int(split_stride) + i * int(ldv)), np.float32, r) for p in range(splits)]
                v = np.sum(parts, axis=0)
                at = y + 2 * int(rows[i]) * int(ldy)
                _write_half(at, _read_half(at, h_out, kind) + (v.astype(np.float64) @ b), kind)


@contextlib.contextmanager
def kernels_on_cpu() -> Iterator[Emulator]:
    """CPU tensors take the ops' CUDA implementations (the launchers), launched by an ``Emulator``.

    The ops' CPU kernels (the reference) are overridden for the duration; leaving restores them."""
    double = Emulator()
    cuda.set_launcher(double, "cpu")
    override = torch.library.Library("loraplex", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose
            for name, impls in ops.IMPLEMENTATIONS.items():
                override.impl(name, impls["CUDA"], "CPU")
        yield double
    finally:
        override._destroy()
        cuda.set_launcher(None)
