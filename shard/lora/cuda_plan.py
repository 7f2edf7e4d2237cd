"""The CUDA LoRA plan: segments and weight pointers for the SGMV ops, one shrink per site, no weight copies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels import cuda, ops
from loraplex.kernels.segments import Segments, SegmentWeights
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.projections import SITES


@dataclass(frozen=True)
class _Expand:
    """One projection's expand over the segments whose shrink output holds it at the same columns."""

    ranks: torch.Tensor  # int32 [S]: the projection's rank in those segments, 0 in the others (left alone)
    b: SegmentWeights
    v_cols: slice  # where it sits in the site's shrink output
    y_cols: slice  # where the projection sits in its site's fused base output


@dataclass(frozen=True)
class _Site:
    segments: Segments  # rows of every adapter with LoRA at this site; rank: the site's summed ranks
    a: SegmentWeights  # each segment's fused A^T (``LoraAdapter.site_a_t``)
    expands: tuple[_Expand, ...]


class CudaLoraPlan:
    """The kernels' view of one batch composition; built once, reused by every decode step of the batch.

    Unlike the PyTorch plan it copies no weights: segments point at each adapter's own device tensors,
    which the plan keeps alive by holding the adapters. Per site, one shrink reads the input once for all
    of the site's projections (q, k and v; gate and up) through each adapter's fused A^T; each projection's
    expand then reads its columns of that output. Adapters whose ranks differ place a projection at other
    columns (k starts after q's rank): one expand per distinct column, the other segments given rank 0.
    """

    def __init__(self, row_adapters: Sequence[LoraAdapter | None], config: ModelConfig, device: torch.device) -> None:
        self.row_adapters = tuple(row_adapters)
        groups: dict[int, tuple[LoraAdapter, list[int]]] = {}
        for row, adapter in enumerate(self.row_adapters):
            if adapter is not None:
                groups.setdefault(adapter.serial, (adapter, []))[1].append(row)
        self._sites: dict[str, _Site] = {}
        for site, projs in SITES.items():
            members = [(adapter, _columns(adapter, site)) for adapter, _ in groups.values()]
            members = [(adapter, cols) for adapter, cols in members if cols]
            if not members:
                continue
            rows = [groups[adapter.serial][1] for adapter, _ in members]
            segs = Segments.build(
                rows, [sum(r for _, r in cols.values()) for _, cols in members], device, len(self.row_adapters)
            )
            expands = []
            for proj in projs:
                y_start = proj.offset(config)
                for col in sorted({cols[proj.name][0] for _, cols in members if proj.name in cols}):
                    # The segments holding this projection at column ``col``; the others get rank 0.
                    take = [proj.name in cols and cols[proj.name][0] == col for _, cols in members]
                    ranks = [cols[proj.name][1] if t else 0 for (_, cols), t in zip(members, take, strict=True)]
                    b = [a.projections[proj.name].b if t else None for (a, _), t in zip(members, take, strict=True)]
                    out = next(t for t in b if t is not None).shape[-1]
                    expands.append(
                        _Expand(
                            torch.tensor(ranks, dtype=torch.int32).to(device),
                            _weights(b, device),
                            slice(col, col + max(ranks)),
                            slice(y_start, y_start + out),
                        )
                    )
            self._sites[site] = _Site(segs, _weights([a.site_a_t[site] for a, _ in members], device), tuple(expands))

    @property
    def launches_per_layer(self) -> int:
        """Kernel launches one layer makes (shrinks and expands): what the host pays per layer."""
        return sum(1 + len(s.expands) for s in self._sites.values())

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every row's LoRA delta for ``site`` at ``layer`` into the fused base output ``y``."""
        s = self._sites.get(site)
        if s is None:
            return
        v = ops.sgmv_shrink(x, s.segments, s.a, layer)
        for e in s.expands:
            ops.sgmv_expand(y[:, e.y_cols], v[:, :, e.v_cols], s.segments, e.b, layer, e.ranks)


def _columns(adapter: LoraAdapter, site: str) -> dict[str, tuple[int, int]]:
    """Where each of the adapter's projections at ``site`` sits in its fused A^T: name -> (column, rank)."""
    names = [p.name for p in SITES[site] if p.name in adapter.projections]
    if not names:
        return {}
    if site not in adapter.site_a_t:
        raise cuda.KernelError(f"adapter {adapter.adapter_id!r} was not moved to the device")
    cols, col = {}, 0
    for name in names:
        w = adapter.projections[name]
        if w.b.dtype not in (torch.float16, torch.bfloat16) or w.rank > cuda.MAX_RANK:
            raise cuda.KernelError(
                f"adapter {adapter.adapter_id!r}: the CuPy kernels take float16/bfloat16 weights of rank "
                f"<= {cuda.MAX_RANK}, not {w.b.dtype} rank {w.rank} (--lora-backend torch does)"
            )
        cols[name] = (col, w.rank)
        col += w.rank
    return cols


def _weights(stacks: list[torch.Tensor | None], device: torch.device) -> SegmentWeights:
    """Each segment's stack; for None an empty stand-in (pointer 0, never read: that segment's rank is 0)."""
    like = next(t for t in stacks if t is not None)
    full = [t if t is not None else like.new_empty(like.shape[0], 0, like.shape[2]) for t in stacks]
    # The kernels read 16 bytes at a time: every layer's matrix must start on a 16-byte boundary.
    if not all(
        t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[-1] % cuda.VEC == 0 for t in stacks if t is not None
    ):
        raise cuda.KernelError("LoRA weights must be contiguous on the device, 16-byte aligned, features % 8 == 0")
    return SegmentWeights.of(full, device)
