"""Per-batch LoRA plan on CUDA: segments and per-layer weight pointers for the SGMV kernels, no weight copies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels import cuda
from loraplex.shard.config import ModelConfig
from loraplex.shard.lora.adapter import LoraAdapter
from loraplex.shard.lora.config import PROJECTIONS
from loraplex.shard.lora.plan import SITES, LoraBatch, LoraPlan, output_offsets


@dataclass(frozen=True)
class _Projection:
    segments: cuda.Segments
    a_ptrs: torch.Tensor  # int64 [num_layers, S]: each segment's A^T for that layer
    b_ptrs: torch.Tensor  # int64 [num_layers, S]
    cols: slice  # where the projection sits in its site's fused output


class CudaLoraBatch:
    """The kernels' view of one batch composition; built once, reused by every decode step of the batch.

    Unlike the CPU plan it copies no weights: segments point at each adapter's own device tensors, which
    the plan keeps alive by holding the adapters.
    """

    def __init__(self, row_adapters: Sequence[LoraAdapter | None], config: ModelConfig, device: torch.device) -> None:
        self.row_adapters = tuple(row_adapters)
        groups: dict[int, tuple[LoraAdapter, list[int]]] = {}
        for row, adapter in enumerate(self.row_adapters):
            if adapter is not None:
                groups.setdefault(adapter.serial, (adapter, []))[1].append(row)
        offsets = output_offsets(config)
        self._projections: dict[str, _Projection] = {}
        for proj in PROJECTIONS:
            members, ranks, a_rows, b_rows = [], [], [], []
            out_features = 0
            for adapter, rows in groups.values():
                weights = adapter.projections.get(proj)
                if weights is None:
                    continue
                if weights.a_t is None:
                    raise cuda.KernelError(f"adapter {adapter.adapter_id!r} was not moved to the device")
                members.append(rows)
                ranks.append(weights.rank)
                a_rows.append(_layer_pointers(weights.a_t))
                b_rows.append(_layer_pointers(weights.b))
                out_features = weights.b.shape[-1]
            if not members:
                continue
            self._projections[proj] = _Projection(
                cuda.Segments.build(members, ranks, device),
                torch.tensor(a_rows, dtype=torch.int64).t().contiguous().to(device),
                torch.tensor(b_rows, dtype=torch.int64).t().contiguous().to(device),
                slice(offsets[proj], offsets[proj] + out_features),
            )

    def apply(self, site: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every row's LoRA delta for ``site`` at ``layer`` into the fused base output ``y``."""
        for proj in SITES[site]:
            p = self._projections.get(proj)
            if p is None:
                continue
            v = cuda.shrink(x, p.segments, p.a_ptrs[layer])
            cuda.expand(y[:, p.cols], v, p.segments, p.b_ptrs[layer])


def _layer_pointers(t: torch.Tensor) -> list[int]:
    """Address of each layer's matrix in a contiguous ``[num_layers, rows, cols]`` tensor."""
    if not t.is_contiguous():
        raise cuda.KernelError("LoRA weights must be contiguous on the device")
    step = t.stride(0) * t.element_size()
    return [t.data_ptr() + layer * step for layer in range(t.shape[0])]


def make_plan(
    row_adapters: Sequence[LoraAdapter | None],
    config: ModelConfig,
    lora_dtype: torch.dtype | None,
    device: torch.device,
) -> LoraPlan:
    """The CUDA kernels' plan where they can run (CUDA, half precision, ranks within their limit), else the
    PyTorch reference plan, which is also the CPU path."""
    present = [a for a in row_adapters if a is not None]
    if (
        device.type == "cuda"
        and cuda.available()
        and lora_dtype is None
        and all(
            p.a_t is not None and p.b.dtype in (torch.float16, torch.bfloat16) and p.rank <= cuda.MAX_RANK
            for a in present
            for p in a.projections.values()
        )
    ):
        return CudaLoraBatch(row_adapters, config, device)
    return LoraBatch(row_adapters, config, lora_dtype)
