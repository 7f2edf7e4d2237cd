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

    @staticmethod
    def supports(
        row_adapters: Sequence[LoraAdapter | None], lora_dtype: torch.dtype | None, device: torch.device
    ) -> bool:
        """The kernels can run this batch: CUDA with CuPy, the adapters' own half-precision weights, ranks
        within the kernels' limit."""
        return (
            device.type == "cuda"
            and cuda.available()
            and lora_dtype is None
            and all(
                p.a_t is not None and p.b.dtype in (torch.float16, torch.bfloat16) and p.rank <= cuda.MAX_RANK
                for a in row_adapters
                if a is not None
                for p in a.projections.values()
            )
        )


def _weights(stacks: list[torch.Tensor], device: torch.device) -> SegmentWeights:
    if not all(t.is_contiguous() for t in stacks):
        raise cuda.KernelError("LoRA weights must be contiguous on the device")
    return SegmentWeights.of(stacks, device)
