"""The CUDA LoRA plan: segments and weight pointers for the SGMV kernels, no weight copies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels import cuda
from loraplex.kernels.segments import Segments, SegmentWeights
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.projections import PROJECTIONS, SITES


@dataclass(frozen=True)
class _Projection:
    segments: Segments
    a: SegmentWeights  # each segment's A^T
    b: SegmentWeights
    cols: slice  # where the projection sits in its site's fused output


class CudaLoraPlan:
    """The kernels' view of one batch composition; built once, reused by every decode step of the batch.

    Unlike the PyTorch plan it copies no weights: segments point at each adapter's own device tensors,
    which the plan keeps alive by holding the adapters.
    """

    def __init__(self, row_adapters: Sequence[LoraAdapter | None], config: ModelConfig, device: torch.device) -> None:
        self.row_adapters = tuple(row_adapters)
        groups: dict[int, tuple[LoraAdapter, list[int]]] = {}
        for row, adapter in enumerate(self.row_adapters):
            if adapter is not None:
                groups.setdefault(adapter.serial, (adapter, []))[1].append(row)
        self._projections: dict[str, _Projection] = {}
        for proj in PROJECTIONS.values():
            members, ranks, a_stacks, b_stacks = [], [], [], []
            out_features = 0
            for adapter, rows in groups.values():
                weights = adapter.projections.get(proj.name)
                if weights is None:
                    continue
                if weights.a_t is None:
                    raise cuda.KernelError(f"adapter {adapter.adapter_id!r} was not moved to the device")
                if weights.b.dtype not in (torch.float16, torch.bfloat16) or weights.rank > cuda.MAX_RANK:
                    raise cuda.KernelError(
                        f"adapter {adapter.adapter_id!r}: the CuPy kernels take float16/bfloat16 weights of rank "
                        f"<= {cuda.MAX_RANK}, not {weights.b.dtype} rank {weights.rank} (--lora-backend torch does)"
                    )
                members.append(rows)
                ranks.append(weights.rank)
                a_stacks.append(weights.a_t)
                b_stacks.append(weights.b)
                out_features = weights.b.shape[-1]
            if not members:
                continue
            offset = proj.offset(config)
            self._projections[proj.name] = _Projection(
                Segments.build(members, ranks, device, len(self.row_adapters)),
                _weights(a_stacks, device),
                _weights(b_stacks, device),
                slice(offset, offset + out_features),
            )

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every row's LoRA delta for ``site`` at ``layer`` into the fused base output ``y``."""
        for proj in SITES[site]:
            p = self._projections.get(proj.name)
            if p is None:
                continue
            v = cuda.shrink(x, p.segments, p.a, layer)
            cuda.expand(y[:, p.cols], v, p.segments, p.b, layer)


def _weights(stacks: list[torch.Tensor], device: torch.device) -> SegmentWeights:
    # The kernels read 16 bytes at a time: every layer's matrix must start on a 16-byte boundary.
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[-1] % cuda.VEC == 0 for t in stacks):
        raise cuda.KernelError("LoRA weights must be contiguous on the device, 16-byte aligned, features % 8 == 0")
    return SegmentWeights.of(stacks, device)
