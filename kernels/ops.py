"""SGMV and BGMV as PyTorch custom ops (``torch.ops.loraplex.*``): CPU, CUDA and fake implementations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from loraplex.kernels import cuda, reference
from loraplex.kernels.segments import Segments, SegmentWeights

# - ``sgmv_shrink`` / ``sgmv_expand``: a batch's rows grouped in segments, one adapter each (``Segments``),
#   each segment's weights stacked over layers (``SegmentWeights``). Every LoRA call of the CUDA plan.
# - ``bgmv_shrink`` / ``bgmv_expand``: one slot index per row into per-slot stacks ``[slots, R, features]``
#   whose contents change when adapters come and go, never their addresses: the captured decode step's LoRA.
#
# CPU: ``kernels/reference.py`` (plain PyTorch). CUDA: the CuPy kernels (``kernels/cuda.py``) on the tensors'
# device and torch's current stream, with no host sync, so a CUDA graph captures them. Fake: shapes only, for
# ``torch.compile`` and fake tensors. The shrinks return float32 partial sums ``[P, rows, R]`` (the kernels
# split h_in in P parts; the reference returns P = 1); the expands add the P parts up and write ``y`` in place.
#
# Registered with ``torch.library.Library`` rather than ``torch.library.custom_op``: a call then costs about
# 5 µs of dispatch instead of about 14 (`python benchmarks/op_dispatch.py`), and the eager CUDA plan makes one
# or two calls per projection and layer (docs/gpu.md).

_LIB = torch.library.Library("loraplex", "DEF")  # the ops' one definition; held here for the process's life

SCHEMAS = {
    "sgmv_shrink": "sgmv_shrink(Tensor x, Tensor[] weights, Tensor pointers, int layer, Tensor rows, "
    "Tensor indptr, Tensor ranks, int max_rank, int longest) -> Tensor",
    "sgmv_expand": "sgmv_expand(Tensor(a!) y, Tensor v, Tensor[] weights, Tensor pointers, int layer, "
    "Tensor rows, Tensor indptr, Tensor ranks, int longest) -> ()",
    "bgmv_shrink": "bgmv_shrink(Tensor x, Tensor a, Tensor ranks, Tensor idx) -> Tensor",
    "bgmv_expand": "bgmv_expand(Tensor(a!) y, Tensor v, Tensor b, Tensor ranks, Tensor idx) -> ()",
}


def _splits(x: torch.Tensor, blocks: int) -> int:
    """Partial sums a shrink on ``x``'s device returns for ``blocks`` (segment, token tile) pairs: the kernels
    split h_in; the reference does not."""
    return cuda.splits_for(blocks, x.shape[1]) if x.device.type == "cuda" else 1


def _sgmv_blocks(ranks: torch.Tensor, longest: int) -> int:
    return int(ranks.shape[0]) * max(1, -(-longest // cuda.tile_for(longest)))


# ---- CPU: the reference, with the ops' arguments (pointers are the kernels'; the reference reads tensors).


def _sgmv_shrink_cpu(
    x: torch.Tensor, weights: list[torch.Tensor], pointers: torch.Tensor, layer: int, rows: torch.Tensor,
    indptr: torch.Tensor, ranks: torch.Tensor, max_rank: int, longest: int,
) -> torch.Tensor:  # fmt: skip
    return reference.sgmv_shrink(x, weights, layer, rows, indptr, ranks, max_rank)


def _sgmv_expand_cpu(
    y: torch.Tensor, v: torch.Tensor, weights: list[torch.Tensor], pointers: torch.Tensor, layer: int,
    rows: torch.Tensor, indptr: torch.Tensor, ranks: torch.Tensor, longest: int,
) -> None:  # fmt: skip
    reference.sgmv_expand(y, v, weights, layer, rows, indptr, ranks)


# ---- CUDA: the kernels, from the segments' device-side arguments.


def sgmv_shrink_cuda(
    x: torch.Tensor, weights: list[torch.Tensor], pointers: torch.Tensor, layer: int, rows: torch.Tensor,
    indptr: torch.Tensor, ranks: torch.Tensor, max_rank: int, longest: int,
) -> torch.Tensor:  # fmt: skip
    """Split partial sums of ``x[rows[i]] · A_s``: float32 ``[splits, n, max_rank]``, elements past a segment's
    rank unwritten. ``pointers[layer, s]`` is the address of ``weights[s][layer]`` (``SegmentWeights``)."""
    ptrs = _layer_pointers(pointers, layer)
    parts = cuda.splits_for(_sgmv_blocks(ranks, longest), x.shape[1])
    vp = torch.empty(parts, rows.shape[0], max_rank, dtype=torch.float32, device=x.device)
    cuda.launch_shrink(x, rows, indptr, ptrs, ranks, vp, longest)
    return vp


def sgmv_expand_cuda(
    y: torch.Tensor, v: torch.Tensor, weights: list[torch.Tensor], pointers: torch.Tensor, layer: int,
    rows: torch.Tensor, indptr: torch.Tensor, ranks: torch.Tensor, longest: int,
) -> None:  # fmt: skip
    """``y[rows[i]] += (sum_p v[p, i, :r_s]) · B_s`` in place; ``y`` may be a column slice of a fused output."""
    ptrs = _layer_pointers(pointers, layer)
    cuda.launch_expand(y, v, rows, indptr, ptrs, ranks, longest)


def _layer_pointers(pointers: torch.Tensor, layer: int) -> torch.Tensor:
    """Each segment's weight address at ``layer`` (``SegmentWeights.pointers``)."""
    if pointers.dtype != torch.int64:
        raise cuda.KernelError(f"weight pointers must be int64, got {pointers.dtype}")
    return pointers[layer]


def bgmv_shrink_cuda(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The kernels: one one-token segment per row, its weight pointer computed on the device."""
    rows, indptr, ptrs, row_ranks = _slot_segments(a, ranks, idx)
    parts = cuda.splits_for(x.shape[0], x.shape[1])
    vp = torch.empty(parts, x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    cuda.launch_shrink(x, rows, indptr, ptrs, row_ranks, vp, 1)
    return vp


def bgmv_expand_cuda(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> None:
    rows, indptr, ptrs, row_ranks = _slot_segments(b, ranks, idx)
    cuda.launch_expand(y, v, rows, indptr, ptrs, row_ranks, 1)


def _slot_segments(
    w: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' segment arguments for one row per segment: rows, indptr, each row's weight pointer
    (``w``'s base address plus its slot's offset, computed on the device) and rank."""
    if w.dim() != 3 or w.stride(2) != 1 or w.stride(1) != w.shape[2]:
        raise cuda.KernelError(f"slot weights must be [slots, R, features] with contiguous rows, got {w.stride()}")
    if (w.stride(0) * w.element_size()) % 16 or w.data_ptr() % 16:
        raise cuda.KernelError("slot weights must start on 16-byte boundaries")
    n = idx.shape[0]
    safe = idx.clamp(min=0).long()
    row_ranks = torch.where(idx >= 0, ranks[safe], 0).to(torch.int32)
    ptrs = safe * (w.stride(0) * w.element_size()) + w.data_ptr()
    rows = torch.arange(n, dtype=torch.int32, device=idx.device)
    indptr = torch.arange(n + 1, dtype=torch.int32, device=idx.device)
    return rows, indptr, ptrs, row_ranks


# ---- Fake: shapes, dtypes and devices only.


def _sgmv_shrink_fake(
    x: torch.Tensor, weights: list[torch.Tensor], pointers: torch.Tensor, layer: int, rows: torch.Tensor,
    indptr: torch.Tensor, ranks: torch.Tensor, max_rank: int, longest: int,
) -> torch.Tensor:  # fmt: skip
    parts = _splits(x, _sgmv_blocks(ranks, longest))
    return x.new_empty(parts, rows.shape[0], max_rank, dtype=reference.accumulator(x.dtype))


def _bgmv_shrink_fake(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(_splits(x, x.shape[0]), x.shape[0], a.shape[1], dtype=reference.accumulator(x.dtype))


def _nothing(*args: Any) -> None:
    return None


IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Any]]] = {
    "sgmv_shrink": {"CPU": _sgmv_shrink_cpu, "CUDA": sgmv_shrink_cuda, "fake": _sgmv_shrink_fake},
    "sgmv_expand": {"CPU": _sgmv_expand_cpu, "CUDA": sgmv_expand_cuda, "fake": _nothing},
    "bgmv_shrink": {"CPU": reference.bgmv_shrink, "CUDA": bgmv_shrink_cuda, "fake": _bgmv_shrink_fake},
    "bgmv_expand": {"CPU": reference.bgmv_expand, "CUDA": bgmv_expand_cuda, "fake": _nothing},
}

for _name, _schema in SCHEMAS.items():
    _LIB.define(_schema)
    for _key, _fn in IMPLEMENTATIONS[_name].items():
        if _key == "fake":
            torch.library.register_fake(f"loraplex::{_name}", _fn, lib=_LIB)
        else:
            _LIB.impl(_name, _fn, _key)


def sgmv_shrink(x: torch.Tensor, segs: Segments, a: SegmentWeights, layer: int) -> torch.Tensor:
    """``torch.ops.loraplex.sgmv_shrink`` for ``segs``' rows at ``layer``: float32 ``[P, segs.num_rows,
    segs.max_rank]`` partial sums (``sgmv_expand`` adds them up). ``a`` holds each segment's ``A^T``."""
    return torch.ops.loraplex.sgmv_shrink.default(
        x, list(a.stacks), a.pointers, layer, segs.rows, segs.indptr, segs.ranks, segs.max_rank, segs.longest
    )


def sgmv_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    segs: Segments,
    b: SegmentWeights,
    layer: int,
    ranks: torch.Tensor | None = None,
) -> None:
    """``torch.ops.loraplex.sgmv_expand``: ``y[rows[i]] += v[:, i, :r_s].sum(0) · B_s`` in place. ``ranks``
    replaces ``segs.ranks`` (0 leaves a segment's rows alone), so several expands can read one shrink's
    output at different columns. ``b`` holds each segment's ``B`` (scaling folded in)."""
    torch.ops.loraplex.sgmv_expand.default(
        y, v, list(b.stacks), b.pointers, layer, segs.rows, segs.indptr, segs.ranks if ranks is None else ranks,
        segs.longest,
    )  # fmt: skip
